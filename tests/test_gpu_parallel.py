"""Multi-GPU generation on CUDA: the ring's per-block kernels on one GPU, whole layouts on two.

Skipped without CUDA (the two-GPU test without two GPUs). Run on a 2-GPU machine:
    PYTHONPATH=$PWD python -m pytest -q tests/test_gpu_parallel.py
"""

from __future__ import annotations

import math

import pytest
import torch
from parallel_harness import ok, run_ranks

from diffsynth_cog.models import attention as attn
from diffsynth_cog.parallel.block_attention import block_kernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def math_attention(q, k, v):  # noqa: ANN001, ANN201 - [B, L, H, D] in float64
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    lse = logits.logsumexp(-1)  # [B, H, Lq]
    out = torch.einsum("bhqk,bkhd->bqhd", (logits - lse[..., None]).exp(), v.double())
    return out, lse


def available_backends() -> list[str]:
    names = ["sdpa", "sdpa-cudnn"]
    if attn.fa3_available():
        names += ["fa3", "fa3-fp8"]
    if attn.importlib.util.find_spec("flash_attn") is not None:
        names.append("flash-attn")
    return names


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_block_kernels_return_the_attention_and_its_log_sum_exp(backend, dtype):
    update_out_and_lse = pytest.importorskip("yunchang.ring.utils").update_out_and_lse  # the ring's merge

    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 333, 4, 64, device="cuda", generator=g, dtype=dtype) for _ in range(3))
    name, kernel = block_kernel(backend, q.device, dtype)
    approximate = name == "fa3-fp8"
    out, lse = kernel(q, k, v, None)
    want, want_lse = math_attention(q, k, v)
    tol = 0.1 if approximate else (2e-2 if dtype == torch.bfloat16 else 1e-4)
    assert ((out.double() - want).norm() / want.norm()).item() < tol, name
    assert (lse.double() - want_lse).abs().max().item() < (0.5 if approximate else 1e-2), name
    # two blocks of keys merged by their log-sum-exp = attention over all keys (one ring of two, on one GPU)
    offset = k.float().mean(dim=1, keepdim=True) if approximate else None
    merged, merged_lse = None, None
    for block in (slice(0, 200), slice(200, 333)):
        part_out, part_lse = kernel(q, k[:, block], v[:, block], offset)
        merged, merged_lse = update_out_and_lse(merged, merged_lse, part_out, part_lse)
    assert ((merged.double() - want).norm() / want.norm()).item() < tol, name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_give_the_one_gpu_latents(tmp_path):
    from parallel_cases import gpu_session

    got = ok(run_ranks(2, gpu_session, tmp_path, backend="nccl", timeout=600))
    leader = got[0]
    bf16_error = leader["bfloat16-single-vs-fp32"]  # what one GPU's bf16 rounding costs on this tiny model
    for tag, value in leader.items():
        if tag.endswith("transport"):
            continue
        if tag.endswith("equal"):
            assert value, tag
        elif tag.startswith("float32"):  # cuBLAS picks other algorithms for other batch sizes: 1e-4, not 1e-5
            assert value < 1e-4, (tag, value)
        elif tag.endswith("-vs-fp32"):  # bf16 on several GPUs is as close to the fp32 result as on one
            assert value < 1.5 * bf16_error + 1e-3, (tag, value, bf16_error)
    assert "bfloat16-compiled-ulysses2-vs-fp32" in leader and "bfloat16-ring2-vs-fp32" in leader
    assert leader["ulysses2-transport"] == "p2p" and leader["ulysses2-nccl-transport"] == "nccl"  # both exchanges ran
    assert all(v is None or isinstance(v, bool) or tag.endswith("single-vs-fp32") for tag, v in got[1].items())
