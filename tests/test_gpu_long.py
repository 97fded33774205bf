"""The long-video parts on a GPU: compiled FlexAttention with our block masks against masked SDPA (forward and
backward), a covering window against dense attention, the masks inside compiled blocks, the block mask built on
the GPU, windows / TeaCache in compiled blocks, and CogVideoX 1.5's temporal patches in compiled blocks.

Skipped without a CUDA GPU (CI has none):

    python -m pytest -q tests/test_gpu_long.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from diffsynth_cog.configs import dit_preset
from diffsynth_cog.denoise.denoiser import Denoiser
from diffsynth_cog.denoise.masks import RadialAttention, TemporalWindowAttention, block_mask_from_mask_mod
from diffsynth_cog.denoise.teacache import TeaCache
from diffsynth_cog.denoise.windows import WindowSpec
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.models.tokens import TokenLayout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# 226 text tokens and 9 frames of 30 x 45 patches (the 480x720 grid): 12,376 tokens, frames not block-aligned.
LAYOUT = TokenLayout(n_text=226, grid=(9, 30, 45))
PARTS = [
    TemporalWindowAttention(1),
    TemporalWindowAttention(2, sink=False),
    RadialAttention(min_width=256),
    RadialAttention(),
    TemporalWindowAttention(1, granularity="token"),
    RadialAttention(min_width=256, granularity="token"),
    TemporalWindowAttention(2, granularity="frame"),  # frame by frame with the dense kernel (FA3 in bf16 on Hopper)
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def qkv(dtype: torch.dtype, heads: int = 4, grad: bool = False, extra: int = 0) -> list[torch.Tensor]:
    g = torch.Generator("cuda").manual_seed(0)
    shape = (2, LAYOUT.n_tokens + extra, heads, 64)
    return [torch.randn(shape, device="cuda", generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def masked_sdpa(q, k, v, mask):
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("part", PARTS, ids=lambda p: p.name)
def test_compiled_flex_equals_masked_attention(part):
    attend = part.build(LAYOUT, torch.device("cuda"))
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
        q, k, v = qkv(dtype)
        with torch.no_grad():
            got = attend(q, k, v)
        want = masked_sdpa(q, k, v, attend.dense_mask(LAYOUT.n_tokens))
        assert got.dtype == dtype and rel(got, want) < tol


@pytest.mark.parametrize("granularity", ["block", "token", "frame"])
def test_padded_sequences_mask_the_padding_keys(granularity):
    attend = TemporalWindowAttention(1, granularity=granularity).build(LAYOUT, torch.device("cuda"))
    q, k, v = qkv(torch.float32, extra=100)
    with torch.no_grad():
        got = attend(q, k, v)
    want = masked_sdpa(q, k, v, attend.dense_mask(LAYOUT.n_tokens + 100))
    assert rel(got[:, : LAYOUT.n_tokens], want[:, : LAYOUT.n_tokens]) < 1e-4


def test_a_covering_window_is_dense_attention_on_the_gpu():
    attend = TemporalWindowAttention(8).build(LAYOUT, torch.device("cuda"))
    q, k, v = qkv(torch.float32)
    with torch.no_grad():
        assert rel(attend(q, k, v), masked_sdpa(q, k, v, None)) < 1e-4


@pytest.mark.parametrize("granularity", ["block", "token"])
def test_block_mask_built_on_the_gpu_equals_the_cpu_one(granularity):
    part = RadialAttention(granularity=granularity)
    gpu = part.build(LAYOUT, torch.device("cuda")).block_masks[LAYOUT.n_tokens]
    cpu = block_mask_from_mask_mod(part.build(LAYOUT, torch.device("cpu")).mask_mod, LAYOUT.n_tokens, "cpu")
    assert torch.equal(gpu.to_dense().cpu(), cpu.to_dense())
    assert torch.equal(gpu.full_kv_num_blocks.cpu(), cpu.full_kv_num_blocks)


@pytest.mark.parametrize("granularity", ["block", "token", "frame"])
def test_masks_train_through_flex_attention_backward(granularity):
    attend = TemporalWindowAttention(1, granularity=granularity).build(LAYOUT, torch.device("cuda"))
    q, k, v = qkv(torch.float32, grad=True)
    attend(q, k, v).square().sum().backward()
    mask = attend.dense_mask(LAYOUT.n_tokens)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    masked_sdpa(q2, k2, v2, mask).square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert rel(a.grad, b.grad) < 1e-3


def small_dit() -> CogDiT:
    config = dataclasses.replace(dit_preset("cogvideox-5b"), num_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return CogDiT(config).to(torch.bfloat16).eval().requires_grad_(False)


def dit_inputs(dit: CogDiT, frames: int = 9):
    c = dit.config
    g = torch.Generator("cuda").manual_seed(1)
    latents = torch.randn(2, c.in_channels, frames, 60, 90, device="cuda", generator=g, dtype=torch.bfloat16)
    prompt = torch.randn(2, 226, c.text_embed_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    return latents, prompt


def test_masks_windows_and_teacache_inside_fullgraph_compiled_blocks():
    dit = small_dit()
    x, prompt = dit_inputs(dit)
    cases = [
        dict(attention=TemporalWindowAttention(1)),
        dict(attention=RadialAttention()),
        dict(attention=RadialAttention(granularity="token")),
        dict(windows=WindowSpec(frames=17, overlap=0.4)),
        dict(attention=TemporalWindowAttention(8)),  # covers all 9 frames: dense
    ]
    with torch.no_grad():
        dense = Denoiser(dit)(x, 500, prompt)
        eager = [Denoiser(dit, **case)(x, 500, prompt) for case in cases]
        dit.compile_blocks(fullgraph=True, dynamic=False)
        for case, want in zip(cases, eager, strict=True):
            denoiser = Denoiser(dit, **case)
            assert rel(denoiser(x, 500, prompt), want) < 2e-2
            assert rel(denoiser(x, 400, prompt), Denoiser(dit, **case)(x, 400, prompt)) < 1e-6  # no recompile drift
        assert rel(eager[-1], dense) < 2e-2
        cache = TeaCache(0.0, coefficients=(1.0, 0.0))
        skipper = Denoiser(dit, attention=TemporalWindowAttention(1), step_skip=cache)
        skipper.start(2)
        assert rel(skipper(x, 500, prompt), eager[0]) < 2e-2
        skipper.end_step()
        skipper(x, 480, prompt)
        skipper.end_step()
        assert cache.stats()["computed"] == 2  # threshold 0: nothing skipped


def test_15_masks_and_windows_in_temporal_patches_inside_fullgraph_compiled_blocks():
    """CogVideoX 1.5's layout (temporal patches of 2, RoPE sliced from the max grid, I2V's ofs embedding) through
    compiled blocks, in fp32 so that each part's effect (~1e-3 of the output at random weights) stands far above
    the compiler's rounding: each part gives its eager result, and a window covering every patch is dense."""
    config = dataclasses.replace(dit_preset("cogvideox1.5-5b-i2v"), num_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    with torch.device("cuda"):
        dit = CogDiT(config).eval().requires_grad_(False)
    g = torch.Generator("cuda").manual_seed(2)
    # 10 latent frames = 5 temporal patches of 30 x 45 patches (a 480x720 crop of the 768x1360 grid): 6,750 tokens.
    x = torch.randn(2, 32, 10, 60, 90, device="cuda", generator=g)
    prompt = torch.randn(2, 226, config.text_embed_dim, device="cuda", generator=g)
    cases = [
        dict(attention=TemporalWindowAttention(1)),
        dict(attention=RadialAttention(granularity="token")),
        dict(windows=WindowSpec(frames=17, overlap=0.5, patch_t=2)),  # 5 latent frames -> windows of 6
        dict(attention=TemporalWindowAttention(1, granularity="token")),
        dict(attention=TemporalWindowAttention(1, granularity="frame")),  # the same window, frame by frame
    ]
    covering = dict(attention=TemporalWindowAttention(4))  # +-4 of 5 temporal patches: dense
    with torch.no_grad():
        dense = Denoiser(dit)(x, 500, prompt)
        eager = [Denoiser(dit, **case)(x, 500, prompt) for case in cases]
        assert rel(Denoiser(dit, **covering)(x, 500, prompt), dense) < 1e-5
        for case, want in zip(cases, eager, strict=True):
            assert rel(want, dense) > 1e-4, case  # the part changes the output at this length
        assert rel(eager[4], eager[3]) < 1e-5  # frame by frame = FlexAttention's token-exact window
        dit.compile_blocks(fullgraph=True, dynamic=False)
        for case, want in zip(cases, eager, strict=True):
            assert rel(Denoiser(dit, **case)(x, 500, prompt), want) < 2e-5, case
        assert rel(Denoiser(dit, **covering)(x, 500, prompt), dense) < 1e-5
