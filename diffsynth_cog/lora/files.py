"""Planning a merge of a LoRA into the CogVideoX DiT (no weight is touched here).

Everything is checked before the first weight changes (key names, pairing, ranks, shapes against
the model's Linear layers, dtypes, finite values): :func:`plan_merge` returns the checked pairs
or raises ``LoRAError`` listing each problem.

The LoRA is opened by :mod:`diffsynth_cog.lora.reader` (from its headers), its layout and the scale of
each layer are read by :mod:`diffsynth_cog.lora.layouts`, and :mod:`diffsynth_cog.lora.merge` applies the
plan. The public names of the first two are importable from here too.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffsynth_cog.errors import LoRAError
from diffsynth_cog.lora.layouts import (
    _ADAPTER_CONFIG_FILE,
    _HEADER_CONFIG_KEY,
    _alpha_config,
    _Alphas,
    _drop_alpha_keys,
    _module_names,
    _parse_keys,
    _settle_naming,
)
from diffsynth_cog.lora.layouts import DIFFSYNTH as DIFFSYNTH
from diffsynth_cog.lora.layouts import DIFFUSERS as DIFFUSERS
from diffsynth_cog.lora.reader import TRAINED_ATTENTION_KEY as TRAINED_ATTENTION_KEY
from diffsynth_cog.lora.reader import LoRATensors
from diffsynth_cog.lora.reader import open_lora as open_lora
from diffsynth_cog.lora.reader import trained_attention as trained_attention

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_MAX_LISTED = 20  # problems listed in one error message


@dataclass(frozen=True)
class LoRAPair:
    """One checked A/B pair of a LoRA and the Linear layer (our name) it updates."""

    module: str  # our module name
    key_a: str
    key_b: str
    rank: int
    scale: float | None  # the caller's alpha included; None until read from ``alpha_key``
    alpha_key: str | None = None


@dataclass(frozen=True)
class LoRAMergeReport:
    """What one ``merge_lora`` call did.

    ``format`` is the key layout ("diffsynth" or "diffusers"); ``scales[layer]`` is the factor
    applied to ``B @ A`` (the caller's alpha included); ``alpha_source`` says where lora_alpha
    came from, or why no rank scaling applies.
    """

    source: str
    format: str
    alpha: float
    alpha_source: str
    layers: tuple[str, ...]
    ranks: dict[str, int]
    scales: dict[str, float]

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _check_pair(
    file_name: str, slot: Mapping[str, str], ours: str, layer: nn.Linear, tensors: LoRATensors, problems: list[str]
) -> int | None:
    """The rank of one A/B pair, or None (with the reasons appended to ``problems``)."""
    key_a, key_b = slot["A"], slot["B"]
    shape_a, shape_b = tensors.shapes[key_a], tensors.shapes[key_b]
    before = len(problems)
    for key in (key_a, key_b):
        if tensors.dtypes[key] not in _FLOAT_DTYPES:
            problems.append(f"key {key!r}: dtype {tensors.dtypes[key]} is not a floating-point type")
    where = f"Linear {ours!r} (weight [{layer.out_features}, {layer.in_features}])"
    if len(shape_a) != 2 or shape_a[1] != layer.in_features:
        problems.append(
            f"key {key_a!r}: lora_A must be [rank, in_features={layer.in_features}] for {where}, found {list(shape_a)}"
        )
    if len(shape_b) != 2 or shape_b[0] != layer.out_features:
        problems.append(
            f"key {key_b!r}: lora_B must be [out_features={layer.out_features}, rank] for {where}, "
            f"found {list(shape_b)}"
        )
    if len(problems) > before:
        return None
    if shape_a[0] != shape_b[1] or shape_a[0] == 0:
        problems.append(
            f"layer {file_name!r}: lora_A has rank {shape_a[0]} ({list(shape_a)}), lora_B has rank "
            f"{shape_b[1]} ({list(shape_b)}); they must be equal and positive"
        )
        return None
    if "alpha" in slot and math.prod(tensors.shapes[slot["alpha"]]) != 1:
        problems.append(
            f"key {slot['alpha']!r}: must hold one number, found shape {list(tensors.shapes[slot['alpha']])}"
        )
        return None
    return shape_a[0]


def plan_merge(
    model: nn.Module,
    tensors: LoRATensors,
    alpha: float,
    lora_config: Mapping[str, Any] | None,
) -> tuple[str, str, list[LoRAPair]]:
    """Checks the whole LoRA against the model; returns (layout, alpha source, pairs) or raises."""
    src = tensors.source
    if not tensors.shapes:
        raise LoRAError(f"{src}: holds no tensors")
    naming, groups, problems = _parse_keys(tensors)
    has_alpha_keys = any("alpha" in slot for slot in groups.values())
    ignored_alphas = 0
    if naming == DIFFSYNTH and has_alpha_keys and lora_config is None:
        groups, ignored_alphas = _drop_alpha_keys(src, groups)
        has_alpha_keys = False
    alphas, alpha_source = _alpha_config(tensors, naming, lora_config, has_alpha_keys)
    if ignored_alphas:
        alpha_source += f"; {ignored_alphas} '.alpha' keys ignored, as DiffSynth does"
    naming = _settle_naming(src, model, naming, alphas, has_alpha_keys)

    pairs, missing = _match_pairs(model, tensors, groups, naming, alpha, alphas, has_alpha_keys, problems)
    _note_unmatched(model, len(groups), missing, pairs, problems)
    if problems:
        _raise(src, model, problems)

    resolved = _read_values(tensors, pairs, alpha, problems)
    if problems:
        _raise(src, model, problems)
    if naming == DIFFUSERS and alphas is None and not has_alpha_keys:
        logger.warning(
            "%s: no lora_alpha information (no %r header entry, no %s beside it, no '.alpha' keys); "
            "using lora_alpha = rank (scale 1) as diffusers does. If it was trained with another lora_alpha, "
            "pass alpha=lora_alpha/rank.",
            src,
            _HEADER_CONFIG_KEY,
            _ADAPTER_CONFIG_FILE,
        )
    return naming, alpha_source, resolved


def _match_pairs(
    model: nn.Module,
    tensors: LoRATensors,
    groups: Mapping[str, Mapping[str, str]],
    naming: str,
    alpha: float,
    alphas: _Alphas | None,
    has_alpha_keys: bool,
    problems: list[str],
) -> tuple[list[LoRAPair], list[str]]:
    """Matches each layer of the file to a Linear of the model: (pairs, keys of layers the model lacks);
    the scale of a pair is None where it needs the value of its '.alpha' key."""
    modules = dict(model.named_modules())
    pairs: list[LoRAPair] = []
    missing: list[str] = []
    for file_name, slot in groups.items():
        name, ours = _module_names(file_name, naming)
        any_key = next(iter(slot.values()))
        if "A" not in slot or "B" not in slot:
            have = ", ".join(repr(k) for k in slot.values())
            problems.append(f"layer {file_name!r}: lora_A and lora_B must come in pairs; found only {have}")
            continue
        layer = modules.get(ours) if ours is not None else None
        if layer is None:
            missing.append(any_key)
            continue
        if not isinstance(layer, nn.Linear):
            problems.append(f"key {any_key!r}: {ours!r} is a {type(layer).__name__}, not a Linear layer")
            continue
        if layer.weight.is_meta:
            problems.append(f"key {any_key!r}: the weight of {ours!r} is on the meta device (not loaded)")
            continue
        rank = _check_pair(file_name, slot, ours, layer, tensors, problems)
        if rank is None:
            continue
        if alphas is not None:
            scale: float | None = alpha * alphas.scale(name, rank, problems)
        elif "alpha" in slot:
            scale = None  # needs the tensor's value: read below
        elif has_alpha_keys:
            problems.append(f"layer {file_name!r}: no '.alpha' key, while other layers of the file have one")
            continue
        else:
            scale = alpha
        pairs.append(LoRAPair(ours, slot["A"], slot["B"], rank, scale, slot.get("alpha")))
    return pairs, missing


def _note_unmatched(
    model: nn.Module, total: int, missing: Sequence[str], pairs: Sequence[LoRAPair], problems: list[str]
) -> None:
    """Adds to ``problems`` the layers the model lacks (first) and the layers addressed more than once (last)."""
    if missing:
        listed = ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        if len(missing) == total:
            head = f"none of its {total} LoRA layers exists in this {type(model).__name__} (a LoRA for another model?)"
        else:
            head = f"{len(missing)} of its {total} LoRA layers do not exist in this {type(model).__name__}"
        problems.insert(0, f"{head}: {listed}")
    counts = Counter(p.module for p in pairs)
    problems += [f"layer {name!r} is addressed by {n} entries of the file" for name, n in counts.items() if n > 1]


def _read_values(tensors: LoRATensors, pairs: Sequence[LoRAPair], alpha: float, problems: list[str]) -> list[LoRAPair]:
    """Values: finite, and the per-layer alphas (these need the data, not only the header); returns the
    pairs with every scale filled in."""
    resolved: list[LoRAPair] = []
    with tensors.reader() as get:
        for p in pairs:
            for key in (p.key_a, p.key_b):
                if not torch.isfinite(get(key)).all():
                    problems.append(f"key {key!r}: holds NaN or infinite values")
            scale = p.scale
            if scale is None:
                value = float(get(p.alpha_key).float().reshape(()))
                if not math.isfinite(value):
                    problems.append(f"key {p.alpha_key!r}: alpha is {value}")
                scale = alpha * value / p.rank
            resolved.append(LoRAPair(p.module, p.key_a, p.key_b, p.rank, scale, p.alpha_key))
    return resolved


def _raise(source: str, model: nn.Module, problems: Sequence[str]) -> None:
    listed = "\n".join(f"  - {p}" for p in problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise LoRAError(
        f"{source}: cannot merge this LoRA into {type(model).__name__}; no weight was changed. "
        f"{len(problems)} problem(s):\n{listed}{more}"
    )
