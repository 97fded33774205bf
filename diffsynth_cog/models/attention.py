"""Attention kernels behind one function, and how a DiT call chooses one.

``attention(q, k, v, backend)`` takes ``[B, L, H, D]`` tensors (the layout the projections produce,
so no transpose is needed for kernels that want it) and returns ``[B, L, H, D]``.

Choosing the kernel, most specific first:
  * per call: ``with attention_backend("fa3"): pipe(...)`` (or ``dit(...)``) for every model called
    inside the block (a context variable, so threads and tasks do not see each other's choice);
  * per model: ``dit.set_attention_backend("fa3")``;
  * per process: ``set_attention_backend("fa3")``, the default of every model (initially ``"auto"``).
A DiT call resolves the choice once, when it embeds its inputs, into a :class:`DenseAttention`
that its blocks call; other attention parts (masks, sequence splits) take the same place.

Exact backends (same math as the reference, bf16 rounding aside):
  * ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` with PyTorch's own choice.
  * ``"sdpa-cudnn"``: the same, preferring the cuDNN kernel (fastest of PyTorch's on Hopper at
    CogVideoX shapes), falling back to flash / memory-efficient / math.
  * ``"fa3"``: FlashAttention-3, the Hopper kernel, from the official ``flash_attn_interface``
    build or the forward-only ``fa3-fwd`` wheel (``fa3_fwd_interface``); bf16 only. The
    forward-only build cannot train, so calls that need a gradient fall back to ``sdpa-cudnn``.
  * ``"flash-attn"``: the ``flash_attn`` (FlashAttention-2) package, when installed.

Opt-in approximate backends (faster, not exact; see BENCHMARKS.md for their error):
  * ``"fa3-fp8"``: q, k and v quantized to float8 e4m3 with one scale per (batch, head) (keys
    centred first, which the softmax cannot see), then FlashAttention-3's fp8 kernel. Inference only.
  * ``"sage"``: ``sageattention`` (8-bit QK).

``"auto"`` (default): ``fa3`` on compute capability 9.x when it is installed, else ``sdpa-cudnn``
on CUDA devices of compute capability >= 9.0, else ``sdpa``.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import importlib.util
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "sdpa-cudnn", "fa3", "flash-attn", "fa3-fp8", "sage")
APPROXIMATE_BACKENDS = ("fa3-fp8", "sage")
# FlashAttention-3 ships as the official Hopper build (forward and backward) or as the
# forward-only ``fa3-fwd`` wheel; the first one found is used.
FA3_MODULES = ("flash_attn_interface", "fa3_fwd_interface")
FP8_MAX = 448.0  # largest finite float8 e4m3fn value
_backend = "auto"
_call_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention_backend", default=None)

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""What a DiT's attention layers call: q, k, v [B, L, H, D] -> [B, L, H, D]."""


@functools.cache
def _fa3_module() -> ModuleType | None:
    for name in FA3_MODULES:
        if importlib.util.find_spec(name) is not None:
            try:
                return importlib.import_module(name)
            except (ImportError, OSError) as e:  # a build for another torch/CUDA: say why, use another kernel
                logger.warning("FlashAttention-3 module %s is installed but does not load: %s", name, e)
    return None


@torch.compiler.assume_constant_result  # compiled blocks must not trace the import machinery (a graph break)
def fa3_available() -> bool:
    """True when a FlashAttention-3 build imports in this process."""
    return _fa3_module() is not None


@torch.compiler.assume_constant_result
def _fa3_trains() -> bool:
    module = _fa3_module()
    return module is not None and module.__name__ == "flash_attn_interface"


def check_backend(name: str) -> str:
    """``name`` if it is a known backend whose package imports here; ValueError saying what to install otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {BACKENDS}")
    if name == "flash-attn" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("attention backend 'flash-attn' needs the flash-attn package (pip install flash-attn)")
    if name in ("fa3", "fa3-fp8") and not fa3_available():
        raise ValueError(
            f"attention backend {name!r} needs FlashAttention-3: the Hopper build of flash-attention "
            "(module flash_attn_interface) or the fa3-fwd wheel (pip install fa3-fwd)"
        )
    if name == "sage" and importlib.util.find_spec("sageattention") is None:
        raise ValueError("attention backend 'sage' needs the sageattention package (pip install sageattention)")
    return name


def set_attention_backend(name: str) -> None:
    """Selects the default attention kernel of every model in this process (see the module docstring)."""
    global _backend
    _backend = check_backend(name)
    logger.info("attention backend: %s", name)


def get_attention_backend() -> str:
    """The process-wide default."""
    return _backend


@contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Every DiT call inside the block uses ``name``, whatever its model's or the process's setting."""
    token = _call_backend.set(check_backend(name))
    try:
        yield
    finally:
        _call_backend.reset(token)


def choose_backend(model_backend: str | None = None) -> str:
    """The backend a DiT call uses: the per-call choice, else the model's, else the process default."""
    return _call_backend.get() or model_backend or _backend


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


# FlashAttention-3 is wrapped as a custom op with a shape-only fake, so torch.compile keeps a
# whole block in one graph around it (the kernel itself stays opaque to the compiler).
@torch.library.custom_op("diffsynth_cog::fa3", mutates_args=())
def _fa3_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> torch.Tensor:
    module = _fa3_module()
    if module is None:
        raise RuntimeError("FlashAttention-3 is not installed (flash_attn_interface or fa3_fwd_interface)")
    out = module.flash_attn_func(q, k, v, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    return out[0] if isinstance(out, tuple) else out


@_fa3_op.register_fake
def _(q, k, v, q_descale=None, k_descale=None, v_descale=None):  # noqa: ANN001, ANN202
    dtype = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
    return q.new_empty(q.shape, dtype=dtype)


def _fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.dtype != torch.bfloat16 or (torch.is_grad_enabled() and not _fa3_trains() and _needs_grad(q, k, v)):
        return _sdpa_cudnn(q, k, v)  # fp16/fp32, or training with the forward-only build
    return _fa3_op(q, k, v)


def quantize_fp8_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> (float8 e4m3fn [B, L, H, D], descale [B, H] fp32) with x ~= x8 * descale.

    One scale per (batch, head) maps that head's largest magnitude to the format's largest
    finite value (448), so nothing saturates; ``descale`` is what FlashAttention-3 multiplies back.
    """
    amax = x.abs().amax(dim=(1, 3)).float().clamp_min(1e-12)  # [B, H]
    scale = FP8_MAX / amax
    x8 = (x.float() * scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return x8, scale.reciprocal()


def _fa3_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if _needs_grad(q, k, v) and torch.is_grad_enabled():
        raise RuntimeError("attention backend 'fa3-fp8' is inference only; use 'auto' or 'fa3' for training")
    # Subtracting one vector from every key shifts each query's logits by a constant, which the
    # softmax ignores; keys of trained DiTs share large per-channel offsets, so removing the mean
    # key first lets each head's fp8 scale cover only what varies (SageAttention's "smooth K").
    k = k.float()
    k = k - k.mean(dim=1, keepdim=True)  # [B, L, H, D], fp32
    (q8, qd), (k8, kd), (v8, vd) = (quantize_fp8_per_head(t) for t in (q, k, v))
    return _fa3_op(q8, k8, v8, qd, kd, vd).to(q.dtype)


def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return any(t.requires_grad for t in tensors)


_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sdpa": _sdpa,
    "sdpa-cudnn": _sdpa_cudnn,
    "fa3": _fa3,
    "flash-attn": _flash_attn,
    "fa3-fp8": _fa3_fp8,
    "sage": _sage,
}


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The kernel that ``backend`` (default: the process default) means for tensors on ``device``."""
    backend = backend or _backend
    if backend != "auto":
        return backend
    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        if major == 9 and fa3_available():
            return "fa3"
        if major >= 9:
            return "sdpa-cudnn"
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Full (non-causal) multi-head attention. q, k, v: [B, L, H, D] -> [B, L, H, D].

    ``backend``: one of ``BACKENDS`` (default: the process default)."""
    name = resolve_backend(q.device, backend)
    if name not in ("sdpa", "sdpa-cudnn") and (
        q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16)
    ):
        name = "sdpa"  # the other kernels only take half precision on CUDA
    return _KERNELS[name](q, k, v)


@dataclass(frozen=True)
class DenseAttention:
    """Full attention over the whole sequence with one backend: the default attention part of a DiT call."""

    backend: str = "auto"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, self.backend)


@functools.cache
def dense_attention(backend: str) -> DenseAttention:
    """One shared instance per backend, so compiled blocks see the same object from call to call."""
    return DenseAttention(check_backend(backend))
