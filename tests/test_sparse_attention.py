"""Block-sparse attention parts: each mask against its definition written out here (token granularity) and
that definition dilated to blocks (block granularity), FlexAttention against masked SDPA, the block mask against
torch's create_block_mask, a covering window against dense attention, training on the CPU, and the parts inside
the denoiser and the pipeline. fp32 on the CPU (FlexAttention's eager path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_diffusers_dit
from torch.nn.attention.flex_attention import create_block_mask

from diffsynth_cog.denoise.denoiser import Denoiser
from diffsynth_cog.denoise.masks import (
    RadialAttention,
    TemporalWindowAttention,
    block_mask_from_mask_mod,
    parse_attention,
)
from diffsynth_cog.loading.dit_loader import load_dit
from diffsynth_cog.models.tokens import TokenLayout

LAYOUT = TokenLayout(n_text=5, grid=(9, 4, 6))  # 9 latent frames of 24 tokens: 221 tokens
ALIGNED = TokenLayout(n_text=8, grid=(9, 4, 6))  # 224 tokens: 14 whole blocks of 16
SMALL_FRAMES = TokenLayout(n_text=5, grid=(9, 2, 3))  # 6-token frames: a 16-token block holds up to 4 frames


def qkv(layout: TokenLayout, extra: int = 0, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, layout.n_tokens + extra, 2, 16, generator=g).requires_grad_(grad) for _ in range(3)
    ]  # [B, L, H, D]


def masked_sdpa(q, k, v, mask):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def window_reference(layout: TokenLayout, window: int, sink: bool, length: int) -> torch.Tensor:
    """Token i sees token j when either is text, or j is video within `window` frames of i (or in frame 0 with
    a sink); tokens past the layout (padding) are never keys and see the text."""
    n_text, per = layout.n_text, layout.tokens_per_frame
    kind = ["text"] * n_text + ["video"] * layout.n_video + ["pad"] * (length - layout.n_tokens)
    frame = torch.tensor([max(i - n_text, 0) // per for i in range(length)])
    is_text = torch.tensor([k == "text" for k in kind])
    is_video = torch.tensor([k == "video" for k in kind])
    near = (frame[:, None] - frame[None, :]).abs() <= window
    if sink:
        near |= frame[None, :] == 0
    mask = is_text[:, None] | is_text[None, :] | (is_video[:, None] & is_video[None, :] & near)
    return mask & ~torch.tensor([k == "pad" for k in kind])[None, :]


def radial_reference(layout: TokenLayout, min_width: int, decay: float = 1.0) -> torch.Tensor:
    """Radial Attention, from the paper's description: frame pairs at distance <= 1 attend fully; for d >= 2,
    with group g = floor(log2 d) + 1 and the per-frame size rounded up to the power of two P above it, the band
    is P >> g tokens wide (times decay), at least min_width; where P >> g < min_width only every
    (min_width / (P >> g))-th distance is kept. Frame 0 is a sink, text is global."""
    n_text, per, t = layout.n_text, layout.tokens_per_frame, layout.grid[0]
    p = 1
    while p <= per:
        p *= 2
    mask = torch.zeros(layout.n_tokens, layout.n_tokens, dtype=torch.bool)
    mask[:n_text, :] = True
    mask[:, :n_text] = True
    for fi in range(t):
        for fj in range(t):
            block = mask[n_text + fi * per : n_text + (fi + 1) * per, n_text + fj * per : n_text + (fj + 1) * per]
            d = abs(fi - fj)
            if fj == 0 or d <= 1:
                block[:] = True
                continue
            g = 0
            while 2**g <= d:
                g += 1
            natural = p // 2**g
            if natural < min_width and d % (min_width // natural) != 0:
                continue
            width = max(natural * decay, min_width)
            a = torch.arange(per)
            block[:] = (a[:, None] - a[None, :]).abs() <= width
    return mask


def dilated(token_mask: torch.Tensor, layout: TokenLayout, block_size: int) -> torch.Tensor:
    """The block-granular mask from a token-level one: among the layout's tokens, a query attends to a key when any
    query of its block (blocks of `block_size` from token 0) attends to any key of the key's block; padding rows and
    columns are the token-level ones."""
    n = layout.n_tokens
    blocks = -(-n // block_size)
    padded = torch.zeros(blocks * block_size, blocks * block_size, dtype=torch.bool)
    padded[:n, :n] = token_mask[:n, :n]
    table = padded.view(blocks, block_size, blocks, block_size).any(dim=3).any(dim=1)
    mask = token_mask.clone()
    mask[:n, :n] = table.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:n, :n]
    return mask


def check_mask_and_flex(attend, want_mask: torch.Tensor, layout: TokenLayout, extra: int = 0, seed: int = 0) -> None:
    assert torch.equal(attend.dense_mask(layout.n_tokens + extra), want_mask)
    q, k, v = qkv(layout, extra, seed=seed)
    with torch.no_grad():
        got = attend(q, k, v)
    assert torch.allclose(got, masked_sdpa(q, k, v, want_mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("window,sink,extra", [(0, True, 0), (2, True, 0), (1, False, 0), (2, True, 11)])
def test_token_window_mask_is_its_definition_and_flex_equals_masked_sdpa(window, sink, extra):
    part = TemporalWindowAttention(window, sink=sink, block_size=16, granularity="token")
    length = LAYOUT.n_tokens + extra  # extra: padding a sequence split may add
    check_mask_and_flex(
        part.build(LAYOUT, torch.device("cpu")), window_reference(LAYOUT, window, sink, length), LAYOUT, extra
    )


@pytest.mark.parametrize("min_width,decay", [(8, 1.0), (4, 0.5)])
def test_token_radial_mask_is_its_definition_and_flex_equals_masked_sdpa(min_width, decay):
    part = RadialAttention(decay=decay, min_width=min_width, block_size=16, granularity="token")
    want_mask = radial_reference(LAYOUT, min_width, decay)
    # The bands thin out with distance: some frame pairs dropped, some partially kept.
    assert 0.2 < want_mask.float().mean() < 0.9
    check_mask_and_flex(part.build(LAYOUT, torch.device("cpu")), want_mask, LAYOUT, seed=1)


@pytest.mark.parametrize("layout", [LAYOUT, ALIGNED, SMALL_FRAMES], ids=["221", "224-aligned", "6-token-frames"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_block_window_mask_is_the_dilated_definition_and_flex_equals_masked_sdpa(layout, block_size):
    for window, sink, extra in ((0, True, 0), (1, False, 0), (2, True, 11)):
        part = TemporalWindowAttention(window, sink=sink, block_size=block_size)
        token_mask = window_reference(layout, window, sink, layout.n_tokens + extra)
        want_mask = dilated(token_mask, layout, block_size)
        assert bool((want_mask | ~token_mask).all()) and not torch.equal(want_mask, token_mask)  # a strict superset
        if block_size == 16:
            assert not bool(want_mask[: layout.n_tokens, : layout.n_tokens].all())  # still sparse
        check_mask_and_flex(part.build(layout, torch.device("cpu")), want_mask, layout, extra)


@pytest.mark.parametrize("layout", [LAYOUT, ALIGNED], ids=["221", "224-aligned"])
@pytest.mark.parametrize("min_width,decay", [(8, 1.0), (4, 0.5)])
def test_block_radial_mask_is_the_dilated_definition_and_flex_equals_masked_sdpa(layout, min_width, decay):
    part = RadialAttention(decay=decay, min_width=min_width, block_size=16)
    token_mask = radial_reference(layout, min_width, decay)
    want_mask = dilated(token_mask, layout, 16)
    assert bool((want_mask | ~token_mask).all()) and not torch.equal(want_mask, token_mask)
    if min_width == 8:
        assert not bool(want_mask.all())  # (the narrower bands of min_width 4 dilate to every block here)
    check_mask_and_flex(part.build(layout, torch.device("cpu")), want_mask, layout, seed=1)


def block_parts(block_size: int) -> list:
    return [
        TemporalWindowAttention(1, block_size=block_size),
        RadialAttention(min_width=8, block_size=block_size),
    ]


@pytest.mark.parametrize("layout", [LAYOUT, ALIGNED], ids=["221", "224-aligned"])
def test_block_granular_block_masks_are_full_or_empty_but_at_the_sequence_end(layout):
    """Every tile is full or empty except the ones holding tokens past the layout or the sequence: evaluated with
    no help from the block table, and the attention object's own (built from it) is the same."""
    for part in block_parts(16):
        attend = part.build(layout, torch.device("cpu"))
        end = layout.n_tokens // 16  # tiles from here on hold padding or run past the sequence
        for length in (layout.n_tokens, layout.n_tokens + 40):
            evaluated = block_mask_from_mask_mod(attend.mask_mod, length, "cpu", 16)
            partial = evaluated.to_dense()[0, 0].bool() & ~full_blocks(evaluated)
            assert not bool(partial[:end, :end].any())
            assert bool(full_blocks(evaluated)[:end, :end].any()) and not bool(full_blocks(evaluated).all())
            ours = attend.prepare(length)
            assert torch.equal(ours.kv_num_blocks, evaluated.kv_num_blocks)
            assert torch.equal(ours.full_kv_num_blocks, evaluated.full_kv_num_blocks)
            assert torch.equal(ours.to_dense(), evaluated.to_dense())
            assert torch.equal(full_blocks(ours), full_blocks(evaluated))
    # At token level the same masks cut most of the tiles they touch.
    token = TemporalWindowAttention(1, block_size=16, granularity="token").build(LAYOUT, torch.device("cpu"))
    assert int(token.prepare(LAYOUT.n_tokens).kv_num_blocks.sum()) > 30


def full_blocks(block_mask) -> torch.Tensor:
    """[n, n] booleans: the tiles the block mask lists as full."""
    n = block_mask.full_kv_num_blocks.shape[-1]
    full = torch.zeros(n, n, dtype=torch.bool)
    for row in range(n):
        count = int(block_mask.full_kv_num_blocks[0, 0, row])
        full[row, block_mask.full_kv_indices[0, 0, row, :count].long()] = True
    return full


@pytest.mark.parametrize("granularity", ["token", "block"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_block_mask_equals_torch_create_block_mask(block_size, granularity):
    parts = (
        TemporalWindowAttention(1, block_size=block_size, granularity=granularity),
        RadialAttention(min_width=8, block_size=block_size, granularity=granularity),
    )
    for part in parts:
        for layout in (LAYOUT, ALIGNED):
            attend = part.build(layout, torch.device("cpu"))
            for length in (layout.n_tokens, layout.n_tokens + 40):
                ref = create_block_mask(
                    attend.mask_mod, None, None, length, length, device="cpu", BLOCK_SIZE=block_size
                )
                for ours in (
                    block_mask_from_mask_mod(attend.mask_mod, length, "cpu", block_size),
                    attend.prepare(length),
                ):
                    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
                    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
                    assert torch.equal(ours.to_dense(), ref.to_dense())
                if isinstance(part, TemporalWindowAttention) and block_size == 16:
                    assert not bool(ref.to_dense().all())  # distant frames' blocks are skipped


@pytest.mark.parametrize("granularity", ["token", "block"])
def test_a_window_covering_every_frame_is_dense_attention(granularity):
    parts = (
        TemporalWindowAttention(8, granularity=granularity),
        TemporalWindowAttention(8, sink=False, block_size=16, granularity=granularity),
        RadialAttention(dense_distance=8, block_size=16, granularity=granularity),
    )
    for part in parts:
        attend = part.build(LAYOUT, torch.device("cpu"))
        assert bool(attend.dense_mask(LAYOUT.n_tokens).all())
        q, k, v = qkv(LAYOUT, seed=2)
        with torch.no_grad():
            got = attend(q, k, v)
        assert torch.allclose(got, masked_sdpa(q, k, v, None), atol=1e-5, rtol=0)


@pytest.mark.parametrize("granularity", ["token", "block"])
def test_masks_train_on_the_cpu_with_the_gradients_of_the_masked_attention(granularity):
    attend = TemporalWindowAttention(1, block_size=16, granularity=granularity).build(LAYOUT, torch.device("cpu"))
    q, k, v = qkv(LAYOUT, seed=3, grad=True)
    attend(q, k, v).square().sum().backward()
    mask = window_reference(LAYOUT, 1, True, LAYOUT.n_tokens)
    mask = dilated(mask, LAYOUT, 16) if granularity == "block" else mask
    q2, k2, v2 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    masked_sdpa(q2, k2, v2, mask).square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=0)


def test_one_attention_object_per_layout_and_the_block_masks_are_built_once():
    part = TemporalWindowAttention(2)
    a = part.build(LAYOUT, torch.device("cpu"))
    assert part.build(LAYOUT, torch.device("cpu")) is a
    assert list(a.block_masks) == [LAYOUT.n_tokens]
    other = part.build(TokenLayout(5, (3, 4, 6)), torch.device("cpu"))
    assert other is not a and part.build(LAYOUT, torch.device("cpu")) is a


def test_attention_specs_parse_and_bad_ones_say_what_is_valid():
    assert parse_attention("sdpa") == "sdpa"
    w = parse_attention("window:3")
    assert isinstance(w, TemporalWindowAttention) and w.window == 3 and w.sink and w.name == "window3"
    assert w.granularity == "block" and w.block_size == 128
    nosink = parse_attention("window:1:nosink")
    assert not nosink.sink and nosink.granularity == "block" and nosink.name == "window1-nosink"
    radial = parse_attention("radial")
    assert radial.name == "radial" and radial.granularity == "block" and parse_attention("radial:0.5").decay == 0.5
    names = {
        "window:2:token": ("token", "window2-token"),
        "window:1:nosink:token": ("token", "window1-nosink-token"),
        "radial:token": ("token", "radial-token"),
        "radial:1:token": ("token", "radial-token"),
        "radial:0.5": ("block", "radial(decay=0.5,dense=1,min_width=128,sink=True)"),
        "radial:0.5:token": ("token", "radial(decay=0.5,dense=1,min_width=128,sink=True)-token"),
    }
    for spec, (granularity, name) in names.items():
        part = parse_attention(spec)
        assert (part.granularity, part.name) == (granularity, name), spec
    bads = ("window", "window:x", "window:-1", "radial:1:2", "dense", "window:2:sink", "window:token", "window:2:block")
    for bad in (*bads, "window:2:token:nosink", "radial:token:0.5", "radial:token:token"):
        with pytest.raises(ValueError, match="attention"):
            parse_attention(bad)
    with pytest.raises(ValueError, match="'window:W:nosink'.*with ':token' appended"):
        parse_attention("window:2:block")
    with pytest.raises(ValueError, match="granularity must be one of"):
        TemporalWindowAttention(2, granularity="tokens")


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-dit-sparse")
    make_diffusers_dit("cogvideox-5b", seed=2).save_pretrained(folder)
    return load_dit(folder, dtype=torch.float32, device="cpu")


def test_sparse_parts_in_the_denoiser(dit):
    """A covering window equals the dense DiT call; a narrow window changes it; both reuse one attention object."""
    g = torch.Generator().manual_seed(4)
    x, context = torch.randn(2, 4, 5, 4, 6, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        dense = Denoiser(dit)(x, 500, context)
        covering = Denoiser(dit, attention=TemporalWindowAttention(4))(x, 500, context)
        narrow_part = TemporalWindowAttention(0, sink=False, granularity="token")
        narrow = Denoiser(dit, attention=narrow_part)(x, 500, context)
        # 37 tokens (7 text, 5 frames of 6): one 128-token block, so the block-granular window is dense.
        one_block = Denoiser(dit, attention=TemporalWindowAttention(0, sink=False))(x, 500, context)
    assert torch.allclose(covering, dense, atol=1e-5, rtol=0)
    assert torch.allclose(one_block, dense, atol=1e-5, rtol=0)
    assert (narrow - dense).abs().max() > 1e-3
    assert Denoiser(dit, attention=narrow_part).parts()["attention"] == "window0-nosink-token"
    assert len(narrow_part._built) == 1


@pytest.mark.parametrize(
    "spec", ["window:2", "window:0:nosink", "window:3:token", "radial", "radial:0.5", "radial:token"]
)
def test_a_mask_part_gives_back_the_spec_that_made_it(spec):
    assert parse_attention(spec).spec == spec  # what a video's settings record, so --like rebuilds the mask


def test_a_mask_built_with_arguments_no_spec_expresses_has_no_spec():
    from diffsynth_cog.denoise.masks import RadialAttention, TemporalWindowAttention

    assert RadialAttention(min_width=64).spec is None
    assert TemporalWindowAttention(2, block_size=64).spec is None
