"""Building and running the training job, and exporting its LoRA from checkpoints.

* :func:`build_trainer`: a ``lightning.Trainer`` for a :class:`TrainConfig`: strategy "auto" (one
  device, or DDP) or DeepSpeed ZeRO-2 (CUDA only), step checkpoints that resume, CSV logs and a
  TensorBoard run (losses, and the validation videos of :mod:`diffsynth_cog.training.validation`).
* :func:`run_training`: seeds, checks the model and cache up front, trains (optionally resuming),
  and exports the final LoRA as a DiffSynth-format safetensors file.
* :func:`export_lora_from_checkpoints`: reads Lightning ``.ckpt`` files or DeepSpeed checkpoint
  folders (``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary
  pickled objects), optionally averages several with ExVideo's EMA (gamma 0.9), and writes the LoRA.
  It needs no model files: each checkpoint carries the DiT config and the LoRA layout.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.precision import DeepSpeedPrecision

from diffsynth_cog.atomic import torch_save_atomic
from diffsynth_cog.configs import DiTConfig
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
from diffsynth_cog.parallel.layout import ParallelError
from diffsynth_cog.training.cache import CacheInfo
from diffsynth_cog.training.config import TrainConfig, TrainConfigError
from diffsynth_cog.training.console import console_callbacks
from diffsynth_cog.training.datamodule import CachedLatentDataModule
from diffsynth_cog.training.module import (
    CHECKPOINT_KEY,
    CHECKPOINT_STEM,
    CogLoRAModule,
    read_dit_config,
)
from diffsynth_cog.training.sequence import check_degree
from diffsynth_cog.training.validation import ValidationVideoCallback

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"
_STEP_NAME = re.compile(r"^step(\d+)\.ckpt$")
_LORA_KEY = re.compile(r"^(?:dit\.)?(?P<name>.+\.lora_[AB]\.weight)$")
_EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(DiffSynthCogError, ValueError):
    """A training checkpoint is missing, unreadable, or not one this trainer wrote (the message names it)."""


# --------------------------------------------------------------------------------------------- strategy
class _KeepDtypesDeepSpeedPrecision(DeepSpeedPrecision):
    """DeepSpeed in fp32 mode that leaves the module's dtypes alone.

    Lightning's "32-true" DeepSpeed precision would cast the whole module to fp32 (the bf16 base
    too), and its bf16 modes make DeepSpeed cast the fp32 LoRA parameters to bf16. The module
    manages its own dtypes (bf16 frozen base, fp32 LoRA), so the engine runs plain fp32 ZeRO over
    the only parameters it optimises: the fp32 LoRA.
    """

    def __init__(self) -> None:
        super().__init__("32-true")

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def tensor_init_context(self) -> nullcontext:
        return nullcontext()

    def module_init_context(self) -> nullcontext:
        return nullcontext()


def resolve_accelerator(config: TrainConfig) -> str:
    """'gpu' or 'cpu' ('auto' picks a GPU when CUDA is available)."""
    if config.accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if config.accelerator == "gpu" and not torch.cuda.is_available():
        raise TrainConfigError("accelerator: 'gpu' was asked for, but CUDA is not available on this machine")
    return config.accelerator


def build_strategy(config: TrainConfig, accelerator: str) -> str | pl.strategies.Strategy:
    """The Lightning strategy of ``config.strategy`` (DeepSpeed ZeRO-2 only on CUDA GPUs)."""
    if config.strategy == "auto":
        return "auto"
    if accelerator != "gpu":
        raise TrainConfigError(
            "strategy: 'deepspeed_stage_2' is only supported on CUDA GPUs (no CUDA device here); use 'auto'"
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise TrainConfigError("strategy: 'deepspeed_stage_2' needs the deepspeed package (pip install deepspeed)")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if "exclude_frozen_parameters" not in inspect.signature(DeepSpeedStrategy.__init__).parameters:
        raise TrainConfigError(
            "strategy: 'deepspeed_stage_2' needs lightning >= 2.6 (DeepSpeedStrategy(exclude_frozen_parameters=...)); "
            "without it every checkpoint would hold the whole frozen base model"
        )
    return DeepSpeedStrategy(
        stage=2,
        offload_optimizer=config.offload_optimizer,
        # The engine saves the module itself (Lightning's on_save_checkpoint cannot filter it):
        # only this keeps the frozen 5B base out of every checkpoint.
        exclude_frozen_parameters=True,
        precision_plugin=_KeepDtypesDeepSpeedPrecision(),
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``.ckpt`` writer, through :mod:`diffsynth_cog.atomic`: a crash mid-save leaves the
    previous checkpoint (``last.ckpt`` included) intact. Lightning's own writer stages the file in the
    system temp folder, which is not atomic across file systems and never fsyncs.

    DeepSpeed writes its checkpoint folders itself; this plugin serves the "auto" strategy.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        torch_save_atomic(path, checkpoint)


# --------------------------------------------------------------------------------------------- callbacks
class FinalCheckpoint(Callback):
    """Saves the last step's checkpoint (and ``last.ckpt``) when training ends between checkpoint steps.

    Runs in ``on_train_end``, before Lightning tears the strategy down (DeepSpeed needs its engine).
    Whether to save is decided from the step count, never from the file system, so that every
    rank takes the same decision (a DeepSpeed save is a collective operation).
    """

    def __init__(self, dirpath: str | os.PathLike[str], every_n_steps: int) -> None:
        self.dirpath, self.every_n_steps = Path(dirpath), every_n_steps

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps == 0:  # ModelCheckpoint saved this step already
            return
        target = self.dirpath / (CHECKPOINT_STEM.format(step=step) + ".ckpt")
        trainer.save_checkpoint(target)
        trainer.save_checkpoint(self.dirpath / LAST_CHECKPOINT)
        logger.info("saved the final checkpoint %s", target)


# --------------------------------------------------------------------------------------------- trainer
def build_trainer(
    config: TrainConfig,
    *,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    csv_logs: bool = True,
) -> pl.Trainer:
    """A Trainer for ``config``. Strategy "auto" runs anywhere (the tests use it on the CPU);
    "deepspeed_stage_2" needs CUDA GPUs. Checkpoints go to ``<output_dir>/checkpoints``, logs to
    ``<output_dir>/logs`` (CSV, and TensorBoard unless ``config.tensorboard`` is false;
    ``csv_logs=False``: no logger at all)."""
    accelerator = resolve_accelerator(config)
    strategy = build_strategy(config, accelerator)
    checkpoints = ModelCheckpoint(
        dirpath=config.checkpoint_dir,
        filename=CHECKPOINT_STEM,
        auto_insert_metric_name=False,
        every_n_train_steps=config.checkpoint_every_n_steps,
        save_top_k=-1,  # keep every step checkpoint: the EMA export averages them
        save_last=True,
        save_weights_only=False,  # optimizer and loop state too, so a run resumes exactly
        save_on_train_epoch_end=False,
    )
    console, bar = console_callbacks(config.log_every_n_steps, progress)
    all_callbacks: list[Callback] = [
        *callbacks,
        *console,
        FinalCheckpoint(config.checkpoint_dir, config.checkpoint_every_n_steps),
        checkpoints,
    ]
    loggers: list[Logger] = []
    if csv_logs:
        loggers.append(CSVLogger(config.output_path, name="logs"))
        if config.tensorboard:
            if importlib.util.find_spec("tensorboard") is None:
                raise TrainConfigError(
                    "tensorboard: true needs the tensorboard package (pip install tensorboard); or set "
                    '"tensorboard": false in the job'
                )
            # <output_dir>/logs/tensorboard/version_N, beside the CSV logs' logs/version_N
            loggers.append(TensorBoardLogger(config.output_path / "logs", name="tensorboard"))
    kwargs: dict[str, Any] = {}
    if config.strategy == "auto":
        kwargs["precision"] = "32-true"  # the module sets its own dtypes (bf16 base, fp32 LoRA)
        kwargs["plugins"] = [AtomicCheckpointIO()]
    return pl.Trainer(
        accelerator=accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=strategy,
        max_steps=config.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=config.grad_accumulation,
        gradient_clip_val=config.grad_clip if config.grad_clip > 0 else None,
        gradient_clip_algorithm="norm",
        # A run shorter than the interval still logs (metrics.csv): at least its last step.
        log_every_n_steps=min(config.log_every_n_steps, config.max_steps),
        callbacks=all_callbacks,
        logger=loggers or False,
        # The DataModule shards and orders samples itself, resumably (see datamodule.py).
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=bar,
        enable_model_summary=False,
        default_root_dir=config.output_path,
        **kwargs,
    )


def preflight(config: TrainConfig) -> tuple[DiTConfig, CacheInfo]:
    """Checks, before anything heavy is loaded, that the model and the cache exist and fit together."""
    dit_config = read_dit_config(config.model)
    info = CacheInfo.load(config.cache_dir)
    info.check_dit(dit_config)
    try:
        check_degree(config.sequence_parallel, dit_config.num_attention_heads)
    except ParallelError as error:
        raise TrainConfigError(f"sequence_parallel ({config.model}): {error}") from error
    image_to_video = dit_config.in_channels == 2 * dit_config.out_channels
    if config.validation_every_n_steps > 0 and image_to_video != bool(config.validation_images):
        raise TrainConfigError(
            "validation_images: an image-to-video model needs one input image per validation prompt"
            if image_to_video
            else "validation_images: only an image-to-video model takes input images; this one is text-to-video"
        )
    return dit_config, info


def _resume_path(config: TrainConfig, resume: bool | str | os.PathLike[str]) -> Path | None:
    existing = find_step_checkpoints(config.checkpoint_dir) if config.checkpoint_dir.is_dir() else []
    if resume is False or resume is None:
        if existing or (config.checkpoint_dir / LAST_CHECKPOINT).exists():
            raise TrainConfigError(
                f"output_dir: {config.checkpoint_dir} holds checkpoints of an earlier run; resume it "
                "(diffsynth-cog train --resume) or choose another output_dir"
            )
        return None
    if resume is True or resume == "last":
        last = config.checkpoint_dir / LAST_CHECKPOINT
        if last.exists():
            return last
        if existing:
            return existing[-1]
        logger.warning("nothing to resume in %s; starting a new run", config.checkpoint_dir)
        return None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
    return path


@dataclass
class TrainingResult:
    """What :func:`run_training` leaves behind. ``lora_path`` is None on ranks other than 0."""

    trainer: pl.Trainer
    module: CogLoRAModule
    global_step: int
    lora_path: Path | None


def run_training(
    config: TrainConfig,
    resume: bool | str | os.PathLike[str] = False,
    *,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    export: bool = True,
) -> TrainingResult:
    """Trains ``config`` (resuming from ``last.ckpt`` with ``resume=True``, or from a given
    checkpoint), then exports the LoRA to ``<output_dir>/lora/lora-step0001000.safetensors``."""
    pl.seed_everything(config.seed, workers=True)
    dit_config, info = preflight(config)
    ckpt_path = _resume_path(config, resume)
    extra = list(callbacks)
    if config.validation_every_n_steps > 0:
        extra.append(
            ValidationVideoCallback(
                config.model,
                config.validation_prompts,
                config.validation_every_n_steps,
                config.output_path / "validation",
                num_frames=config.validation_num_frames or info.num_frames,
                height=config.validation_height or info.height,
                width=config.validation_width or info.width,
                negative_prompt=config.validation_negative_prompt,
                num_inference_steps=config.validation_num_inference_steps,
                cfg_scale=config.validation_cfg_scale,
                seed=config.seed,
                fps=config.validation_fps,
                images=config.validation_images,
                precision=config.precision,
                attention=config.attention,
            )
        )
    module = CogLoRAModule(config)
    data = CachedLatentDataModule.from_config(config, dit_config=dit_config)
    data.setup("fit")  # opens the cache and checks every record's header before any model is loaded
    trainer = build_trainer(config, callbacks=extra, progress=progress)
    logger.info(
        "training %s on %s (%d records, latents %s) for %d steps%s",
        config.model,
        config.cache_dir,
        len(data.dataset or ()),
        list(info.latent_shape),
        config.max_steps,
        f", resuming from {ckpt_path}" if ckpt_path else "",
    )
    # weights_only: a resumed checkpoint is read without unpickling arbitrary objects.
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    lora_path = None
    if export and trainer.is_global_zero and trainer.global_step > 0:
        name = f"lora-{CHECKPOINT_STEM.format(step=trainer.global_step)}.safetensors"
        lora_path = export_lora(
            module.dit,
            config.lora_dir / name,
            metadata=_export_metadata(module.checkpoint_info(), [trainer.global_step], None),
            dtype=_EXPORT_DTYPES[config.export_dtype],
        )
    return TrainingResult(trainer=trainer, module=module, global_step=trainer.global_step, lora_path=lora_path)


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


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        values = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint with torch.load(weights_only=True) ({type(error).__name__}: "
            f"{str(error)[:300]})"
        ) from error
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(values).__name__}")
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
            f"{p}: not a checkpoint of this trainer (no {CHECKPOINT_KEY!r} entry or no {where!r} weights)"
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


def _export_metadata(info: Mapping[str, Any], steps: Sequence[int], gamma: float | None) -> dict[str, str]:
    train_config = info.get("train_config", {})
    metadata = {
        "diffsynth_cog_global_step": str(steps[-1]),
        "diffsynth_cog_train_config": json.dumps(train_config, sort_keys=True),
        "base_model": str(train_config.get("model", "")),
    }
    if train_config.get("attention"):  # the mask the LoRA learnt under: generate with the same
        metadata[TRAINED_ATTENTION_KEY] = str(train_config["attention"])
    if gamma is not None:
        metadata["diffsynth_cog_ema_gamma"] = repr(gamma)
        metadata["diffsynth_cog_ema_steps"] = json.dumps(list(steps))
    return metadata


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
    format: str = "diffsynth",
) -> Path:
    """Writes the LoRA of training checkpoints (``format``: "diffsynth" or "diffusers", see
    ``export_lora``); returns the file written.

    ``checkpoints``: ``.ckpt`` files, DeepSpeed checkpoint folders, or ``<output_dir>/checkpoints``
    folders (expanded to their step checkpoints, ``last.ckpt`` left out). Without ``ema_gamma`` the
    newest checkpoint is exported; with it, all are averaged oldest first (by the step in their
    names, else in the order given), ``ema_k = gamma * ema_{k-1} + (1 - gamma) * lora_k`` (ExVideo's
    post-training EMA, gamma 0.9), reading one checkpoint at a time. The file records ranks, alphas
    and targets (``export_lora``) plus the step(s) and the training config.
    """
    if format not in LORA_EXPORT_FORMATS:
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
            metadata=_export_metadata(info, steps, ema_gamma),
            lora_weights=weights,
            dtype=dtype,
            format=format,
        )
    except LoRAError as error:
        raise CheckpointError(f"{paths[-1]}: {error}") from error
