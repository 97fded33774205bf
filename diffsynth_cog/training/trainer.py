"""Building and running the training job.

* :func:`build_trainer`: a ``lightning.Trainer`` for a :class:`TrainConfig`: strategy "auto" (one
  device, or DDP) or DeepSpeed ZeRO-2 (CUDA only), step checkpoints that resume, CSV logs and a
  TensorBoard run (losses, and the validation videos of :mod:`diffsynth_cog.training.validation`).
* :func:`run_training`: seeds, checks the model and cache up front, trains (optionally resuming),
  and exports the final LoRA as a DiffSynth-format safetensors file.

Reading checkpoints and exporting a LoRA from them (``export-lora``) live in
:mod:`diffsynth_cog.training.checkpoints`.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from collections.abc import Sequence
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

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.io.atomic import torch_save_atomic
from diffsynth_cog.lora import (
    export_lora,
)
from diffsynth_cog.parallel.layout import ParallelError
from diffsynth_cog.training.cache_layout import CacheInfo
from diffsynth_cog.training.checkpoints import (
    EXPORT_DTYPES,
    LAST_CHECKPOINT,
    export_metadata,
    find_step_checkpoints,
)
from diffsynth_cog.training.config import TrainConfig, TrainConfigError
from diffsynth_cog.training.console import console_callbacks
from diffsynth_cog.training.datamodule import CachedLatentDataModule
from diffsynth_cog.training.module import (
    CHECKPOINT_STEM,
    CogLoRAModule,
    read_dit_config,
)
from diffsynth_cog.training.sequence import check_degree
from diffsynth_cog.training.validation import ValidationVideoCallback

logger = logging.getLogger(__name__)


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
    """Lightning's ``.ckpt`` writer, through :mod:`diffsynth_cog.io.atomic`: a crash mid-save leaves the
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
            metadata=export_metadata(module.checkpoint_info(), [trainer.global_step], None),
            dtype=EXPORT_DTYPES[config.export_dtype],
        )
    return TrainingResult(trainer=trainer, module=module, global_step=trainer.global_step, lora_path=lora_path)
