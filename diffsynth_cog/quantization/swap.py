"""Quantizing a whole DiT: ``quantize_dit`` swaps its block Linear layers for quantized ones in place.

``quantize_dit(dit, mode)`` checks everything first (the mode, an fp8-capable GPU, that every target
matches a plain ``nn.Linear``), then replaces the targeted layers one by one with the layers of
:mod:`diffsynth_cog.quantization.layers`, dropping each full-precision weight as it goes and logging
the weight bytes before and after. ``dequantize_dit`` turns them back into ``nn.Linear`` (with the
dequantized weights: quantization is lossy) and ``quantized_layers`` finds them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from diffsynth_cog.errors import QuantizationError
from diffsynth_cog.lora import BLOCK_LINEAR_TARGETS, LoRALinear
from diffsynth_cog.quantization.layers import (
    _MM_ALIGNMENT,
    FP8_MIN_CAPABILITY,
    Float8Linear,
    Int8WeightLinear,
    _QuantizedLinear,
)

logger = logging.getLogger(__name__)

MODES = ("fp8", "int8")


def _module_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _check_fp8_device(model: nn.Module) -> None:
    """fp8 needs ``_scaled_mm`` on an NVIDIA GPU of compute capability >= 8.9; name what was found."""
    major, minor = FP8_MIN_CAPABILITY
    need = (
        f"fp8 mode runs torch._scaled_mm, which needs a CUDA GPU of compute capability >= {major}.{minor} "
        "(Ada, Hopper or newer)"
    )
    hint = "mode='int8' saves the same memory on any device"
    model_device = _module_device(model)
    if torch.version.hip is not None:
        raise QuantizationError(f"{need}; this torch is a ROCm build ({torch.version.hip}). {hint}")
    if model_device.type == "cuda":
        device = model_device
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        raise QuantizationError(
            f"{need}; found no CUDA device (torch.cuda.is_available() is False, the DiT is on {model_device}). {hint}"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise QuantizationError(
            f"{need}; found {device} = {torch.cuda.get_device_name(device)} with compute capability "
            f"{capability[0]}.{capability[1]}. {hint}"
        )
    if model_device.type != "cuda":
        logger.warning(
            "quantize_dit: the DiT is on %s; its fp8 layers run the slow fp32 emulation there. Move it to %s "
            "(%s) before running it.",
            model_device,
            device,
            torch.cuda.get_device_name(device),
        )


def _targeted_layers(model: nn.Module, targets: Sequence[str]) -> tuple[dict[str, nn.Linear], list[str]]:
    """name -> Linear for every module whose name ends (at a dot) with a target; and the problems."""
    chosen: dict[str, nn.Linear] = {}
    problems: list[str] = []
    matched = dict.fromkeys(targets, 0)
    lora_layers = []
    for name, module in model.named_modules():
        hits = [t for t in targets if name and (name == t or name.endswith("." + t))]
        if not hits:
            continue
        for t in hits:
            matched[t] += 1
        if isinstance(module, LoRALinear):  # before the Linear check: LoRALinear is an nn.Linear
            lora_layers.append(name)
        elif isinstance(module, _QuantizedLinear):
            problems.append(f"{name!r} is already quantized ({module.mode}); call dequantize_dit first")
        elif not isinstance(module, nn.Linear):
            problems.append(f"target {max(hits, key=len)!r} matches {name!r}, a {type(module).__name__}, not a Linear")
        else:
            chosen[name] = module
    if lora_layers:
        problems.append(
            f"{len(lora_layers)} targeted layer(s) are LoRALinear (a LoRA injected for training), e.g. "
            f"{lora_layers[:3]}. Quantize after merging: export_lora() the trained LoRA, load the base DiT "
            f"fresh, merge_lora() the file into it, then quantize_dit()"
        )
    unmatched = [t for t, n in matched.items() if n == 0]
    if unmatched:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        problems.append(f"target(s) {unmatched} match no layer; Linear layers are named like {linear_names[:8]}")
    return chosen, problems


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@torch.no_grad()
def quantize_dit(
    dit: nn.Module,
    mode: str,
    targets: Sequence[str] = BLOCK_LINEAR_TARGETS,
    *,
    use_fast_accum: bool = True,
    progress: bool = False,
) -> list[str]:
    """Swaps the targeted Linear layers of ``dit`` for quantized ones in place; returns their names.

    Args:
        mode: ``"fp8"`` (``Float8Linear``: fp8 e4m3 matmuls, speed; needs CUDA compute capability
            >= 8.9) or ``"int8"`` (``Int8WeightLinear``: int8 weights, memory; any device).
        targets: module-name suffixes at a dot boundary, as ``inject_lora`` takes them; default
            ``BLOCK_LINEAR_TARGETS``, the eight Linear layers of every block.
        use_fast_accum: fp8 only; see ``Float8Linear``.
        progress: show a tqdm bar over the layers.

    Quantization runs on the device the weights are on (fastest on the GPU); each original weight is
    dropped as its layer is swapped. fp8 layers whose K or N is not a multiple of 16 stay
    ``nn.Linear`` (logged). Merge LoRAs before quantizing: injected ``LoRALinear`` layers are refused,
    and ``restore_base_weights`` cannot undo a merge into a quantized layer.

    Raises ``QuantizationError`` (model untouched) for an unknown mode, for fp8 without a suitable
    GPU, for targets that match no layer or a non-Linear, and for LoRALinear or already-quantized layers.
    """
    if mode not in MODES:
        raise QuantizationError(
            f"unknown quantization mode {mode!r}; choose 'fp8' (fp8 e4m3 matmuls for speed, CUDA compute "
            f"capability >= 8.9) or 'int8' (int8 weights dequantized per call, for memory)"
        )
    if isinstance(targets, str):
        targets = (targets,)
    if mode == "fp8":
        _check_fp8_device(dit)
    chosen, problems = _targeted_layers(dit, targets)
    if problems:
        raise QuantizationError(f"quantize_dit({mode!r}) on {type(dit).__name__}: " + "; ".join(problems))

    skipped = [n for n, m in chosen.items() if mode == "fp8" and not Float8Linear.supports(m)]
    for name in skipped:
        del chosen[name]
    before = after = 0
    done: list[str] = []
    for name in tqdm(list(chosen), desc=f"quantize {mode}", unit="layer", disable=not progress):
        # pop: once swapped, nothing here references the old layer, so its weight is freed now and
        # the peak stays at the full-precision model plus one quantized layer.
        linear = chosen.pop(name)
        if mode == "fp8":
            layer: _QuantizedLinear = Float8Linear.from_linear(linear, use_fast_accum=use_fast_accum)
        else:
            layer = Int8WeightLinear.from_linear(linear)
        before += _tensor_bytes(linear)
        after += layer.weight_bytes()
        parent_name, _, child = name.rpartition(".")
        setattr(dit.get_submodule(parent_name), child, layer)
        done.append(name)
        del linear, layer
    if skipped:
        logger.warning(
            "quantize_dit: %d layer(s) kept as nn.Linear, K or N not divisible by %d: %s",
            len(skipped),
            _MM_ALIGNMENT,
            skipped[:5],
        )
    logger.info(
        "quantized %d Linear layers of %s to %s: their weights %.2f GiB -> %.2f GiB",
        len(done),
        type(dit).__name__,
        mode,
        before / 2**30,
        after / 2**30,
    )
    return done


@torch.no_grad()
def dequantize_dit(dit: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Turns every quantized layer back into an ``nn.Linear`` holding its *dequantized* weight.

    Approximate by nature: the original weights are gone; this gives the weights the quantized model
    was computing with. dtype: see ``_QuantizedLinear.to_linear``. Returns the names restored.
    """
    names = [n for n, m in dit.named_modules() if isinstance(m, _QuantizedLinear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = dit.get_submodule(parent_name)
        setattr(parent, child, getattr(parent, child).to_linear(dtype))
    logger.info("dequantized %d layers of %s back to nn.Linear", len(names), type(dit).__name__)
    return names


def quantized_layers(model: nn.Module) -> dict[str, _QuantizedLinear]:
    """name -> quantized layer, for every Float8Linear / Int8WeightLinear in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantizedLinear)}
