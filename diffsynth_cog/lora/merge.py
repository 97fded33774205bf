"""Merging LoRA files into the DiT's Linear weights, and undoing it bitwise.

``merge_lora(model, path_or_state_dict, alpha)`` folds a LoRA into the Linear weights in place
(after :func:`~diffsynth_cog.lora.files.plan_merge` checked all of it) and
``restore_base_weights(model)`` brings back the exact base weights, however many LoRAs were stacked.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffsynth_cog.errors import LoRAError
from diffsynth_cog.lora.files import LoRAMergeReport, LoRAPair, LoRATensors, open_lora, plan_merge
from diffsynth_cog.validators import is_number

logger = logging.getLogger(__name__)

_RECORD_ATTR = "_diffsynth_cog_lora_record"


# ----------------------------------------------------------------------------------------------
# Merging and restoring


@dataclass
class _LoRARecord:
    """Kept on the model between merges: exact CPU copies of each touched base weight."""

    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    merged: list[LoRAMergeReport] = field(default_factory=list)


def _record(model: nn.Module) -> _LoRARecord:
    record = getattr(model, _RECORD_ATTR, None)
    if record is None:
        record = _LoRARecord()
        # A plain attribute (not a buffer), so it never enters the model's state dict.
        object.__setattr__(model, _RECORD_ATTR, record)
    return record


@torch.no_grad()
def merge_lora(
    model: nn.Module,
    lora: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    alpha: float = 1.0,
    *,
    lora_config: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> LoRAMergeReport:
    """Folds a LoRA into the model's Linear weights in place: ``W += scale * B @ A``.

    Args:
        model: the DiT (any module whose Linear layers carry the LoRA's module names).
        lora: a ``.safetensors`` file, a folder holding one, or a state dict.
        alpha: the strength; DiffSynth layout: scale = alpha; diffusers layout:
            scale = alpha * lora_alpha / r (see the module docstring for where lora_alpha comes from).
        lora_config: a LoraConfig-like dict (``r``, ``lora_alpha``, ``rank_pattern``, ...) that
            overrides what the file says; forces diffusers/PEFT scaling.
        progress: show a tqdm bar over layers.

    The arithmetic is float32 on the weight's device, cast back to the weight's dtype. The first
    time a layer is touched its exact base weight is copied to CPU, so ``restore_base_weights``
    can undo any number of stacked merges bitwise. Raises ``LoRAError`` (model untouched) when
    anything in the LoRA does not fit.
    """
    if not is_number(alpha):
        raise LoRAError(f"alpha must be a finite number, got {alpha!r}")
    tensors = open_lora(lora)
    record = _record(model)
    _refuse_second_merge(record, tensors.source, alpha)
    fmt, alpha_source, pairs = plan_merge(model, tensors, alpha, lora_config)
    modules = dict(model.named_modules())
    first_touch: list[str] = []
    done: list[LoRAPair] = []
    try:
        with tensors.reader() as get:
            for p in tqdm(pairs, desc="merge LoRA", unit="layer", disable=not progress):
                weight = modules[p.module].weight
                if p.module not in record.base_weights:
                    record.base_weights[p.module] = weight.detach().to("cpu", copy=True)
                    first_touch.append(p.module)
                a = get(p.key_a).to(weight.device, torch.float32)  # [r, in]
                b = get(p.key_b).to(weight.device, torch.float32)  # [out, r]
                merged = (weight.float() + p.scale * (b @ a)).to(weight.dtype)  # [out, in]
                if not bool(torch.isfinite(merged).all()):
                    raise LoRAError(_overflow_message(tensors.source, p.module, merged, weight.dtype, alpha))
                weight.copy_(merged)
                done.append(p)
    except BaseException:
        _roll_back(modules, record, first_touch, done, tensors)
        raise
    report = LoRAMergeReport(
        source=tensors.source,
        format=fmt,
        alpha=alpha,
        alpha_source=alpha_source,
        layers=tuple(p.module for p in pairs),
        ranks={p.module: p.rank for p in pairs},
        scales={p.module: p.scale for p in pairs},
    )
    record.merged.append(report)
    ranks = sorted(set(report.ranks.values()))
    scales = sorted(set(report.scales.values()))
    logger.info(
        "merged LoRA %s into %s: %d Linear layers changed (%s layout, rank %s, scale %s; lora_alpha: %s)",
        tensors.source,
        type(model).__name__,
        report.num_layers,
        fmt,
        ranks[0] if len(ranks) == 1 else ranks,
        scales[0] if len(scales) == 1 else f"{scales[0]:.4g}..{scales[-1]:.4g}",
        alpha_source,
    )
    return report


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # not files (a state dict's source), or gone
        return False


def _refuse_second_merge(record: _LoRARecord, source: str, alpha: float) -> None:
    """A file merged twice would double its effect without a word: refused, naming the alpha it has."""
    for earlier in record.merged:
        if _same_file(earlier.source, source):
            raise LoRAError(
                f"{source} is already merged into this model (alpha {earlier.alpha:g}); merging it again would "
                f"double its effect. For a stronger LoRA pass a larger alpha once (e.g. lora_alpha="
                f"{earlier.alpha + alpha:g}); to start over call ModelManager.clear_loras() "
                "(or restore_base_weights(model)) first. No weight was changed"
            )


def _overflow_message(source: str, module: str, merged: torch.Tensor, dtype: torch.dtype, alpha: float) -> str:
    bad = int((~torch.isfinite(merged)).sum())
    limit = torch.finfo(dtype).max
    return (
        f"{source}: merging into {module!r} gives {bad} values that are inf or NaN in {str(dtype).removeprefix('torch.')}"
        f" (largest finite value {limit:.4g}), at alpha {alpha:g}. The merge was rolled back; no weight was "
        "changed. Load the model in bfloat16 or float32 (torch_dtype / --dtype bf16), or use a smaller alpha"
    )


def _roll_back(
    modules: Mapping[str, nn.Module],
    record: _LoRARecord,
    first_touch: Sequence[str],
    done: Sequence[LoRAPair],
    tensors: LoRATensors,
) -> None:
    """Undo a merge that failed midway (out of memory, interrupted).

    Layers this merge touched first come back bitwise from their base copy; layers an earlier
    LoRA had changed get this merge's delta subtracted (float32, so only approximately), with a
    warning: ``restore_base_weights`` still gives the exact base.
    """
    approximate = []
    with tensors.reader() as get:
        for p in done:
            weight = modules[p.module].weight
            if p.module in first_touch:
                continue
            a = get(p.key_a).to(weight.device, torch.float32)
            b = get(p.key_b).to(weight.device, torch.float32)
            weight.copy_((weight.float() - p.scale * (b @ a)).to(weight.dtype))
            approximate.append(p.module)
    for name in first_touch:
        modules[name].weight.copy_(record.base_weights.pop(name))
    if approximate:
        logger.warning(
            "LoRA merge failed midway; %d stacked layers were rolled back approximately (float rounding). "
            "restore_base_weights() restores the exact base weights.",
            len(approximate),
        )


@torch.no_grad()
def restore_base_weights(model: nn.Module) -> list[str]:
    """Puts back the exact base weight of every layer any ``merge_lora`` touched; returns their names."""
    record = getattr(model, _RECORD_ATTR, None)
    if record is None or not record.base_weights:
        logger.debug("restore_base_weights: no LoRA merged into %s", type(model).__name__)
        return []
    modules = dict(model.named_modules())
    names = list(record.base_weights)
    gone = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if gone:
        raise LoRAError(
            f"restore_base_weights: layers merged earlier are no longer Linear layers of the model: {gone[:5]}"
        )
    for name in names:
        weight = modules[name].weight
        if weight.dtype != record.base_weights[name].dtype:
            logger.warning(
                "%s: weight dtype changed since the merge (%s -> %s); the restored base is cast",
                name,
                record.base_weights[name].dtype,
                weight.dtype,
            )
        weight.copy_(record.base_weights[name])
    object.__delattr__(model, _RECORD_ATTR)
    logger.info("restored the base weights of %d layers of %s", len(names), type(model).__name__)
    return names


def merged_loras(model: nn.Module) -> tuple[LoRAMergeReport, ...]:
    """The reports of the LoRAs merged into ``model`` since its base weights were last restored."""
    record = getattr(model, _RECORD_ATTR, None)
    return tuple(record.merged) if record is not None else ()
