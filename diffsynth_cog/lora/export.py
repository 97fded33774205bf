"""The trained LoRA as data: state dicts, ExVideo's checkpoint EMA, and the exported file.

``lora_state_dict`` / ``load_lora_state_dict`` give and take what a checkpoint holds,
``ema_lora_state_dicts`` averages saved checkpoints as ExVideo does, and ``export_lora`` writes a
file in one of two layouts:

* "diffsynth": DiffSynth-Studio's module names (``context_embedder``,
  ``time_embedder.timestep_embedder.0``, ``blocks.N.attn1.to_q``, ...) and the alpha/rank scale
  folded into B, so DiffSynth-Studio's ``ModelManager.load_lora`` and ``merge_lora(..., alpha=1.0)``
  both reproduce the trained model;
* "diffusers": diffusers' names with the ``transformer.`` prefix, B as trained and the PEFT
  LoraConfig (``r``, ``lora_alpha``, per-layer ``rank_pattern`` / ``alpha_pattern``) in the header,
  as ``CogVideoXPipeline.save_lora_weights`` writes it, so ``CogVideoXPipeline.load_lora_weights``
  (scale lora_alpha / r) and ``merge_lora`` both reproduce it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from diffsynth_cog.errors import LoRAError
from diffsynth_cog.io.atomic import save_safetensors_atomic
from diffsynth_cog.loading.dit_loader import dit_name_in
from diffsynth_cog.lora.files import _MAX_LISTED
from diffsynth_cog.lora.layers import LoRALinear, lora_layers
from diffsynth_cog.lora.layouts import _DIFFUSERS_PREFIXES, _HEADER_CONFIG_KEY, DIFFSYNTH, DIFFUSERS

LORA_EXPORT_FORMATS = (DIFFSYNTH, DIFFUSERS)
_DIFFUSERS_PREFIX = _DIFFUSERS_PREFIXES[0]  # "transformer.": the pipeline component

logger = logging.getLogger(__name__)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<layer>.lora_A.weight`` / ``<layer>.lora_B.weight`` -> detached float32 CPU copies (B unscaled)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach().to("cpu", torch.float32, copy=True)
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach().to("cpu", torch.float32, copy=True)
    return out


def _check_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    expected = {k: tuple(s) for k, s in _lora_shapes(model).items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = [f"missing {k!r}" for k in expected if k not in found]
    problems += [f"unexpected {k!r}" for k in found if k not in expected]
    problems += [
        f"{k!r}: expected shape {list(s)}, found {list(found[k])}"
        for k, s in expected.items()
        if k in found and found[k] != s
    ]
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED]) + (" ..." if len(problems) > _MAX_LISTED else "")
        raise LoRAError(f"LoRA state dict does not fit the model's LoRA layers: {listed}")


def _lora_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Key -> shape of what ``lora_state_dict`` returns, without copying anything."""
    out: dict[str, torch.Size] = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.shape
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.shape
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Loads ``lora_state_dict``-style values (e.g. an EMA) into the model's LoRA layers; strict."""
    _check_lora_state_dict(model, state_dict)
    for name, layer in lora_layers(model).items():
        layer.lora_A.weight.copy_(state_dict[f"{name}.lora_A.weight"])
        layer.lora_B.weight.copy_(state_dict[f"{name}.lora_B.weight"])


def ema_lora_state_dicts(
    state_dicts: Iterable[Mapping[str, torch.Tensor]], gamma: float = 0.9
) -> dict[str, torch.Tensor]:
    """Exponential moving average over saved checkpoints, oldest first (ExVideo's post-training EMA).

    ``ema_1 = sd_1``, ``ema_k = gamma * ema_{k-1} + (1 - gamma) * sd_k``, in float32. A and B are
    averaged separately, as ExVideo averages every trainable tensor. ``state_dicts`` may be a
    generator that loads one checkpoint at a time. All must have the same keys and shapes.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    ema: dict[str, torch.Tensor] | None = None
    for i, sd in enumerate(state_dicts):
        if ema is None:
            ema = {k: v.detach().to(torch.float32, copy=True) for k, v in sd.items()}
            continue
        if set(sd) != set(ema):
            diff = sorted(set(sd) ^ set(ema))
            raise LoRAError(f"checkpoint {i} has other keys than checkpoint 0 (e.g. {diff[:5]})")
        for k, v in sd.items():
            if v.shape != ema[k].shape:
                raise LoRAError(
                    f"checkpoint {i}, key {k!r}: shape {list(v.shape)}, checkpoint 0 has {list(ema[k].shape)}"
                )
            ema[k].mul_(gamma).add_(v.detach().to(ema[k].device, torch.float32), alpha=1.0 - gamma)
    if ema is None:
        raise ValueError("ema_lora_state_dicts: no state dicts given")
    return ema


def export_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    lora_weights: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    format: str | None = None,
) -> Path:
    """Writes the model's LoRA as a safetensors file, atomically; returns the path.

    Args:
        format: "diffsynth" (default): keys ``<DiffSynth module>.lora_A.default.weight`` (A) and
            ``...lora_B.default.weight`` (scale * B, alpha/rank folded in), every layer under
            DiffSynth-Studio's name (it skips a whole file if one name is not its own), so its merge
            ``W += 1.0 * B @ A`` and our ``merge_lora(..., alpha=1.0)`` both give the trained model.
            "diffusers": keys ``transformer.<diffusers module>.lora_A.weight`` / ``lora_B.weight``
            (B as trained) and the LoraConfig in the ``lora_adapter_metadata`` header entry, so
            diffusers' scale lora_alpha / r gives the trained model. None: the first layout of the DiT's
            family (``families``: "diffsynth" on CogVideoX 1.0, "diffusers" on 1.5). A layout the family has
            no files in is refused: DiffSynth-Studio has no CogVideoX 1.5.
        metadata: extra header entries (str -> str). The header also records the per-layer ranks,
            alphas and targets (JSON, under the file's module names).
        lora_weights: ``lora_state_dict``-style values to write instead of the model's current
            ones (e.g. ``ema_lora_state_dicts(...)``); scales still come from the model's layers.
        dtype: of the written tensors (the fold is done in float32 first).

    The file is written atomically (:mod:`diffsynth_cog.io.atomic`): a failed write leaves no partial
    file and any older file intact.
    """
    format = _check_family_format(model, format)
    layers = lora_layers(model)
    if not layers:
        raise LoRAError(f"export_lora: {type(model).__name__} has no LoRA layers (call inject_lora first)")
    if lora_weights is not None:
        _check_lora_state_dict(model, lora_weights)
    names = _file_names(layers, format)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        a = (lora_weights[f"{name}.lora_A.weight"] if lora_weights is not None else layer.lora_A.weight).detach()
        b = (lora_weights[f"{name}.lora_B.weight"] if lora_weights is not None else layer.lora_B.weight).detach()
        b = b.to("cpu", torch.float32)
        if format == DIFFSYNTH:
            key_a, key_b = f"{names[name]}.lora_A.default.weight", f"{names[name]}.lora_B.default.weight"
            b = b * layer.scale
        else:
            key_a, key_b = (
                f"{_DIFFUSERS_PREFIX}{names[name]}.lora_A.weight",
                f"{_DIFFUSERS_PREFIX}{names[name]}.lora_B.weight",
            )
        tensors[key_a] = a.to("cpu", torch.float32).to(dtype).contiguous()
        tensors[key_b] = b.to(dtype).contiguous()
    header = {
        "format": "pt",
        "lora_format": format,
        "lora_scale_folded_into_B": "true" if format == DIFFSYNTH else "false",
        "lora_targets": json.dumps([names[n] for n in layers]),
        "lora_ranks": json.dumps({names[n]: m.rank for n, m in layers.items()}),
        "lora_alphas": json.dumps({names[n]: m.alpha for n, m in layers.items()}),
    }
    if format == DIFFUSERS:
        config = _peft_config(layers, names)
        prefixed = {f"{_DIFFUSERS_PREFIX}{k}": v for k, v in config.items()}  # as save_lora_weights writes it
        header[_HEADER_CONFIG_KEY] = json.dumps(prefixed, indent=2, sort_keys=True)
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise LoRAError(f"export_lora: metadata must map str to str; {k!r}: {v!r} does not")
        if k in header or k == _HEADER_CONFIG_KEY:
            raise LoRAError(f"export_lora: metadata key {k!r} is reserved")
        header[k] = v
    target = save_safetensors_atomic(path, tensors, header)
    logger.info("exported LoRA of %d layers to %s (%s layout)", len(layers), target, format)
    return target


def _check_family_format(model: nn.Module, format: str | None) -> str:
    """The layout to write (``format``, or the family's first), refused where the model's family has no such files."""
    family = getattr(getattr(model, "config", None), "family", None)  # a DiT's family (families.Family)
    if format is None:
        format = family.lora_layouts[0] if family is not None else DIFFSYNTH
    if format not in LORA_EXPORT_FORMATS:
        raise LoRAError(f"export_lora: format must be one of {list(LORA_EXPORT_FORMATS)}, got {format!r}")
    if family is not None and format not in family.lora_layouts:
        raise LoRAError(
            f"export_lora: format {format!r} is refused on {family.label}: DiffSynth-Studio has no CogVideoX 1.5, so "
            f"no tool reads a DiffSynth-layout LoRA of it (ours refuses one on load); use format "
            f"{family.lora_layouts[0]!r} (diffusers / PEFT names, which diffusers and ModelManager.load_lora read)"
        )
    return format


def _file_names(layers: Mapping[str, LoRALinear], format: str) -> dict[str, str]:
    """Our layer name -> its module name in the file's layout. A layer that is not one of the DiT's keeps
    its own name in the DiffSynth layout (a LoRA of another module), and is refused in diffusers'."""
    names: dict[str, str] = {}
    unknown = []
    for name in layers:
        try:
            names[name] = dit_name_in(format, name)
        except KeyError:
            names[name] = name
            unknown.append(name)
    if unknown and format == DIFFUSERS:
        raise LoRAError(
            f"export_lora: {unknown[:5]} are not CogVideoX DiT layers, so they have no diffusers name; "
            "export a LoRA of the DiT (CogDiT), or use format='diffsynth'"
        )
    return names


def _peft_config(layers: Mapping[str, LoRALinear], names: Mapping[str, str]) -> dict[str, object]:
    """The PEFT LoraConfig fields that give each layer its rank and lora_alpha: the most common of
    each as ``r`` / ``lora_alpha``, the others as full-name patterns (``^`` + the escaped name, the
    form diffusers itself uses), matched as PEFT matches them."""
    r = Counter(m.rank for m in layers.values()).most_common(1)[0][0]
    lora_alpha = Counter(m.alpha for m in layers.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {"^" + re.escape(names[n]): m.rank for n, m in layers.items() if m.rank != r},
        "alpha_pattern": {"^" + re.escape(names[n]): m.alpha for n, m in layers.items() if m.alpha != lora_alpha},
        "target_modules": sorted(names[n] for n in layers),
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
    }
