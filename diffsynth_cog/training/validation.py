"""Validation videos during training: a few fixed prompts, every N optimizer steps, on rank 0.

Each video is written as an mp4 (``<output_dir>/validation/step0000250_0.mp4``) and, when the run
logs to TensorBoard, shown there next to the loss: an animated GIF image summary per prompt
(``validation/0``, ...; the Images tab plays it) plus the mp4's path as a text summary
(``validation/0/file``). The GIF is encoded here with Pillow, not through ``SummaryWriter.add_video``,
which needs moviepy 1.x (``moviepy.editor``, gone in moviepy 2). It is scaled down to at most
:data:`GIF_MAX_SIDE` pixels and :data:`GIF_MAX_FRAMES` frames (every k-th frame, played at the
clip's speed), to keep event files small; the mp4 keeps every pixel.

The training process holds the T5 and the VAE only as long as it needs them: the prompts are
encoded once, in ``setup`` (before the DiT is loaded), and the text encoder is freed right after;
at each validation the VAE encoder (image-to-video only, for the input image) is loaded for the
sampling and freed, then the decoder is loaded for decoding and freed.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.training.module import CHECKPOINT_STEM, base_dtype, model_folder

logger = logging.getLogger(__name__)

GIF_MAX_SIDE = 256
GIF_MAX_FRAMES = 65


def gif_bytes(frames: Sequence[Image.Image], fps: float) -> tuple[bytes, int, int]:
    """An animated GIF of ``frames`` (scaled to at most GIF_MAX_SIDE, at most GIF_MAX_FRAMES frames,
    playing at the clip's speed): (bytes, height, width)."""
    stride = max(1, math.ceil(len(frames) / GIF_MAX_FRAMES))
    kept = list(frames)[::stride]
    w, h = kept[0].size
    factor = min(1.0, GIF_MAX_SIDE / max(w, h))
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    images = [f.convert("RGB").resize(size, Image.Resampling.BILINEAR) for f in kept]
    buffer = io.BytesIO()
    duration = round(1000 * stride / fps)  # ms per shown frame
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    return buffer.getvalue(), size[1], size[0]


def log_gif(writer: Any, tag: str, frames: Sequence[Image.Image], fps: float, step: int) -> None:
    """Writes ``frames`` as an animated-GIF image summary (what TensorBoard plays as a video)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    data, height, width = gif_bytes(frames, fps)
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=data)
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def _tensorboard_writer(trainer: pl.Trainer) -> Any | None:
    from lightning.pytorch.loggers import TensorBoardLogger

    for run_logger in trainer.loggers:
        if isinstance(run_logger, TensorBoardLogger):
            return run_logger.experiment
    return None


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ValidationVideoCallback(Callback):
    """Every ``every_n_steps`` optimizer steps, rank 0 generates a video per prompt with the model
    being trained (LoRA layers live, nothing merged), writes ``step0000250_0.mp4``, ... to
    ``output_dir`` and, with a TensorBoard logger, logs them there (see the module docstring).

    Needs ``text_encoder/``, ``tokenizer/`` and ``vae/`` in the model folder. ``images``: one input
    image per prompt for an image-to-video model (paths). ``num_frames`` / ``height`` / ``width``:
    the generated clip (e.g. the cache's). ``attention``: the job's sparse mask, so the videos run the way
    inference will run the LoRA. Other ranks wait for rank 0 at their next collective.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        prompts: Sequence[str],
        every_n_steps: int,
        output_dir: str | os.PathLike[str],
        *,
        num_frames: int,
        height: int,
        width: int,
        negative_prompt: str = "",
        num_inference_steps: int = 50,
        cfg_scale: float = 7.0,
        seed: int = 0,
        fps: int = 8,
        images: Sequence[str] = (),
        precision: str = "auto",
        attention: str | None = None,
    ) -> None:
        if every_n_steps < 1 or not prompts:
            raise ValueError("ValidationVideoCallback needs every_n_steps >= 1 and at least one prompt")
        if images and len(images) != len(prompts):
            raise ValueError(f"{len(images)} validation images for {len(prompts)} prompts: give one per prompt")
        folder = model_folder(model_dir)
        if folder.text_encoder is None or folder.vae is None:
            raise FileNotFoundError(
                f"validation videos need a whole model folder with text_encoder/ and vae/; {model_dir} is not one"
            )
        self.folder = folder
        self.prompts, self.negative_prompt, self.images = list(prompts), negative_prompt, list(images)
        self.every_n_steps, self.output_dir = every_n_steps, Path(output_dir)
        self.num_frames, self.height, self.width = num_frames, height, width
        self.num_inference_steps, self.cfg_scale, self.seed, self.fps = num_inference_steps, cfg_scale, seed, fps
        self.precision = precision
        self.attention = attention  # the mask the LoRA trains under (None: dense), as inference will run it
        self._embeddings: list[torch.Tensor] | None = None
        self._negative: torch.Tensor | None = None
        self._last_step = -1
        self.written: list[Path] = []

    # -- the text encoder: once, before the DiT is loaded ----------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self._embeddings is None:
            device = trainer.strategy.root_device
            self.encode_prompts(device, base_dtype(self.precision, device), self.folder.max_text_seq_length)

    def encode_prompts(self, device: torch.device, dtype: torch.dtype, max_text_length: int) -> None:
        """Encodes the prompts and the negative prompt (kept on the CPU) and frees the T5 again."""
        from diffsynth_cog.loading.text_encoder_loader import load_text_encoder

        encoder = load_text_encoder(
            self.folder.require("text_encoder"),
            tokenizer_path=self.folder.tokenizer,
            dtype=dtype,
            device=device,
            max_length=max_text_length,  # as the prepare step encoded the training prompts
        )
        with torch.no_grad():
            self._embeddings = [encoder.encode(p, device=device).to(dtype).cpu() for p in self.prompts]
            self._negative = encoder.encode(self.negative_prompt, device=device).to(dtype).cpu()
        del encoder  # T5-XXL is ~10 GB in bf16: not kept next to the training run
        _free(device)
        logger.info("encoded %d validation prompts; text encoder freed", len(self.prompts))

    # -- every N steps -------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # Called after every micro-batch: act once per optimizer step.
        if step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        if trainer.is_global_zero:
            paths, videos = self.generate(pl_module.dit, step)
            writer = _tensorboard_writer(trainer)
            if writer is not None:
                for i, (path, frames) in enumerate(zip(paths, videos, strict=True)):
                    log_gif(writer, f"validation/{i}", frames, self.fps, step)
                    writer.add_text(f"validation/{i}/file", f"{path} ({self.prompts[i]!r})", step)
                writer.flush()

    def _load_vae_part(self, part: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffsynth_cog.loading.vae_loader import load_vae_decoder, load_vae_encoder

        load = load_vae_encoder if part == "encoder" else load_vae_decoder
        return load(
            self.folder.require("vae"), dtype=dtype, device=device, scaling_factor=self.folder.vae_scaling_factor
        ).eval()

    def generate(self, dit: CogDiT, step: int) -> tuple[list[Path], list[list[Image.Image]]]:
        """Samples every prompt with ``dit``, then decodes and writes the videos; returns paths and frames."""
        from diffsynth_cog.io.video import save_video
        from diffsynth_cog.pipeline.cog_video import CogVideoPipeline
        from diffsynth_cog.schedulers import SchedulerConfig

        scheduler = self.folder.scheduler_config
        config = SchedulerConfig.from_file(scheduler) if scheduler is not None else None
        device, dtype = dit.proj_out.weight.device, dit.proj_out.weight.dtype
        if self._embeddings is None:  # no setup() call (used outside a Trainer)
            self.encode_prompts(device, dtype, dit.config.max_text_seq_length)
        tiled = device.type == "cuda"  # bounds the VAE's memory at 480x720
        was_training = dit.training
        dit.eval()
        try:
            encoder = self._load_vae_part("encoder", device, dtype) if self.images else None
            pipe = CogVideoPipeline(dit, None, encoder, None, scheduler_config=config, device=device, torch_dtype=dtype)
            latents = [
                pipe(
                    prompt_emb=emb.to(device),
                    negative_prompt_emb=self._negative.to(device),
                    input_image=self.images[i] if self.images else None,
                    height=self.height,
                    width=self.width,
                    num_frames=self.num_frames,
                    cfg_scale=self.cfg_scale,
                    num_inference_steps=self.num_inference_steps,
                    seed=self.seed,
                    attention=self.attention,
                    tiled=tiled,
                    output_type="latent",
                    progress_bar=False,
                )
                for i, emb in enumerate(self._embeddings or [])
            ]
            del pipe, encoder
            _free(device)
            decoder = self._load_vae_part("decoder", device, dtype)
            pipe = CogVideoPipeline(dit, None, None, decoder, scheduler_config=config, device=device, torch_dtype=dtype)
            videos = [pipe.decode(lat, "pil", tiled, False) for lat in latents]
            del pipe, decoder
            _free(device)
        finally:
            dit.train(was_training)
        paths = []
        for i, frames in enumerate(videos):
            path = self.output_dir / f"{CHECKPOINT_STEM.format(step=step)}_{i}.mp4"
            save_video(frames, path, fps=self.fps)
            paths.append(path)
        logger.info("step %d: wrote %d validation videos to %s", step, len(paths), self.output_dir)
        self.written += paths
        return paths, videos
