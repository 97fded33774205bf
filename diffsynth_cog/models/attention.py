"""Attention kernels behind one function, chosen once per process.

``attention(q, k, v)`` takes ``[B, L, H, D]`` tensors (the layout the projections produce, so
no transpose is needed for kernels that want it) and returns ``[B, L, H, D]``.

Backends:
  * ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` with PyTorch's own choice.
  * ``"sdpa-cudnn"``: the same, preferring the cuDNN kernel (measured fastest on Hopper at
    CogVideoX shapes), falling back to flash / memory-efficient / math.
  * ``"flash-attn"``: the ``flash_attn`` package, when installed.
  * ``"sage"``: ``sageattention`` (8-bit QK; opt-in, not exact).
  * ``"auto"`` (default): ``sdpa-cudnn`` on CUDA devices of compute capability >= 9.0, else ``sdpa``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "sdpa-cudnn", "flash-attn", "sage")
_backend = "auto"


def set_attention_backend(name: str) -> None:
    """Selects the attention kernel for every model in this process."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {BACKENDS}")
    if name == "flash-attn" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("attention backend 'flash-attn' needs the flash-attn package (pip install flash-attn)")
    if name == "sage" and importlib.util.find_spec("sageattention") is None:
        raise ValueError("attention backend 'sage' needs the sageattention package")
    _backend = name
    logger.info("attention backend: %s", name)


def get_attention_backend() -> str:
    return _backend


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [B, L, H, D] -> [B, H, L, D] views: SDPA accepts the strided layout without a copy.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sdpa_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return _sdpa(q, k, v)


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v)


def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sdpa": _sdpa,
    "sdpa-cudnn": _sdpa_cudnn,
    "flash-attn": _flash_attn,
    "sage": _sage,
}


def _resolve(device: torch.device) -> str:
    if _backend != "auto":
        return _backend
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return "sdpa-cudnn"
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (non-causal) multi-head attention. q, k, v: [B, L, H, D] -> [B, L, H, D]."""
    name = _resolve(q.device)
    if name in ("flash-attn", "sage") and (q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16)):
        name = "sdpa"  # these kernels only take half precision on CUDA
    return _KERNELS[name](q, k, v)
