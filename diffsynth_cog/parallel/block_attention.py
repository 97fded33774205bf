"""Attention of queries against one block of keys, with the log-sum-exp: one step of ring attention.

Ring attention computes a query shard's attention block by block (one block of keys and values per
ring step) and merges the partial results with their softmax normalisers (log-sum-exp). So each
step needs a kernel that returns the log-sum-exp, which ``models.attention.attention`` does not. This
module maps every exact backend of ``models.attention`` to such a kernel:

  * ``sdpa`` / ``sdpa-cudnn``: PyTorch's fused SDPA kernels through their ``aten`` ops (cuDNN, flash,
    memory-efficient on CUDA; the flash kernel for the CPU), which return the log-sum-exp;
  * ``fa3``: FlashAttention-3 (``return_attn_probs=True`` returns it); ``flash-attn`` likewise;
  * ``fa3-fp8``: FlashAttention-3's fp8 kernel, as ``models.attention``'s ``fa3-fp8`` (keys centred,
    one scale per batch and head), except that the scales are taken per block and the keys are centred
    by one offset per rank (the same for all its blocks, so their log-sum-exps stay comparable):
    the same approximation, not bitwise the one-GPU fp8 result.

``sage`` has no block kernel here: ring attention refuses it (Ulysses takes every backend).
All kernels take and return ``[B, L, H, D]`` tensors; the log-sum-exp is ``[B, H, L]`` in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffsynth_cog.models import attention as attn
from diffsynth_cog.parallel.layout import ParallelError

BlockKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]
]
"""(q, k, v, key_offset) [B, L, H, D] -> (out [B, Lq, H, D], lse [B, H, Lq] float32); ``key_offset``
[B, 1, H, D] or None is subtracted from the keys by kernels that centre them (fp8)."""


def _lse(lse: torch.Tensor, length: int) -> torch.Tensor:
    # cuDNN returns [B, H, L, 1]; older memory-efficient kernels pad L to a multiple of 32.
    return lse.flatten(2)[:, :, :length].float()


def _heads_first(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.transpose(1, 2) for t in tensors]


def _sdpa_cpu(q, k, v, key_offset):  # noqa: ANN001, ANN202
    qh, kh, vh = _heads_first(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh)
    return out.transpose(1, 2), _lse(lse, q.shape[1])


def _sdpa_cuda(prefer_cudnn: bool) -> BlockKernel:
    # As sdpa-cudnn's priority list: cuDNN where it takes the inputs, else flash (half precision), else
    # memory-efficient (any dtype).
    def kernel(q, k, v, key_offset):  # noqa: ANN001, ANN202
        qh, kh, vh = _heads_first(q, k, v)
        half = q.dtype in (torch.float16, torch.bfloat16)
        if prefer_cudnn and half:
            try:
                out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qh, kh, vh, None, True)[:2]
                return out.transpose(1, 2), _lse(lse, q.shape[1])
            except RuntimeError:  # a shape or layout cuDNN does not take
                pass
        if half:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qh, kh, vh, None, True)[:2]
        return out.transpose(1, 2), _lse(lse, q.shape[1])

    return kernel


def _fa3(q, k, v, key_offset):  # noqa: ANN001, ANN202
    out, lse = attn._fa3_module().flash_attn_func(q, k, v, return_attn_probs=True)[:2]
    return out, _lse(lse, q.shape[1])


def _fa3_fp8(q, k, v, key_offset):  # noqa: ANN001, ANN202
    k = k.float()
    if key_offset is not None:
        k = k - key_offset
    (q8, qd), (k8, kd), (v8, vd) = (attn.quantize_fp8_per_head(t) for t in (q, k, v))
    out, lse = attn._fa3_module().flash_attn_func(
        q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, return_attn_probs=True
    )[:2]
    return out.to(q.dtype), _lse(lse, q.shape[1])


def _flash_attn(q, k, v, key_offset):  # noqa: ANN001, ANN202
    from flash_attn import flash_attn_func

    out, lse = flash_attn_func(q, k, v, return_attn_probs=True)[:2]
    return out, _lse(lse, q.shape[1])


def block_kernel(backend: str, device: torch.device, dtype: torch.dtype) -> tuple[str, BlockKernel]:
    """The kernel that dense attention with ``backend`` uses for ``dtype`` tensors on ``device`` (the same
    choice and fallbacks as ``models.attention.attention``), as a ring-step kernel; returns (name, kernel)."""
    name = attn.resolve_backend(device, backend)
    if name not in ("sdpa", "sdpa-cudnn") and (device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16)):
        name = "sdpa"  # as models.attention: the other kernels only take half precision on CUDA
    if name == "fa3" and dtype != torch.bfloat16:
        name = "sdpa-cudnn"  # as models.attention's fa3 fallback
    if device.type != "cuda" and name in ("sdpa", "sdpa-cudnn"):
        return name, _sdpa_cpu
    kernels: dict[str, BlockKernel] = {
        "sdpa": _sdpa_cuda(prefer_cudnn=False),
        "sdpa-cudnn": _sdpa_cuda(prefer_cudnn=True),
        "fa3": _fa3,
        "fa3-fp8": _fa3_fp8,
        "flash-attn": _flash_attn,
    }
    if name not in kernels:
        raise ParallelError(
            f"ring attention has no kernel for the attention backend {name!r} (it needs each block's log-sum-exp); "
            f"use one of {sorted(kernels)} with ring attention, or Ulysses alone (which takes every backend)"
        )
    return name, kernels[name]
