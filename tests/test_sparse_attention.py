"""Block-sparse attention parts: each mask against its definition written out here, FlexAttention against masked
SDPA, the block mask against torch's create_block_mask, a covering window against dense attention, training on
the CPU, and the parts inside the denoiser and the pipeline. fp32 on the CPU (FlexAttention's eager path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_diffusers_dit
from torch.nn.attention.flex_attention import create_block_mask

from diffsynth_cog.denoiser import Denoiser
from diffsynth_cog.loading.dit_loader import load_dit
from diffsynth_cog.models.dit import TokenLayout
from diffsynth_cog.sparse_attention import (
    RadialAttention,
    TemporalWindowAttention,
    block_mask_from_mask_mod,
    parse_attention,
)

LAYOUT = TokenLayout(n_text=5, grid=(9, 4, 6))  # 9 latent frames of 24 tokens: 221 tokens


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


@pytest.mark.parametrize("window,sink,extra", [(0, True, 0), (2, True, 0), (1, False, 0), (2, True, 11)])
def test_window_mask_is_its_definition_and_flex_equals_masked_sdpa(window, sink, extra):
    attend = TemporalWindowAttention(window, sink=sink, block_size=16).build(LAYOUT, torch.device("cpu"))
    length = LAYOUT.n_tokens + extra  # extra: padding a sequence split may add
    want_mask = window_reference(LAYOUT, window, sink, length)
    assert torch.equal(attend.dense_mask(length), want_mask)
    q, k, v = qkv(LAYOUT, extra)
    with torch.no_grad():
        got = attend(q, k, v)
    assert torch.allclose(got, masked_sdpa(q, k, v, want_mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("min_width,decay", [(8, 1.0), (4, 0.5)])
def test_radial_mask_is_its_definition_and_flex_equals_masked_sdpa(min_width, decay):
    part = RadialAttention(decay=decay, min_width=min_width, block_size=16)
    attend = part.build(LAYOUT, torch.device("cpu"))
    want_mask = radial_reference(LAYOUT, min_width, decay)
    got_mask = attend.dense_mask(LAYOUT.n_tokens)
    assert torch.equal(got_mask, want_mask)
    # The bands thin out with distance: some frame pairs dropped, some partially kept.
    assert 0.2 < want_mask.float().mean() < 0.9
    q, k, v = qkv(LAYOUT, seed=1)
    with torch.no_grad():
        got = attend(q, k, v)
    assert torch.allclose(got, masked_sdpa(q, k, v, want_mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_size", [16, 32])
def test_block_mask_equals_torch_create_block_mask(block_size):
    for part in (TemporalWindowAttention(1, block_size=block_size), RadialAttention(min_width=8)):
        attend = part.build(LAYOUT, torch.device("cpu"))
        for length in (LAYOUT.n_tokens, LAYOUT.n_tokens + 40):
            ours = block_mask_from_mask_mod(attend.mask_mod, length, "cpu", block_size)
            ref = create_block_mask(attend.mask_mod, None, None, length, length, device="cpu", BLOCK_SIZE=block_size)
            assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
            assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
            assert torch.equal(ours.to_dense(), ref.to_dense())
            if isinstance(part, TemporalWindowAttention):
                assert not bool(ours.to_dense().all())  # distant frames' blocks are skipped


def test_a_window_covering_every_frame_is_dense_attention():
    for part in (TemporalWindowAttention(8), TemporalWindowAttention(8, sink=False), RadialAttention(dense_distance=8)):
        attend = part.build(LAYOUT, torch.device("cpu"))
        assert bool(attend.dense_mask(LAYOUT.n_tokens).all())
        q, k, v = qkv(LAYOUT, seed=2)
        with torch.no_grad():
            got = attend(q, k, v)
        assert torch.allclose(got, masked_sdpa(q, k, v, None), atol=1e-5, rtol=0)


def test_masks_train_on_the_cpu_with_the_gradients_of_the_masked_attention():
    attend = TemporalWindowAttention(1).build(LAYOUT, torch.device("cpu"))
    q, k, v = qkv(LAYOUT, seed=3, grad=True)
    attend(q, k, v).square().sum().backward()
    mask = window_reference(LAYOUT, 1, True, LAYOUT.n_tokens)
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
    assert not parse_attention("window:1:nosink").sink
    assert parse_attention("radial").name == "radial" and parse_attention("radial:0.5").decay == 0.5
    for bad in ("window", "window:x", "window:-1", "radial:1:2", "dense", "window:2:sink"):
        with pytest.raises(ValueError, match="attention"):
            parse_attention(bad)


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
        narrow_part = TemporalWindowAttention(0, sink=False)
        narrow = Denoiser(dit, attention=narrow_part)(x, 500, context)
    assert torch.allclose(covering, dense, atol=1e-5, rtol=0)
    assert (narrow - dense).abs().max() > 1e-3
    assert Denoiser(dit, attention=narrow_part).parts()["attention"] == "window0-nosink"
    assert len(narrow_part._built) == 1
