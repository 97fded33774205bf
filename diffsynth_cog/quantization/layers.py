"""The quantized Linear layers and their maths: ``Float8Linear`` (fp8 e4m3 matmuls) and ``Int8WeightLinear``.

Each replaces one frozen ``nn.Linear`` (``from_linear``); :mod:`diffsynth_cog.quantization.swap` puts
them into a model.

``Float8Linear`` (mode ``"fp8"``, speed) runs its matmul on fp8 e4m3 tensor cores through
``torch._scaled_mm`` with row-wise scales:

* the weight [N, K] is quantized once, one fp32 scale per output channel (amax of the row * 1/448;
  see "Same bits on every device" below), and kept as fp8 codes [N, K] (row-major, handed to
  ``_scaled_mm`` as the column-major view ``.t()`` [K, N] that it wants) plus a scale [1, N];
* the activation [M, K] (leading dims flattened) is quantized on every call, one scale per token
  (amax of the row * 1/448 rounded up to a power of two, scale [M, 1]; see ``fp8_quantize_rows``);
* ``out[m, n] = sa[m] * sw[n] * sum_k A8[m, k] W8[n, k] + bias[n]`` with fp32 accumulation, returned
  in the activation's dtype (bf16 for our models); the bias goes into the ``_scaled_mm`` call (it
  accepts a bf16/fp16 bias with row-wise scales when the output is bf16/fp16).

Needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell) and K, N multiples of 16
(``_scaled_mm``'s constraint; other layers stay ``nn.Linear``, which no CogVideoX block layer is).
On any other device the layer runs ``_emulate``: the same quantization followed by an fp32 matmul of
the dequantized operands. That path is for tests and CPU checks only (it is slower than the bf16
Linear it replaces), and exists so the quantization code the GPU runs is exercised on CPU.

``Int8WeightLinear`` (mode ``"int8"``, memory) stores int8 codes with one symmetric fp32 scale per
output channel (amax * 1/127) and dequantizes the weight to the activation dtype on every forward, then
calls ``F.linear``. The matmul itself is unchanged (bf16), so it costs the dequantization pass (cheap
next to a 35k-token matmul, dominant for the M=2 modulation layers) and saves memory only.

Memory (the weights: see :mod:`diffsynth_cog.quantization`): transient memory per fp8 layer call is
the activation's fp8 copy (M*K bytes) and one activation-sized temporary in its dtype while
quantizing (eager mode; ``torch.compile`` fuses the quantization into one kernel). Per int8 layer call:
one dequantized weight (N*K in the activation dtype, plus an fp32 temporary in eager mode).

Same bits on every device: quantizing a weight gives bit-identical codes and scales on the CPU and
on CUDA, so quantizing before or after offloading (``ModelOffloader``: the weights then live on the
CPU) makes no difference to the output. Every step is an operation that IEEE 754 defines to the bit
and that both devices' kernels implement so: the row amax (a max of absolute values), one fp32
multiplication ``amax * (1/448)`` (``1/127``) by a constant that is already an fp32 number
(``_FP8_STEP``, ``_INT8_STEP``), clamps, a tensor-by-tensor division ``w / scale``, round half to even,
and round-to-nearest-even casts of in-range values. What is avoided is dividing by a Python number:
torch's CUDA kernel computes ``x / 127.0`` as ``x * (1/127)`` (its reciprocal rounded to fp32), the
CPU kernel as an exact division, and the two differ in the last bit for about 5% of random rows
with 127 and 55% with 448 (enough to change a tiny random model's output by several percent, through
flipped codes and dequantized weights rounding the other way). ``tests/test_quantization.py`` replays
the quantizers with CUDA's kernel semantics on the CPU and checks the operations they run.

Training (a frozen quantized base under a LoRA): the layers' weights never train, but gradients flow
through them to the input. ``forward`` then runs :class:`_FrozenQuantizedLinear`, whose backward is
``grad_x = grad_y @ W_deq`` with the dequantized weight in the gradient's dtype (one [N, K] temporary per
layer, nothing saved between forward and backward: the codes are the layer's own buffers). For fp8 the
activation rounding of the forward is passed straight through. ``inject_lora`` wraps these layers
(``lora_base = True``) in a ``LoRALinear`` whose LoRA matrices train in fp32 as usual.

Do not call ``model.to(dtype)`` expecting the quantized codes to change: the layers keep their codes
and scales in their own dtypes (fp8/int8 and fp32) and follow device moves only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from diffsynth_cog.errors import QuantizationError
from diffsynth_cog.lora import LoRALinear

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448: e4m3fn has no infinities, overflow would be NaN
INT8_MAX = 127  # symmetric: -128 is never used, so q and -q are both representable
FP8_MIN_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0
_MM_ALIGNMENT = 16  # _scaled_mm wants K and N divisible by 16


def _fp32(value: float) -> float:
    """``value`` rounded to the nearest fp32 number, as a Python float (so every device reads it exactly)."""
    return torch.tensor(value, dtype=torch.float32).item()


# The scales are amax * step, one fp32 multiplication by an fp32 constant: the same bits on every
# device. (amax / 448 is not: CUDA divides by a Python number as a multiplication by its fp32
# reciprocal, the CPU exactly; see "Same bits on every device" in the module docstring.)
_FP8_STEP = _fp32(1 / FP8_MAX)
_INT8_STEP = _fp32(1 / INT8_MAX)
# A row of zeros would give scale 0 and 0/0 = NaN; any positive floor works since its codes are all 0.
_MIN_AMAX = _fp32(1e-12)


# ----------------------------------------------------------------------------------------------
# Quantization math (shared by the GPU path, the CPU emulation and the tests)


def fp8_quantize_rows(x: torch.Tensor, *, power_of_two_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise fp8 e4m3 quantization: x [M, K] -> (codes [M, K] float8_e4m3fn, scales [M, 1] float32).

    ``x ~= codes.float() * scales``, scale = amax(|row|) * ``_FP8_STEP`` (1/448, 448 being the e4m3
    max, as an fp32 number), computed in fp32; the same bits on every device (module docstring).

    power_of_two_scales: round each scale up to a power of two (what the layers do for activations).
    Dividing by a power of two is exact in any binary float format, so a bf16 activation is scaled
    in bf16 (no fp32 copy of a large activation in eager mode, no double rounding), and eager and
    ``torch.compile`` give bitwise the same codes (Inductor would otherwise fold a bf16-rounded scale
    back to fp32). e4m3's relative precision does not depend on the scale, so the error is the same
    (2.65% vs 2.64% rms on random rows); the row max lands in [224, 448] instead of at 448.
    """
    x = x if power_of_two_scales and x.dtype == torch.bfloat16 else x.float()
    # inf-norm reduction: the row amax without materialising |x| (exact in any dtype).
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True).float()  # [M, 1]
    scale = amax.clamp(min=_MIN_AMAX) * _FP8_STEP  # [M, 1]
    if power_of_two_scales:
        scale = _round_up_to_power_of_two(scale)
        # Exact division and scale >= amax / 448 (up to the fp32 roundings of 1/448 and of the
        # product, which at most make the row max a bf16/fp32 value <= 448 * (1 + 2^-23), cast to
        # 448): nothing can exceed 448, so no clamp pass is needed.
        codes = (x / scale.to(x.dtype)).to(FP8_DTYPE)  # [M, K]
    else:
        # The CPU's e4m3fn cast does not saturate (overflow is NaN; CUDA's may saturate): clamp, in
        # case rounding went above 448, so that both casts see in-range values only.
        codes = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # [M, K]
    return codes, scale


def _round_up_to_power_of_two(t: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= t, exactly, for positive normal fp32 values.

    Adding 2^23 - 1 to the bit pattern carries into the exponent unless the mantissa is already
    zero; masking to the exponent bits then drops the mantissa. (log2/ceil could round the wrong way.)
    """
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x007FFFFF) & 0x7F800000).view(torch.float32)


def int8_quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization: w [N, K] -> (codes [N, K] int8, scales [N, 1] float32).

    scale = amax(|row|) * ``_INT8_STEP`` (1/127 as an fp32 number) and codes = round(w / scale) (half
    to even), so ``|w - codes * scale| <= scale / 2``; the same bits on every device (module docstring).
    """
    w = w.float()
    amax = torch.linalg.vector_norm(w, ord=float("inf"), dim=-1, keepdim=True)  # [N, 1]
    scale = amax.clamp(min=_MIN_AMAX) * _INT8_STEP  # [N, 1]
    codes = torch.round(w / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)  # [N, K]
    return codes, scale


# ----------------------------------------------------------------------------------------------
# Layers


class _FrozenQuantizedLinear(torch.autograd.Function):
    """A quantized layer's product with a gradient for the input only (the weights are frozen codes).

    Backward: ``grad_x = grad_y @ W_deq`` in grad_y's dtype. Nothing is saved: the layer's buffers
    are the weights. Activation rounding (fp8) is passed straight through.
    """

    @staticmethod
    def forward(x: torch.Tensor, layer: _QuantizedLinear) -> torch.Tensor:
        return layer._product(x)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.layer = inputs[1]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # grad [..., N] -> [..., K]
        return grad @ ctx.layer.dequantized_weight(grad.dtype), None


class _QuantizedLinear(nn.Module):
    """Shared parts: shapes, the bias, dtype-stable code/scale buffers, and the frozen-base backward.

    ``qweight`` and ``weight_scale`` are persistent buffers (they are in the state dict). fp8 and
    fp32 count as floating point for ``Module.to(dtype)``, which would turn fp8 codes into bf16 and
    round the fp32 scales; ``_apply`` keeps their dtypes and lets them follow device moves only.
    """

    mode: str = ""
    _FIXED_DTYPE_BUFFERS = ("qweight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, source_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.source_dtype = source_dtype  # dtype of the weight that was quantized (for dequantize_dit)
        self.register_parameter("bias", None)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _QuantizedLinear:
        before = {name: self._buffers[name] for name in self._FIXED_DTYPE_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)  # a dtype cast: take the device move only
        return self

    # inject_lora may wrap this layer as the frozen base of a LoRALinear.
    lora_base = True

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: input has {x.shape[-1]} features (shape {list(x.shape)}), "
                f"the layer expects {self.in_features}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N]
        self._check_input(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenQuantizedLinear.apply(x, self)
        return self._product(x)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized layer's output for x [..., K] -> [..., N] (no autograd)."""
        raise NotImplementedError

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the codes and scales stand for, [N, K] in ``dtype`` (computed in fp32)."""
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes held by this layer's codes, scales and bias."""
        tensors = [self.qweight, self.weight_scale] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight (not the original: quantization is lossy).

        dtype defaults to the bias dtype (it follows the model's ``.to``), else the source dtype.
        """
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else self.source_dtype
        with torch.device("meta"):  # no init work for a weight replaced at once
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.dequantized_weight(dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode}"
        )


class Float8Linear(_QuantizedLinear):
    """Replacement of an ``nn.Linear`` whose matmul runs in fp8 e4m3 (row-wise scales); frozen.

    Buffers: ``qweight`` [N, K] float8_e4m3fn (row-major), ``weight_scale`` [1, N] float32; bias
    [N] in the source dtype. ``forward(x [..., K]) -> [..., N]`` in x's dtype (bf16 for our models).
    On CUDA it calls ``torch._scaled_mm`` (``_scaled``); on any other device ``_emulate`` computes
    the same quantized product in fp32 (tests / CPU only).

    use_fast_accum: let the fp8 tensor cores accumulate without periodic promotion to fp32
    (faster; what inference recipes use; a little less accurate for long K).
    """

    mode = "fp8"
    # Whether the bias goes into the _scaled_mm call (one fused epilogue) or is added afterwards.
    # torch accepts a bf16/fp16 bias with row-wise scales (cuBLASLt epilogue from CUDA 12.9, the
    # CUTLASS kernel before); set False on the class to rule it out if a build misbehaves.
    fuse_bias: bool = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        use_fast_accum: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        if in_features % _MM_ALIGNMENT or out_features % _MM_ALIGNMENT:
            raise QuantizationError(
                f"Float8Linear needs in_features and out_features divisible by {_MM_ALIGNMENT} "
                f"(torch._scaled_mm), got {in_features} -> {out_features}"
            )
        super().__init__(in_features, out_features, dtype)
        self.use_fast_accum = use_fast_accum
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(1, out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)

    @staticmethod
    def supports(linear: nn.Linear) -> bool:
        """Whether ``_scaled_mm`` can take this layer's shape (K and N divisible by 16)."""
        return linear.in_features % _MM_ALIGNMENT == 0 and linear.out_features % _MM_ALIGNMENT == 0

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, use_fast_accum: bool = True) -> Float8Linear:
        """Quantizes ``linear``'s weight per output channel on the weight's device (fp32 math).

        The new layer lives on the same device; it keeps no reference to the original weight.
        """
        _check_plain_linear(linear)
        weight = linear.weight.detach()
        with torch.device("meta"):
            layer = cls(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                use_fast_accum=use_fast_accum,
                dtype=weight.dtype,
            )
        codes, scale = fp8_quantize_rows(weight.float())  # [N, K], [N, 1]
        layer.qweight = codes
        layer.weight_scale = scale.t().contiguous()  # [1, N]: _scaled_mm's row-wise scale of mat2 [K, N]
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.weight_scale.t()).to(dtype)  # [N, K]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]; a copy only if x's last dims are not contiguous
        out = self._scaled(x2) if x2.device.type == "cuda" else self._emulate(x2)  # [M, N]
        return out.reshape(*lead, self.out_features)

    def _scaled(self, x2: torch.Tensor) -> torch.Tensor:
        """The GPU path: x2 [M, K] -> [M, N] through ``torch._scaled_mm`` (row-wise scales)."""
        codes, scale_a = fp8_quantize_rows(x2, power_of_two_scales=True)  # [M, K] fp8, [M, 1] fp32
        codes = codes.contiguous()  # elementwise ops keep the input's strides; _scaled_mm wants row-major A
        # _scaled_mm takes bf16/fp16 outputs with a bias of the same dtype; an fp32 output takes no bias.
        out_dtype = x2.dtype if x2.dtype in (torch.bfloat16, torch.float16) else torch.float32
        fused_bias = self.bias is not None and out_dtype != torch.float32 and self.fuse_bias
        out = torch._scaled_mm(
            codes,
            self.qweight.t(),  # [K, N] column-major view of the row-major [N, K] codes
            scale_a=scale_a,  # [M, 1]
            scale_b=self.weight_scale,  # [1, N]
            bias=self.bias.to(out_dtype) if fused_bias else None,
            out_dtype=out_dtype,
            use_fast_accum=self.use_fast_accum,
        )  # [M, N]
        if self.bias is not None and not fused_bias:
            out = out + self.bias.to(out.dtype)
        return out.to(x2.dtype)

    def _emulate(self, x2: torch.Tensor) -> torch.Tensor:
        """For tests and CPU only: the same quantized product as ``_scaled``, as an fp32 matmul.

        ``(A8.float() * sa) @ (W8.float() * sw).T + bias``, returned in x2's dtype. Much slower than
        the Linear it replaces; it exists so the quantization the GPU runs can be checked anywhere.
        """
        codes, scale_a = fp8_quantize_rows(x2, power_of_two_scales=True)  # [M, K], [M, 1]
        out = (codes.float() * scale_a) @ self.dequantized_weight(torch.float32).t()  # [M, N]
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x2.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", use_fast_accum={self.use_fast_accum}"


class Int8WeightLinear(_QuantizedLinear):
    """Weight-only int8 ``nn.Linear`` replacement (memory mode; frozen).

    Buffers: ``qweight`` [N, K] int8, ``weight_scale`` [N, 1] float32; bias [N] in the source dtype.
    ``forward(x [..., K])`` dequantizes the weight to x's dtype and calls ``F.linear``, so the output
    equals ``F.linear(x, self.dequantized_weight(x.dtype), bias)`` exactly.
    """

    mode = "int8"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, dtype)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8WeightLinear:
        """Quantizes ``linear``'s weight per output channel (symmetric) on the weight's device."""
        _check_plain_linear(linear)
        weight = linear.weight.detach()
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=weight.dtype)
        layer.qweight, layer.weight_scale = int8_quantize_rows(weight)  # [N, K] int8, [N, 1] fp32
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # fp32 product, one rounding to dtype: codes up to 127 and the scale stay exact until then.
        return (self.qweight.float() * self.weight_scale).to(dtype)  # [N, K]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N]
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


def _check_plain_linear(linear: nn.Module) -> None:
    if isinstance(linear, LoRALinear):
        raise QuantizationError(
            "cannot quantize a LoRALinear (a LoRA injected for training): quantize after merging. "
            "Export it with export_lora(), merge_lora() the file into a freshly loaded DiT, then quantize."
        )
    if not isinstance(linear, nn.Linear):
        raise QuantizationError(f"expected an nn.Linear, got {type(linear).__name__}")
