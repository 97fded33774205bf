"""The trained LoRA as data: state dicts, ExVideo's checkpoint EMA, and the DiffSynth-layout export.

``lora_state_dict`` / ``load_lora_state_dict`` give and take what a checkpoint holds,
``ema_lora_state_dicts`` averages saved checkpoints as ExVideo does, and ``export_lora`` writes a
DiffSynth-layout file with the alpha/rank scale folded into B, so DiffSynth's merge and
``merge_lora(..., alpha=1.0)`` both reproduce the trained model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from diffsynth_cog.atomic import save_safetensors_atomic
from diffsynth_cog.errors import LoRAError
from diffsynth_cog.lora.files import _HEADER_CONFIG_KEY, _MAX_LISTED
from diffsynth_cog.lora.layers import lora_layers

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
) -> Path:
    """Writes the model's LoRA as a DiffSynth-layout safetensors file, atomically; returns the path.

    Keys: ``<layer>.lora_A.default.weight`` (A) and ``<layer>.lora_B.default.weight``
    (scale * B, alpha/rank folded in), so DiffSynth's merge ``W += 1.0 * B @ A`` and our
    ``merge_lora(..., alpha=1.0)`` both give the trained model. The header records the per-layer
    ranks, alphas and targets (JSON strings) plus any ``metadata`` given.

    Args:
        lora_weights: ``lora_state_dict``-style values to write instead of the model's current
            ones (e.g. ``ema_lora_state_dicts(...)``); scales still come from the model's layers.
        dtype: of the written tensors (the fold is done in float32 first).

    The file is written atomically (:mod:`diffsynth_cog.atomic`): a failed write leaves no partial
    file and any older file intact.
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError(f"export_lora: {type(model).__name__} has no LoRA layers (call inject_lora first)")
    if lora_weights is not None:
        _check_lora_state_dict(model, lora_weights)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        a = (lora_weights[f"{name}.lora_A.weight"] if lora_weights is not None else layer.lora_A.weight).detach()
        b = (lora_weights[f"{name}.lora_B.weight"] if lora_weights is not None else layer.lora_B.weight).detach()
        tensors[f"{name}.lora_A.default.weight"] = a.to("cpu", torch.float32).to(dtype).contiguous()
        tensors[f"{name}.lora_B.default.weight"] = (b.to("cpu", torch.float32) * layer.scale).to(dtype).contiguous()
    header = {
        "format": "pt",
        "lora_format": "diffsynth",
        "lora_scale_folded_into_B": "true",
        "lora_targets": json.dumps(list(layers)),
        "lora_ranks": json.dumps({n: m.rank for n, m in layers.items()}),
        "lora_alphas": json.dumps({n: m.alpha for n, m in layers.items()}),
    }
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise LoRAError(f"export_lora: metadata must map str to str; {k!r}: {v!r} does not")
        if k in header or k == _HEADER_CONFIG_KEY:
            raise LoRAError(f"export_lora: metadata key {k!r} is reserved")
        header[k] = v
    target = save_safetensors_atomic(path, tensors, header)
    logger.info("exported LoRA of %d layers to %s", len(layers), target)
    return target
