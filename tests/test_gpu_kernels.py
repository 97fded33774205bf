"""The GPU kernels themselves: FlashAttention-3 (exact and fp8) and the VAE's split GroupNorm on CUDA.

Skipped without a CUDA GPU (CI has none); run on a Hopper machine with FlashAttention-3 installed:

    python -m pytest -q tests/test_gpu_kernels.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from diffsynth_cog.configs import dit_preset
from diffsynth_cog.lora import inject_lora
from diffsynth_cog.models import attention as attn
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.models.vae_blocks import GroupNorm

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
fa3 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9 or not attn.fa3_available(),
    reason="needs a Hopper GPU with FlashAttention-3 installed",
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def qkv(length: int = 1000, heads: int = 4, dim: int = 64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator("cuda").manual_seed(0)
    return tuple(torch.randn(2, length, heads, dim, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))


@pytest.fixture
def backend():
    yield attn.set_attention_backend
    attn.set_attention_backend("auto")


@fa3
def test_fa3_is_as_exact_as_cudnn(backend):
    q, k, v = qkv()
    want = exact(q, k, v)
    backend("fa3")
    got = attn.attention(q, k, v)
    backend("sdpa-cudnn")
    base = attn.attention(q, k, v)
    assert got.dtype == torch.bfloat16 and rel(got, want) <= 2 * rel(base, want) + 1e-4


@fa3
def test_fa3_fp8_stays_within_fp8_error(backend):
    q, k, v = qkv()
    backend("fa3-fp8")
    with torch.no_grad():
        got = attn.attention(q, k, v)
    assert got.dtype == torch.bfloat16 and rel(got, exact(q, k, v)) < 0.1


def small_dit() -> CogDiT:
    config = dataclasses.replace(dit_preset("cogvideox-5b"), num_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return CogDiT(config).to(torch.bfloat16)


def dit_inputs(dit: CogDiT) -> tuple[torch.Tensor, ...]:
    c = dit.config
    g = torch.Generator("cuda").manual_seed(1)
    latents = torch.randn(2, c.in_channels, 3, 8, 12, device="cuda", generator=g, dtype=torch.bfloat16)
    prompt = torch.randn(2, 16, c.text_embed_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    return latents, torch.tensor([500, 500], device="cuda"), prompt


@fa3
def test_training_with_the_forward_only_fa3_installed_uses_cudnn_and_matches(backend):
    dit = small_dit()
    inject_lora(dit, ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out"], rank=4)
    dit.enable_gradient_checkpointing()
    latents, t, prompt = dit_inputs(dit)
    backend("auto")
    out = dit(latents, t, prompt)
    out.float().square().mean().backward()
    grads = [p.grad for p in dit.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    backend("sdpa-cudnn")
    with torch.no_grad():
        assert rel(out.detach(), dit(latents, t, prompt)) < 1e-2


@fa3
def test_compiled_blocks_run_fa3_and_match_eager(backend):
    dit = small_dit().eval().requires_grad_(False)
    latents, t, prompt = dit_inputs(dit)
    backend("fa3")
    with torch.no_grad():
        eager = dit(latents, t, prompt)
        dit.compile_blocks(fullgraph=True)  # the custom op keeps attention inside the graph
        compiled = dit(latents, t, prompt)
    assert rel(compiled, eager) < 2e-2
    # The denoiser hands the blocks the same shared attention object: no recompilation, call after call,
    # whether through the DiT or the denoiser, with the kernel chosen per process, per model or per call.
    from diffsynth_cog.denoise.denoiser import Denoiser
    from diffsynth_cog.models.attention import attention_backend

    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        dit(latents, t, prompt)
        dit.set_attention_backend("fa3")
        Denoiser(dit)(latents, 500, prompt)
        with attention_backend("fa3"):
            Denoiser(dit, attention="fa3")(latents, 500, prompt)
    dit.set_attention_backend(None)


@cuda
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_split_group_norm_on_cuda_matches_torch_within_one_bf16_step(layout):
    g = torch.Generator("cuda").manual_seed(0)
    x = (torch.randn(1, 128, 4, 60, 90, device="cuda", generator=g) * 2 + 0.3).to(torch.bfloat16)
    norm = GroupNorm(32, 128, eps=1e-6).cuda().to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2, generator=g)
        norm.bias.normal_(0.0, 0.2, generator=g)
        want = F.group_norm(x, 32, norm.weight, norm.bias, 1e-6).float()
        got = norm(x.contiguous(memory_format=layout))
    assert got.is_contiguous(memory_format=layout)
    assert (got.float() - want).abs().max() <= want.abs().max() * 2**-7
