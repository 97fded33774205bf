"""CUDA's arithmetic replayed on the CPU, and a check that a function runs only bit-exact operations.

Why: quantizing must give the same bits on the CPU and on CUDA (the offloader quantizes on the CPU
whatever the user quantizes after enabling it), and CI has no GPU. torch's CPU and CUDA kernels give
the same bits for the operations IEEE 754 rounds exactly once (elementwise add, mul, div,
comparisons, max/min, round half to even, round-to-nearest-even conversions of in-range values),
with one exception that matters here: for ``x / b`` where ``b`` is a Python number or a 0-dim CPU
tensor (a "CPU scalar"), the CUDA kernel computes ``x * (1 / b)``, the reciprocal rounded once to the
op's math type (fp32 for fp32, bf16 and fp16 tensors). aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu
says so: "this may lose one bit of precision compared to computing the division". The CPU kernel
(aten/src/ATen/native/cpu/BinaryOpsKernel.cpp, ``div_true_kernel``) divides.

``CudaReplay`` is a dispatch mode that runs a function on the CPU with that division computed the
way CUDA computes it, and records every aten op with its arguments:

* the replayed result equal to the plain CPU result means the function's divisions give CUDA's
  bits too;
* ``exactness_problems(records)`` names every op that is not one of the bit-exact kinds above (a
  sum, a matmul, an ``add`` with ``alpha`` that CUDA may fuse into an FMA, a scalar division by a
  non-power of two, a cast of out-of-range values, ...), so that the first claim covers the whole
  function.

tests/test_quantization.py checks on a GPU (skipped without one) that the replay computes what CUDA
computes, and that the quantizers give the same bits on both devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_DIVISIONS = {aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar}

# Ops whose results are defined to the bit by their inputs on any device (given the checks below).
_SHAPE_AND_COPY = {
    "view",
    "_unsafe_view",
    "reshape",
    "t",
    "transpose",
    "permute",
    "unsqueeze",
    "squeeze",
    "expand",
    "detach",
    "alias",
    "clone",
    "lift_fresh",
    "copy_",
    "slice",
    "select",
    "empty_like",
}
_SELECTIONS = {"abs", "amax", "amin", "max", "min", "maximum", "minimum", "clamp", "clamp_", "clamp_min", "clamp_max"}
_INTEGER_ONLY = {"bitwise_and", "bitwise_or", "bitwise_xor", "add", "add_", "sub", "sub_"}
_ELEMENTWISE = {"mul", "mul_", "div", "div_", "add", "add_", "sub", "sub_", "round", "_to_copy", "linalg_vector_norm"}

FP8_E4M3FN_CPU_NAN_ABOVE = 464.0  # c10's e4m3fn cast rounds |v| in (464, 480) up to the NaN code; CUDA 13 saturates


def is_cpu_scalar(x: Any) -> bool:
    """What CUDA's elementwise kernels treat as a CPU scalar: a Python number or a 0-dim CPU tensor."""
    return isinstance(x, (int, float, bool)) or (
        isinstance(x, torch.Tensor) and x.dim() == 0 and x.device.type == "cpu"
    )


def _fp32_exact(value: float) -> bool:
    return math.isnan(value) or torch.tensor(value, dtype=torch.float32).item() == value


def _is_power_of_two(value: float) -> bool:
    mantissa, _ = math.frexp(abs(value))
    return mantissa == 0.5


def cuda_divide_by_scalar(a: torch.Tensor, b: float | torch.Tensor) -> torch.Tensor:
    """``a / b`` as CUDA computes it when ``b`` is a CPU scalar: ``a * (1 / b)`` in the math type."""
    dtype = torch.result_type(a, b)
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # at::opmath_type
    inverse = torch.tensor(1.0, dtype=math_dtype) / torch.tensor(float(b), dtype=math_dtype)  # host: 1 / b, rounded
    return (a.to(math_dtype) * inverse).to(dtype)


@dataclass
class OpRecord:
    op: Any  # an OpOverload
    args: tuple
    kwargs: dict


class CudaReplay(TorchDispatchMode):
    """Runs CPU code with CUDA's division by a CPU scalar, recording every aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        self.records.append(OpRecord(func, args, kwargs))
        if func in _DIVISIONS and "rounding_mode" not in kwargs and is_cpu_scalar(args[1]):
            out = cuda_divide_by_scalar(*args)
            return args[0].copy_(out) if func in (aten.div_.Tensor, aten.div_.Scalar) else out
        return func(*args, **kwargs)


def _on_meta(record: OpRecord) -> bool:
    tensors = [a for a in (*record.args, *record.kwargs.values()) if isinstance(a, torch.Tensor)]
    return record.kwargs.get("device") == torch.device("meta") or any(t.device.type == "meta" for t in tensors)


def exactness_problems(records: list[OpRecord]) -> list[str]:
    """Why each recorded op might give different bits on another device; empty if none might."""
    problems = []
    for r in records:
        if _on_meta(r):  # layers built on the meta device and filled afterwards: no values computed
            continue
        name = r.op.overloadpacket.__name__
        a = r.args[0] if r.args else None
        rest = r.args[1:]
        where = f"{r.op}({', '.join(_describe(x) for x in r.args)})"
        if name in _SHAPE_AND_COPY or name in _SELECTIONS:
            continue
        if name in _INTEGER_ONLY and isinstance(a, torch.Tensor) and not a.is_floating_point():
            continue
        if name not in _ELEMENTWISE:
            problems.append(f"{where}: not an op with the same bits on every device")
        elif name in ("add", "add_", "sub", "sub_"):
            if r.kwargs.get("alpha", 1) != 1:
                problems.append(f"{where}: alpha != 1 (CUDA may fuse a + alpha * b into one FMA)")
            problems += _scalar_operand_problems(where, a, rest)
        elif name in ("mul", "mul_"):
            problems += _scalar_operand_problems(where, a, rest)
        elif name in ("div", "div_"):
            b = rest[0]
            if "rounding_mode" in r.kwargs:
                problems.append(f"{where}: division with a rounding mode")
            elif is_cpu_scalar(b) and not _is_power_of_two(float(b)):
                problems.append(
                    f"{where}: division by the CPU scalar {float(b)!r}; CUDA multiplies by its rounded reciprocal"
                )
        elif name == "round" and (rest or r.kwargs.get("decimals", 0)):
            problems.append(f"{where}: round with decimals")
        elif name == "linalg_vector_norm" and (rest[0] if rest else r.kwargs.get("ord", 2)) != math.inf:
            problems.append(f"{where}: a norm other than the max norm sums in a device-dependent order")
        elif name == "_to_copy":
            problems += _cast_problems(where, a, r.kwargs.get("dtype"))
    return problems


def _scalar_operand_problems(where: str, a: Any, rest: tuple) -> list[str]:
    b = rest[0] if rest else None
    if isinstance(a, torch.Tensor) and a.is_floating_point() and is_cpu_scalar(b) and not _fp32_exact(float(b)):
        return [f"{where}: the constant {float(b)!r} is not an fp32 number (rounded when read)"]
    return []


def _cast_problems(where: str, a: torch.Tensor, dtype: torch.dtype | None) -> list[str]:
    if dtype is None or not a.is_floating_point():
        return []
    values = a.float()
    if dtype == torch.float8_e4m3fn:
        beyond = values.abs() > FP8_E4M3FN_CPU_NAN_ABOVE  # infinities included, NaN (NaN either way) not
        if beyond.any():
            return [f"{where}: casts {int(beyond.sum())} values beyond e4m3's range (CPU: NaN, CUDA: may saturate)"]
    elif not dtype.is_floating_point and dtype != torch.bool:
        info = torch.iinfo(dtype)
        bad = (values != values.round()) | (values < info.min) | (values > info.max) | values.isnan()
        if bad.any():
            return [f"{where}: casts {int(bad.sum())} non-integral or out-of-range values to {dtype}"]
    return []


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {list(x.shape)} on {x.device.type}"
    return repr(x)


# ----------------------------------------------------------------------------------------------
# Comparing bits, with a message that says where


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.to(torch.uint8) if t.dtype == torch.bool else t.view(_INT_OF_SIZE[t.element_size()])


def _value(t: torch.Tensor) -> str:
    width = 2 * t.element_size()
    return f"{t.float().item():.9g} (0x{int(_bits(t).item()) & (16**width - 1):0{width}x})"


def bit_difference(got: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None if the tensors hold the same bits (same dtype and shape, any devices); else what differs:
    how many elements, the first differing index with both values (and their bits), the largest
    difference and the relative error."""
    if got.dtype != expected.dtype or got.shape != expected.shape:
        return f"got {got.dtype} {list(got.shape)}, expected {expected.dtype} {list(expected.shape)}"
    differ = _bits(got) != _bits(expected)
    count = int(differ.sum())
    if count == 0:
        return None
    first = tuple(int(i) for i in differ.nonzero()[0])
    a, b = got.detach().cpu(), expected.detach().cpu()
    message = (
        f"{count} of {differ.numel()} elements differ; first at {list(first)}: {_value(a[first])} vs {_value(b[first])}"
    )
    if a.is_floating_point():
        a64, b64 = a.double(), b.double()
        message += (
            f"; max |diff| {(a64 - b64).abs().max().item():.3g}, "
            f"rel err {((a64 - b64).norm() / b64.norm().clamp(min=1e-300)).item():.3g}"
        )
    return message
