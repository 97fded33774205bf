"""Opt-in quantized Linear layers for the CogVideoX DiT (inference, and a frozen base for LoRA training).

Two modes, chosen with ``quantize_dit(dit, mode)``; both swap the eight Linear layers of every
block (``BLOCK_LINEAR_TARGETS``: attention q/k/v/out, the two feed-forward layers and the two
AdaLN modulation layers) in place and leave everything else (patch embedding, text projection,
time embedding, norms, output projection) in the model's dtype:

* ``"fp8"``: speed. ``Float8Linear`` runs its matmul on fp8 e4m3 tensor cores (``torch._scaled_mm``,
  row-wise scales); needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell).
* ``"int8"``: memory. ``Int8WeightLinear`` stores int8 weights and dequantizes them on every call; any
  device.

In two halves, as :mod:`diffsynth_cog.lora`:

* :mod:`.layers`: the layers and their maths (row-wise fp8 / int8 quantization that gives the same
  bits on every device, the CPU emulation of the fp8 kernel, the frozen-base backward for training);
* :mod:`.swap`: the whole-model swap (``quantize_dit``, ``dequantize_dit``, ``quantized_layers``) and
  the checks it makes before touching the model.

Memory (weights): an fp8 or int8 layer holds 1 byte per weight + 4 bytes per output channel + the
bias in the model's dtype; the original bf16/fp32 weight is not kept anywhere (``from_linear`` does
not hold a reference to it, so an in-place ``quantize_dit`` frees each bf16 weight as it goes, unless
something else, such as another model sharing the tensors, still references it). For CogVideoX-5B
the block Linear weights are 5.549 B of the 5.570 B parameters, so the DiT shrinks from 10.4 GiB
(bf16) to about 5.2 GiB in either mode.

Accuracy (measured in ``tests/test_quantization.py``): e4m3 keeps 3 mantissa bits, so a matmul of
quantized operands on random data is off by ~3-4% relative to the fp32 result; int8 per-channel
weights alone give ~0.5-1%. Quantize after merging LoRAs (``merge_lora``): a quantized layer has no
full-precision weight to merge into, and an injected training ``LoRALinear`` is refused.
"""

from diffsynth_cog.errors import QuantizationError
from diffsynth_cog.quantization.layers import (
    FP8_DTYPE,
    FP8_MAX,
    FP8_MIN_CAPABILITY,
    INT8_MAX,
    Float8Linear,
    Int8WeightLinear,
    fp8_quantize_rows,
    int8_quantize_rows,
)
from diffsynth_cog.quantization.swap import MODES, dequantize_dit, quantize_dit, quantized_layers

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "FP8_MIN_CAPABILITY",
    "INT8_MAX",
    "MODES",
    "Float8Linear",
    "Int8WeightLinear",
    "QuantizationError",
    "dequantize_dit",
    "fp8_quantize_rows",
    "int8_quantize_rows",
    "quantize_dit",
    "quantized_layers",
]
