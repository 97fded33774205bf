"""Quantized Linear layers: int8 weights (memory) and fp8 e4m3 matmuls (speed), on the CPU.

The fp8 GPU kernel cannot run here, so the fp8 tests check the quantization math through
``Float8Linear._emulate`` (the CPU path of the same layer) against quantizers written
independently in numpy fp32 (``quant_reference.py``; codes and scales equal bit for bit), and, where
this torch has a CPU ``torch._scaled_mm``, run the ``_scaled`` GPU path itself through a wrapper
that enforces the CUDA kernel's layout rules. Model-level tests use a tiny randomised CogDiT in fp32.

Same bits on every device: the quantizers are replayed with CUDA's arithmetic and their ops checked
(``cuda_semantics.py``); with a GPU (``python -m pytest -q tests/test_quantization.py``), the tests
marked ``needs_cuda`` also compare CPU and CUDA directly.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import quant_reference as reference
import torch
import torch.nn.functional as F
from cuda_semantics import CudaReplay, bit_difference, exactness_problems
from tiny_models import PRESET_FLAGS, TINY_DIT, randomize_
from torch import nn

from diffsynth_cog.configs import DiTConfig, dit_preset
from diffsynth_cog.lora import BLOCK_LINEAR_TARGETS, inject_lora
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.quantization import (
    FP8_DTYPE,
    Float8Linear,
    Int8WeightLinear,
    QuantizationError,
    dequantize_dit,
    fp8_quantize_rows,
    int8_quantize_rows,
    quantize_dit,
    quantized_layers,
)
from diffsynth_cog.quantization import layers as quant_layers
from diffsynth_cog.quantization import swap as quant_swap

E4M3_MANTISSA_BITS = 3
E4M3_MIN_SUBNORMAL = 2.0**-9


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_linear(k: int = 256, n: int = 128, seed: int = 0, std: float = 0.02) -> nn.Linear:
    """A Linear with weights and bias on the scale of a trained transformer's (std ~0.02)."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(k, n)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=g) * std)
        layer.bias.copy_(torch.randn(n, generator=g) * std)
    return layer


def activations(*shape: int, seed: int = 1) -> torch.Tensor:
    """Unit-scale activations (what follows a LayerNorm) with a few larger outliers per token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x * (1 + 4 * (torch.rand(*shape, generator=g) > 0.99))


def make_dit(preset: str = "cogvideox-5b", seed: int = 0) -> CogDiT:
    return randomize_(CogDiT(DiTConfig(**{**TINY_DIT, **PRESET_FLAGS[preset]})), seed).eval()


def dit_inputs(model: CogDiT, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    latents = torch.randn(2, c.in_channels, 3, 4, 6, generator=g)
    prompt = torch.randn(2, c.max_text_seq_length, c.text_embed_dim, generator=g)
    return latents, torch.tensor([999, 421]), prompt


def run(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return model(*x)


@pytest.fixture
def fp8_allowed(monkeypatch):
    """Lets quantize_dit build fp8 layers on this CPU-only machine (they run the emulation)."""
    monkeypatch.setattr(quant_swap, "_check_fp8_device", lambda model: None)


# ----------------------------------------------------------------------------------------------
# int8 weights


def test_int8_quantization_error_is_at_most_half_a_step_per_channel():
    w = make_linear(300, 64).weight.detach()
    w[3] *= 50  # channels of very different ranges: each must get its own scale
    w[5] = 0.0  # an all-zero channel must not produce NaN
    codes, scale = int8_quantize_rows(w)
    assert codes.dtype == torch.int8 and scale.shape == (64, 1) and scale.dtype == torch.float32
    expected_codes, expected_scale = reference.int8_rows(w)  # the fp32 steps spelled out in numpy
    assert torch.equal(scale, expected_scale) and torch.equal(codes, expected_codes)
    err = (w - codes.float() * scale).abs()  # [N, K]
    # round-to-nearest: at most half a step; 1e-6 relative slack for the fp32 division w / scale.
    assert (err <= scale / 2 + 1e-6 * w.abs()).all()
    assert codes.abs().amax(dim=1)[[0, 3]].tolist() == [127, 127]  # each row's amax maps to 127
    assert torch.isfinite(scale).all() and (codes[5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_f_linear_with_dequantized_weight(dtype):
    linear = make_linear().to(dtype)
    layer = Int8WeightLinear.from_linear(linear)
    x = activations(2, 5, 256).to(dtype)  # 3D input: leading dims pass through
    with torch.no_grad():
        got = layer(x)
        expected = F.linear(x, layer.dequantized_weight(dtype), linear.bias)
    assert got.dtype == dtype and got.shape == (2, 5, 128)
    assert torch.equal(got, expected)  # exact: the layer is defined as this
    # And the dequantized weight is the original up to half a step per channel.
    step = layer.weight_scale  # [N, 1]
    assert ((layer.dequantized_weight() - linear.weight.float()).abs() <= step / 2 + 1e-6).all()


def test_int8_tiny_dit_output_is_within_2_percent_of_fp32():
    model = make_dit()
    x = dit_inputs(model)
    expected = run(model, x)
    names = quantize_dit(model, "int8")
    assert len(names) == 8 * model.config.num_layers
    assert all(isinstance(model.get_submodule(n), Int8WeightLinear) for n in names)
    # Per-channel int8 weights carry ~0.5% rms relative error per layer (step/sqrt(12) vs the
    # weight's std); over two blocks we measured 0.6%. 2e-2 leaves room, and still fails if any
    # scale or layout were wrong (that gives errors of order 1).
    assert rel_err(run(model, x), expected) < 2e-2


def test_int8_state_dict_holds_int8_codes_and_fp32_scales():
    model = make_dit()
    quantize_dit(model, "int8")
    sd = model.state_dict()
    prefix = "blocks.0.attn1.to_q."
    assert sd[prefix + "qweight"].dtype == torch.int8
    assert sd[prefix + "weight_scale"].dtype == torch.float32 and sd[prefix + "weight_scale"].shape == (32, 1)
    assert prefix + "weight" not in sd
    # A quantized state dict loads back into a quantized model.
    other = make_dit(seed=5)
    quantize_dit(other, "int8")
    other.load_state_dict(sd, strict=True)
    x = dit_inputs(model)
    assert torch.equal(run(other, x), run(model, x))


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_full_size_5b_weights_shrink_to_about_half(mode, fp8_allowed):
    """The real 5B layout on the meta device (no memory): bf16 10.4 GiB -> about 5.2 GiB."""
    with torch.device("meta"):
        model = CogDiT(dit_preset("cogvideox-5b")).to(torch.bfloat16)

    def nbytes() -> int:
        return sum(t.numel() * t.element_size() for t in model.state_dict().values())

    before = nbytes()
    names = quantize_dit(model, mode)
    assert len(names) == 8 * 42
    after = nbytes()
    # 1 byte per weight instead of 2, plus fp32 scales and bf16 biases (~0.1% more).
    assert 0.49 < after / before < 0.51, (before / 2**30, after / 2**30)
    layer = model.blocks[0].ff[0]
    assert layer.qweight.dtype == (FP8_DTYPE if mode == "fp8" else torch.int8)


def test_quantize_frees_each_original_weight_as_it_goes(monkeypatch):
    model = make_dit()
    refs = [weakref.ref(model.get_submodule(f"blocks.{i}.{t}").weight) for i in range(2) for t in BLOCK_LINEAR_TARGETS]
    alive_at_call = []
    real = Int8WeightLinear.from_linear.__func__

    def counting(cls, linear):
        alive_at_call.append(sum(r() is not None for r in refs))
        return real(cls, linear)

    monkeypatch.setattr(Int8WeightLinear, "from_linear", classmethod(counting))
    quantize_dit(model, "int8")
    gc.collect()
    # When layer i is quantized, the i layers before it are already gone: the peak is the
    # full-precision model plus one quantized layer, not both models.
    assert alive_at_call == list(range(len(refs), 0, -1))
    assert all(r() is None for r in refs)  # and nothing keeps any full-precision weight alive


def test_model_to_dtype_keeps_codes_and_scales():
    model = make_dit()
    quantize_dit(model, "int8")
    model.to(torch.bfloat16)
    layer = model.blocks[1].ff[2]
    assert layer.qweight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16  # the bias follows the model's dtype
    fp8 = Float8Linear.from_linear(make_linear()).to(torch.float16)
    assert fp8.qweight.dtype == FP8_DTYPE and fp8.weight_scale.dtype == torch.float32


def test_dequantize_dit_restores_linear_layers_computing_the_same():
    model = make_dit()
    quantize_dit(model, "int8")
    x = dit_inputs(model)
    quantized = run(model, x)
    names = dequantize_dit(model)
    assert len(names) == 16 and not quantized_layers(model)
    assert type(model.blocks[0].attn1.to_q) is nn.Linear
    assert torch.equal(run(model, x), quantized)  # same weights, same F.linear


# ----------------------------------------------------------------------------------------------
# fp8 e4m3: the quantization math


def e4m3_rounding_bound(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest round-to-nearest error for ``values`` encoded as e4m3 codes * scale.

    Half a unit in the last place: 2^(floor(log2 |v|) - 3) / 2 for normal codes, and half the
    smallest subnormal step (2^-9) for codes below the normal range; in units of the scale.
    """
    mag = (values.abs() / scale).clamp(min=2.0**-6)  # below 2^-6 codes are subnormal: fixed step
    half_ulp = torch.exp2(torch.floor(torch.log2(mag)) - E4M3_MANTISSA_BITS) / 2
    return torch.maximum(half_ulp, torch.full_like(half_ulp, E4M3_MIN_SUBNORMAL / 2)) * scale


def test_fp8_weight_is_quantized_per_output_channel():
    linear = make_linear(256, 128)
    with torch.no_grad():
        linear.weight[7] *= 100  # a large channel must not squash the others
    layer = Float8Linear.from_linear(linear)
    w = linear.weight.detach()
    assert layer.qweight.dtype == FP8_DTYPE and layer.qweight.shape == (128, 256) and layer.qweight.is_contiguous()
    # _scaled_mm's row-wise scale for mat2 = qweight.t() [K, N] is [1, N], fp32, contiguous.
    assert layer.weight_scale.shape == (1, 128) and layer.weight_scale.dtype == torch.float32
    assert layer.weight_scale.is_contiguous()
    codes, scale = reference.fp8_rows(w)  # the fp32 steps spelled out in numpy: equal bits
    assert torch.equal(layer.qweight.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(layer.weight_scale, scale.t())
    assert (layer.qweight.float().abs().amax(dim=1) == 448).all()  # the full e4m3 range is used
    err = (layer.dequantized_weight() - w).abs()
    assert (err <= e4m3_rounding_bound(w, scale) * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_activations_are_quantized_per_token_with_power_of_two_scales(dtype):
    x = activations(50, 256).to(dtype)
    with torch.no_grad():
        x[4] *= 1000  # one loud token must not change the others' scales
        x[9] = 0  # a silent token gives zeros, not NaN
        x[10, 0] = 448 * 2.0**-3  # amax / 448 exactly a power of two: scale 2^-3, code 448
        x[11, 0] = 56.25  # just above it: scale 2^-2
    codes, scale = fp8_quantize_rows(x, power_of_two_scales=True)
    assert codes.dtype == FP8_DTYPE and codes.shape == (50, 256)
    assert scale.shape == (50, 1) and scale.dtype == torch.float32
    expected_codes, expected_scale = reference.fp8_rows(x, power_of_two=True)
    assert torch.equal(scale, expected_scale)  # the smallest power of 2 >= amax * fp32(1/448)
    assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8))  # bf16 math is exact here
    assert scale[10].item() == 2.0**-3 and scale[11].item() == 2.0**-2
    row_max = codes.float().abs().amax(dim=1)
    assert ((row_max >= 224) & (row_max <= 448)).sum() == 49 and row_max[9] == 0 and row_max[10] == 448
    deq = codes.float() * scale
    assert ((deq - x.float()).abs() <= e4m3_rounding_bound(x.float(), scale) * (1 + 1e-6)).all()


def test_fp8_power_of_two_scales_cost_no_accuracy():
    x = activations(400, 512)
    errs = [rel_err(c.float() * s, x) for c, s in (fp8_quantize_rows(x, power_of_two_scales=p) for p in (False, True))]
    # e4m3's relative precision is scale-invariant: both ~2.6% rms (measured 2.64% / 2.65%).
    assert abs(errs[1] - errs[0]) < 0.002 and max(errs) < 0.03, errs


def test_fp8_emulated_layer_computes_the_scaled_product_of_quantized_operands():
    linear = make_linear()
    layer = Float8Linear.from_linear(linear)
    x = activations(3, 7, 256)
    a8, sa = reference.fp8_rows(x.reshape(-1, 256), power_of_two=True)
    w8, sw = reference.fp8_rows(linear.weight.detach())  # [N, K], [N, 1]
    expected = (a8.float() * sa) @ (w8.float() * sw).T + linear.bias.detach()  # [M, N]
    with torch.no_grad():
        got = layer(x)  # CPU -> the _emulate path
    assert got.shape == (3, 7, 128)
    # Same operands, same fp32 matmul: equal up to fp32 rounding of the scale products.
    torch.testing.assert_close(got.reshape(-1, 128), expected, rtol=1e-5, atol=1e-6)


def test_fp8_emulated_layer_is_within_a_few_percent_of_fp32():
    linear = make_linear(1024, 512)
    layer = Float8Linear.from_linear(linear)
    x = activations(64, 1024)
    with torch.no_grad():
        err = rel_err(layer(x), linear(x))
    # e4m3 has 3 mantissa bits: each operand carries ~2.5% rms relative rounding error, and the
    # two add up in quadrature to ~3.5% (measured 3.7%). Bounds: below 5%, and above 1% (so a
    # path that silently skipped quantization would fail).
    assert 0.01 < err < 0.05, err


def test_fp8_tiny_dit_output_is_within_6_percent_of_fp32(fp8_allowed):
    model = make_dit()
    x = dit_inputs(model)
    expected = run(model, x)
    names = quantize_dit(model, "fp8")
    assert len(names) == 16 and all(isinstance(m, Float8Linear) for m in quantized_layers(model).values())
    # Measured 3.5% over two randomised blocks (the per-layer ~3.5% does not compound much, because
    # residual streams carry most of the signal). 6e-2 bounds it; wrong scales give errors of order 1.
    assert rel_err(run(model, x), expected) < 6e-2


def test_fp8_keeps_layers_that_scaled_mm_cannot_take(fp8_allowed):
    model = nn.Module()
    model.odd = nn.Linear(24, 32)  # K = 24 is not a multiple of 16
    model.even = nn.Linear(32, 48)
    assert quantize_dit(model, "fp8", targets=("odd", "even")) == ["even"]
    assert type(model.odd) is nn.Linear and isinstance(model.even, Float8Linear)
    with pytest.raises(QuantizationError, match="divisible by 16"):
        Float8Linear.from_linear(nn.Linear(24, 32))


# ----------------------------------------------------------------------------------------------
# fp8: the _scaled_mm call itself, where this torch can run it on the CPU


def _is_row_major(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.stride(0) >= t.shape[1]


def _is_col_major(t: torch.Tensor) -> bool:
    return t.stride(0) == 1 and t.stride(1) >= t.shape[0]


def _cpu_scaled_mm_works() -> bool:
    a = torch.ones(16, 16).to(FP8_DTYPE)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


@pytest.mark.skipif(not _cpu_scaled_mm_works(), reason="this torch has no CPU torch._scaled_mm with row-wise scales")
@pytest.mark.parametrize("dtype, fuse_bias", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)])
def test_fp8_scaled_mm_path_obeys_the_cuda_layout_rules_and_matches_emulation(dtype, fuse_bias, monkeypatch):
    calls = []
    real = torch._scaled_mm

    def checked(a, b, *, scale_a, scale_b, bias=None, out_dtype=None, use_fast_accum=False):
        # What the CUDA kernel demands (the CPU kernel does not check these).
        assert a.dtype == b.dtype == FP8_DTYPE
        assert _is_row_major(a), a.stride()
        assert _is_col_major(b), b.stride()
        assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0
        assert scale_a.shape == (a.shape[0], 1) and scale_b.shape == (1, b.shape[1])
        assert scale_a.dtype == scale_b.dtype == torch.float32
        assert scale_a.is_contiguous() and scale_b.is_contiguous()
        assert bias is None or bias.dtype == out_dtype != torch.float32
        calls.append(bias is not None)
        return real(
            a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype, use_fast_accum=use_fast_accum
        )

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    monkeypatch.setattr(Float8Linear, "fuse_bias", fuse_bias)
    layer = Float8Linear.from_linear(make_linear().to(dtype))
    # A transposed (non-contiguous) input, as attention outputs can be.
    x = activations(256, 40).to(dtype).t()  # [40, 256], strides (1, 40)
    with torch.no_grad():
        got = layer._scaled(x)
        emulated = layer._emulate(x)
    assert calls == [dtype == torch.bfloat16 and fuse_bias]  # bias in the call for bf16 outputs (when fused)
    assert got.dtype == dtype and got.shape == (40, 128)
    # The CPU kernel accumulates in fp32 as the emulation does: agreement to output rounding
    # (bf16: 2^-9 relative).
    assert rel_err(got, emulated) < (4e-3 if dtype == torch.bfloat16 else 1e-5)


# ----------------------------------------------------------------------------------------------
# Same bits on every device: quantizing before or after offloading (on the CPU) changes nothing


def rows_of_every_scale(n: int = 4096, k: int = 64, seed: int = 3) -> torch.Tensor:
    """n rows whose magnitudes span 1e-4..1e2, plus edge rows: zeros, amax = 448 * 2^-3 exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * torch.pow(10.0, torch.rand(n, 1, generator=g) * 6 - 4)
    x[0] = 0
    x[1, 5] = 448 * 2.0**-3
    x[1, 6:] = 0
    return x


def _linear_with(weight: torch.Tensor) -> nn.Linear:
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = nn.Parameter(weight[:, 0] * 0.5, requires_grad=False)
    return linear


def _layer_tensors(layer) -> tuple[torch.Tensor, ...]:
    return (
        layer.qweight,
        layer.weight_scale,
        layer.bias,
        layer.dequantized_weight(),
        layer.dequantized_weight(torch.bfloat16),
    )


# name -> x [N, K] fp32 -> the tensors the library makes from it (codes, scales, ...)
QUANTIZERS = {
    "fp8 rows fp32": lambda x: fp8_quantize_rows(x),
    "fp8 rows bf16": lambda x: fp8_quantize_rows(x.bfloat16()),
    "fp8 power-of-two rows fp32": lambda x: fp8_quantize_rows(x, power_of_two_scales=True),
    "fp8 power-of-two rows bf16": lambda x: fp8_quantize_rows(x.bfloat16(), power_of_two_scales=True),
    "int8 rows fp32": lambda x: int8_quantize_rows(x),
    "int8 rows bf16": lambda x: int8_quantize_rows(x.bfloat16()),
    "Float8Linear.from_linear bf16": lambda x: _layer_tensors(Float8Linear.from_linear(_linear_with(x.bfloat16()))),
    "Int8WeightLinear.from_linear bf16": lambda x: _layer_tensors(
        Int8WeightLinear.from_linear(_linear_with(x.bfloat16()))
    ),
}


def _differences(got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> list[str]:
    return [
        f"output {i}: {d}" for i, (a, b) in enumerate(zip(got, expected, strict=True)) if (d := bit_difference(a, b))
    ]


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_quantizers_give_cuda_bits_and_run_only_bit_exact_ops(name):
    """On the CPU: the quantizer replayed with CUDA's division (``CudaReplay``) gives the plain CPU
    bits, and every op it runs has the same bits on every device (``exactness_problems``)."""
    x = rows_of_every_scale()
    with torch.no_grad():
        plain = QUANTIZERS[name](x)
        with CudaReplay() as replay:
            replayed = QUANTIZERS[name](x)
    failures = [f"op whose bits may depend on the device: {p}" for p in exactness_problems(replay.records)]
    failures += [f"CUDA's arithmetic gives other bits, {d}" for d in _differences(replayed, plain)]
    assert not failures, f"{name}:\n" + "\n".join(failures)


def test_the_replay_and_the_op_check_catch_what_differs_between_devices():
    """The two checks above can fail: the old scale formula ``amax / 448`` is caught by both, and
    each other kind of device-dependent op is named."""
    amax = torch.rand(4096, 1, generator=torch.Generator().manual_seed(0)) * 4 + 1e-3
    with CudaReplay() as replay:
        replayed = amax / 448.0
    differ = (replayed != amax / 448.0).float().mean().item()
    assert differ > 0.3, differ  # measured 55%: CUDA's amax * fp32(1/448) vs the CPU's amax / 448
    assert torch.equal(replayed, amax * quant_layers._FP8_STEP)  # what CUDA computes, and the library now
    problems = exactness_problems(replay.records)
    assert len(problems) == 1 and "division by the CPU scalar 448.0" in problems[0], problems

    with CudaReplay() as replay:
        amax / 2.0  # exact: a power of two
        amax / amax  # tensor by tensor: IEEE division on both devices
        amax * quant_layers._INT8_STEP  # an fp32 constant
        amax.sum()
        amax.add(amax, alpha=3)
        amax * 0.1
        (amax * 1000).to(FP8_DTYPE)
        (amax * 1.5).to(torch.int8)
        torch.linalg.vector_norm(amax, dim=-1)
    problems = exactness_problems(replay.records)
    expected = ["aten.sum", "alpha != 1", "0.1 is not an fp32", "beyond e4m3", "non-integral", "max norm"]
    assert len(problems) == len(expected) and all(e in p for e, p in zip(expected, problems, strict=True)), problems


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_divides_by_a_python_number_as_the_replay_says(dtype):
    """The replay's model of CUDA (``x / b`` = ``x * fp32(1 / b)``) is what this GPU computes."""
    x = rows_of_every_scale().to(dtype)
    for divisor in (448.0, 127.0, 3.0):
        with CudaReplay():
            replayed = x / divisor
        cuda = (x.cuda() / divisor).cpu()
        difference = bit_difference(cuda, replayed)
        assert difference is None, f"{dtype} x / {divisor}: CUDA differs from the replay: {difference}"


@needs_cuda
@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_quantizers_give_the_same_bits_on_cpu_and_cuda(name):
    x = rows_of_every_scale()
    with torch.no_grad():
        on_cpu = QUANTIZERS[name](x)
        on_cuda = QUANTIZERS[name](x.cuda())
    assert all(t.device.type == "cuda" for t in on_cuda), [t.device for t in on_cuda]
    differences = _differences(on_cuda, on_cpu)
    assert not differences, f"{name}: CUDA vs CPU:\n" + "\n".join(differences)


def _fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= quant_layers.FP8_MIN_CAPABILITY


@needs_cuda
@pytest.mark.parametrize(
    "mode", ["int8", pytest.param("fp8", marks=pytest.mark.skipif(not _fp8_capable(), reason="sm < 8.9"))]
)
def test_a_layer_quantized_on_the_cpu_runs_on_cuda_like_one_quantized_there(mode):
    cls = Float8Linear if mode == "fp8" else Int8WeightLinear
    linear = make_linear(256, 128).to(torch.bfloat16)
    from_cpu = cls.from_linear(linear).cuda()
    on_cuda = cls.from_linear(linear.cuda())
    for name in ("qweight", "weight_scale", "bias"):
        a, b = getattr(from_cpu, name), getattr(on_cuda, name)
        assert a.stride() == b.stride() and a.is_contiguous(), (name, a.stride(), b.stride())
        assert (d := bit_difference(a, b)) is None, f"{mode} {name}: {d}"
    x = activations(4, 9, 256).to(torch.bfloat16).cuda()
    with torch.no_grad():
        difference = bit_difference(from_cpu(x), on_cuda(x))
    assert difference is None, f"{mode} forward on CUDA, layer quantized on the CPU vs on CUDA: {difference}"


# ----------------------------------------------------------------------------------------------
# Errors


def test_unknown_mode_is_refused():
    model = make_dit()
    with pytest.raises(QuantizationError, match="unknown quantization mode 'int4'.*'fp8'.*'int8'"):
        quantize_dit(model, "int4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_fp8_without_cuda_names_what_was_found():
    model = make_dit()
    with pytest.raises(QuantizationError, match=r"compute capability >= 8\.9.*no CUDA device.*DiT is on cpu"):
        quantize_dit(model, "fp8")
    assert not quantized_layers(model)


def test_fp8_on_an_older_gpu_names_the_device(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(QuantizationError, match=r"cuda:0 = NVIDIA A100-SXM4-80GB with compute capability 8\.0"):
        quantize_dit(make_dit(), "fp8")


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_injected_lora_layers_are_refused_with_merge_advice(mode, fp8_allowed):
    model = make_dit()
    inject_lora(model, ["attn1.to_q"], rank=4)
    with pytest.raises(QuantizationError, match="LoRALinear.*Quantize after merging.*merge_lora"):
        quantize_dit(model, mode)
    assert not quantized_layers(model)  # nothing was swapped
    with pytest.raises(QuantizationError, match="quantize after merging"):
        Int8WeightLinear.from_linear(model.blocks[0].attn1.to_q)


def test_targets_that_match_nothing_or_quantized_layers_are_refused():
    model = make_dit()
    with pytest.raises(QuantizationError, match=r"\['attn1.to_qq'\] match no layer"):
        quantize_dit(model, "int8", targets=("attn1.to_qq",))
    quantize_dit(model, "int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_dit(model, "int8")


def test_copies_of_quantized_models_are_independent():
    model = make_dit()
    quantize_dit(model, "int8")
    clone = copy.deepcopy(model)
    clone.blocks[0].ff[0].qweight.zero_()
    assert model.blocks[0].ff[0].qweight.abs().sum() > 0
