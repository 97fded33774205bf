"""Training checkpoints: reading their LoRA, and exporting a LoRA from one or several of them.

* :func:`read_lora_checkpoint`: the LoRA of a Lightning ``.ckpt`` file or a DeepSpeed checkpoint folder
  (``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickled objects).
* :func:`export_lora_from_checkpoints`: optionally averages several step checkpoints with ExVideo's EMA
  (gamma 0.9) and writes the LoRA. It needs no model files: each checkpoint carries the DiT config and
  the LoRA layout (:mod:`diffsynth_cog.training.module` writes them).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffsynth_cog.configs import DiTConfig, dit_family
from diffsynth_cog.errors import DiffSynthCogError
from diffsynth_cog.lora import (
    LORA_EXPORT_FORMATS,
    TRAINED_ATTENTION_KEY,
    LoRAError,
    ema_lora_state_dicts,
    export_lora,
    inject_lora,
)
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.training.module import CHECKPOINT_KEY

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"
_STEP_NAME = re.compile(r"^step(\d+)\.ckpt$")
_LORA_KEY = re.compile(r"^(?:dit\.)?(?P<name>.+\.lora_[AB]\.weight)$")
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(DiffSynthCogError, ValueError):
    """A training checkpoint is missing, unreadable, or not one this trainer wrote (the message names it)."""


# --------------------------------------------------------------------------------------------- reading checkpoints
@dataclass
class LoRACheckpoint:
    """The LoRA of one training checkpoint.

    lora_weights: ``blocks.0.attn1.to_q.lora_A.weight`` -> fp32 tensor (B unscaled, as trained).
    info: our checkpoint entry (``train_config``, ``dit_config``, ``lora_layers``).
    """

    path: Path
    global_step: int
    lora_weights: dict[str, torch.Tensor]
    info: dict[str, Any]


def _deepspeed_model_file(folder: Path) -> Path:
    """The model-states file of a Lightning DeepSpeed checkpoint folder (tag from ``latest``)."""
    tag_file = folder / "latest"
    tag = tag_file.read_text(encoding="utf-8").strip() if tag_file.is_file() else "checkpoint"
    tag_dir = folder / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{folder}: not a DeepSpeed checkpoint folder (no {tag}/ subfolder)")
    preferred = tag_dir / "mp_rank_00_model_states.pt"
    if preferred.is_file():
        return preferred
    found = sorted(tag_dir.glob("*model_states.pt"))
    if not found:
        raise CheckpointError(f"{tag_dir}: no *model_states.pt file in this DeepSpeed checkpoint")
    return found[0]


_WHAT_TO_PASS = (
    "export-lora reads the step*.ckpt / last.ckpt files (or DeepSpeed checkpoint folders) that "
    "'diffsynth-cog train' writes into <output_dir>/checkpoints: pass one of them, or that folder"
)


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does: an 8-byte header length, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100 * 2**20


def _torch_load(path: Path) -> dict[str, Any]:
    if _is_safetensors(path):
        raise CheckpointError(
            f"{path} is a safetensors file (an exported LoRA or model weights), not a training checkpoint; "
            + _WHAT_TO_PASS
        )
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: our message says what matters
            warnings.simplefilter("ignore")
            values = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a file that is no checkpoint fails in any of pickle's ways (KeyError too)
        logger.debug("torch.load(%s, weights_only=True) failed", path, exc_info=True)
        raise CheckpointError(
            f"{path} is not a training checkpoint: torch.load(weights_only=True) cannot read it "
            f"({type(error).__name__}; -v shows the details); " + _WHAT_TO_PASS
        ) from error
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(values).__name__}; " + _WHAT_TO_PASS)
    return values


def read_lora_checkpoint(path: str | os.PathLike[str]) -> LoRACheckpoint:
    """Reads the LoRA weights and our entry from a ``.ckpt`` file or a DeepSpeed checkpoint folder."""
    p = Path(path)
    if p.is_dir():
        values = _torch_load(_deepspeed_model_file(p))
        weights = values.get("module")
        where = "module"
    elif p.is_file():
        values = _torch_load(p)
        weights = values.get("state_dict")
        where = "state_dict"
    else:
        raise CheckpointError(f"checkpoint not found: {p}")
    info = values.get(CHECKPOINT_KEY)
    if not isinstance(info, dict) or not isinstance(weights, Mapping):
        raise CheckpointError(
            f"{p}: not a checkpoint of this trainer (no {CHECKPOINT_KEY!r} entry or no {where!r} weights); "
            + _WHAT_TO_PASS
        )
    lora: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        match = _LORA_KEY.match(key)
        if match and isinstance(value, torch.Tensor):
            lora[match.group("name")] = value.detach().to(torch.float32)
    if not lora:
        raise CheckpointError(f"{p}: the checkpoint holds no LoRA weights (keys like {list(weights)[:3]})")
    return LoRACheckpoint(path=p, global_step=int(values.get("global_step", -1)), lora_weights=lora, info=info)


def find_step_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """``step*.ckpt`` files (or DeepSpeed folders) in ``folder``, oldest step first (``last.ckpt`` left out)."""
    found = []
    for entry in Path(folder).iterdir():
        match = _STEP_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return [p for _, p in sorted(found)]


def _is_single_checkpoint(path: Path) -> bool:
    return path.is_file() or (path / "latest").is_file() or (path / "checkpoint").is_dir()


def expand_checkpoints(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Checkpoint paths, with a folder of step checkpoints (``<output_dir>/checkpoints``) expanded."""
    out: list[Path] = []
    for given in paths:
        p = Path(given)
        if not p.exists():
            raise CheckpointError(f"checkpoint not found: {p}")
        if _is_single_checkpoint(p):
            out.append(p)
            continue
        steps = find_step_checkpoints(p)
        if not steps:
            raise CheckpointError(f"{p}: no step*.ckpt checkpoints in this folder")
        out += steps
    return out


# --------------------------------------------------------------------------------------------- export
def lora_model_from_info(info: Mapping[str, Any], source: str = "checkpoint") -> CogDiT:
    """A CogDiT on the meta device (no memory, no weights) with the checkpoint's LoRA layers, for export."""
    try:
        dit_config = DiTConfig.from_dict(dict(info["dit_config"]), source=f"{source}: dit_config")
        layout = {name: (int(v["rank"]), float(v["alpha"])) for name, v in info["lora_layers"].items()}
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: malformed {CHECKPOINT_KEY!r} entry ({error})") from error
    with torch.device("meta"):
        model = CogDiT(dit_config)
    inject_lora(model, layout)  # full layer names: each target matches exactly its layer
    return model


# TrainConfig fields that name local files or folders: an exported LoRA keeps only their last part (the name), so
# that a published file does not show its author's folder layout, unless paths are asked for.
PATH_FIELDS = ("model", "cache_dir", "output_dir", "validation_images")


def _name(path: Any) -> str:
    return Path(str(path)).name or str(path)


def shareable_train_config(train_config: Mapping[str, Any], include_paths: bool = False) -> dict[str, Any]:
    """The training config as an exported LoRA records it: the path fields cut to their names."""
    values = dict(train_config)
    if include_paths:
        return values
    for key in PATH_FIELDS:
        value = values.get(key)
        if isinstance(value, (list, tuple)):
            values[key] = [_name(v) for v in value]
        elif value:
            values[key] = _name(value)
    return values


def export_metadata(
    info: Mapping[str, Any], steps: Sequence[int], gamma: float | None, *, include_paths: bool = False
) -> dict[str, str]:
    """The header entries of an exported LoRA: step(s), the training config (file and folder names only, unless
    ``include_paths``), the base model's name and DiT family, the attention it was trained under."""
    train_config = shareable_train_config(info.get("train_config", {}), include_paths)
    metadata = {
        "diffsynth_cog_global_step": str(steps[-1]),
        "diffsynth_cog_train_config": json.dumps(train_config, sort_keys=True),
        "base_model": str(train_config.get("model", "")),
    }
    family = _family(info)
    if family is not None:
        metadata["base_model_family"] = family
    if train_config.get("attention"):  # the mask the LoRA learnt under: generate with the same
        metadata[TRAINED_ATTENTION_KEY] = str(train_config["attention"])
    if gamma is not None:
        metadata["diffsynth_cog_ema_gamma"] = repr(gamma)
        metadata["diffsynth_cog_ema_steps"] = json.dumps(list(steps))
    return metadata


def _family(info: Mapping[str, Any]) -> str | None:
    """The DiT family of the checkpoint (cogvideox-5b, ...), None when its dit_config does not say."""
    try:
        return dit_family(DiTConfig.from_dict(dict(info["dit_config"]), source="checkpoint"))
    except (KeyError, TypeError, ValueError):  # an older or partial entry: the header goes without it
        return None


def _ordered(paths: Sequence[Path]) -> list[Path]:
    """Oldest first, by the step in the names (step0000250.ckpt); the given order if a name has none."""
    steps = [_STEP_NAME.match(p.name) for p in paths]
    if all(steps):
        return [p for _, p in sorted(zip([int(m.group(1)) for m in steps], paths, strict=True))]
    return list(paths)


def export_lora_from_checkpoints(
    checkpoints: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    ema_gamma: float | None = None,
    dtype: torch.dtype = torch.float32,
    format: str | None = None,
    include_paths: bool = False,
) -> Path:
    """Writes the LoRA of training checkpoints (``format``: "diffsynth" or "diffusers", see
    ``export_lora``; None = the family's layout: DiffSynth's on CogVideoX 1.0, diffusers' on 1.5); returns the
    file written.

    ``checkpoints``: ``.ckpt`` files, DeepSpeed checkpoint folders, or ``<output_dir>/checkpoints``
    folders (expanded to their step checkpoints, ``last.ckpt`` left out). Without ``ema_gamma`` the
    newest checkpoint is exported; with it, all are averaged oldest first (by the step in their
    names, else in the order given), ``ema_k = gamma * ema_{k-1} + (1 - gamma) * lora_k`` (ExVideo's
    post-training EMA, gamma 0.9), reading one checkpoint at a time. The file records ranks, alphas
    and targets (``export_lora``) plus the step(s) and the training config, whose paths are cut to their
    names unless ``include_paths`` (:func:`export_metadata`).
    """
    if format is not None and format not in LORA_EXPORT_FORMATS:
        raise ValueError(f"format must be one of {list(LORA_EXPORT_FORMATS)}, got {format!r}")
    paths = _ordered(expand_checkpoints(checkpoints))
    if ema_gamma is not None and not 0.0 <= ema_gamma <= 1.0:
        raise ValueError(f"ema gamma must be in [0, 1], got {ema_gamma}")
    if ema_gamma is None:
        if len(paths) > 1 and not all(_STEP_NAME.match(p.name) for p in paths):
            raise CheckpointError(
                f"{len(paths)} checkpoints given ({[str(p) for p in paths[:3]]}...): pass one, or average them "
                "with an EMA gamma (--ema 0.9)"
            )
        newest = read_lora_checkpoint(paths[-1])
        info, weights, steps = newest.info, newest.lora_weights, [newest.global_step]
        logger.info("exporting the LoRA of %s (step %d)", newest.path, newest.global_step)
    else:
        steps = []
        seen: dict[str, Any] = {}

        def stream() -> Iterator[dict[str, torch.Tensor]]:
            for path in paths:
                checkpoint = read_lora_checkpoint(path)
                layers = checkpoint.info.get("lora_layers")
                if seen and layers != seen["info"].get("lora_layers"):
                    raise CheckpointError(
                        f"{path} and {seen['path']} have different LoRA layers; they cannot be averaged"
                    )
                seen.update(info=checkpoint.info, path=path)
                steps.append(checkpoint.global_step)
                yield checkpoint.lora_weights

        weights = ema_lora_state_dicts(stream(), gamma=ema_gamma)
        info = seen["info"]
        logger.info("EMA (gamma %g) over %d checkpoints, steps %s", ema_gamma, len(steps), steps)
    model = lora_model_from_info(info, source=str(paths[-1]))
    try:
        return export_lora(
            model,
            output,
            metadata=export_metadata(info, steps, ema_gamma, include_paths=include_paths),
            lora_weights=weights,
            dtype=dtype,
            format=format,
        )
    except LoRAError as error:
        raise CheckpointError(f"{paths[-1]}: {error}") from error
