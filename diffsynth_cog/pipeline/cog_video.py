"""CogVideoPipeline: text-to-video, video-to-video and image-to-video with CogVideoX.

The denoising loop is a plain function of its inputs (prompt embeddings, initial latents,
sampler, DiT), so a 129-frame ExVideo generation is just ``num_frames=129`` with the LoRA merged.

Memory modes (``enable_*`` methods):
  * default: every model on the device;
  * model CPU offload: each model moves to the device only while it runs (text encoder, DiT, VAE);
  * sequential CPU offload: the DiT and the text encoder stream their blocks to the device one at a
    time (lowest memory, slowest);
  * tiled VAE (``tiled=True``) bounds decode memory in space, ``dit_tiled=True`` runs the DiT on
    overlapping spatial tiles for resolutions above its base grid.

Longer videos (README "Longer videos"): ``windows=`` denoises overlapping temporal windows (any length
at the memory of one window), ``attention="window:2"`` / ``"radial"`` a block-sparse mask, ``riflex=True``
RIFLEx's temporal RoPE, ``step_cache=`` TeaCache step skipping, :meth:`CogVideoPipeline.extend_video`
continues a video.

Several GPUs: ``enable_parallel`` (under torchrun) shares every generation between the ranks
(``diffsynth_cog.parallel``).

This module holds one concept, the generation: construction, ``__call__`` / ``generate`` (check, seed, compose
the stages, record the settings) and ``extend_video``. The model stages (``encode_prompt``, ``encode_video``,
``decode_latents``, ``make_denoiser``, ``encode_conditions``, ``initial_latents``, ``decode``) and the memory and
parallel switches (``enable_*``, ``disable_*``) come from :class:`~diffsynth_cog.pipeline.stages.PipelineStages`
(``stages``), every one still a method of :class:`CogVideoPipeline`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffsynth_cog.denoise.denoiser import AttentionPart, StepSkipper
from diffsynth_cog.denoise.windows import WindowSpec
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.models.text_encoder import CogTextEncoder
from diffsynth_cog.models.tiling import TileSpec
from diffsynth_cog.models.vae import CogVAEDecoder, CogVAEEncoder
from diffsynth_cog.parallel.context import ParallelContext
from diffsynth_cog.pipeline.checks import CheckedCall, check_call
from diffsynth_cog.pipeline.continuation import KeptFrames
from diffsynth_cog.pipeline.extend import extend
from diffsynth_cog.pipeline.model_manager import ModelManager
from diffsynth_cog.pipeline.offload import ModelOffloader
from diffsynth_cog.pipeline.options import (
    RANDOM_SEED,
    GenerationOptions,
    StepCacheSpec,
    keywords_doc,
)
from diffsynth_cog.pipeline.sampling import (
    Conventions,
    StepCallback,
    denoise,
    drop_padding,
)
from diffsynth_cog.pipeline.settings import video_settings
from diffsynth_cog.pipeline.stages import PipelineStages
from diffsynth_cog.schedulers import Sampler, SchedulerConfig, make_sampler, scheduler_preset

logger = logging.getLogger(__name__)


class CogVideoPipeline(PipelineStages):
    """Generates videos with a CogVideoX DiT, VAE and T5 text encoder.

    Build it with :meth:`from_model_manager`. Call it like DiffSynth-Studio's pipeline::

        video = pipe(prompt="...", num_frames=129, cfg_scale=7.0, num_inference_steps=100, seed=6)
    """

    def __init__(
        self,
        dit: CogDiT,
        text_encoder: CogTextEncoder | None,
        vae_encoder: CogVAEEncoder | None,
        vae_decoder: CogVAEDecoder | None,
        scheduler_config: SchedulerConfig | None = None,
        device: str | torch.device = "cuda",
        torch_dtype: torch.dtype = torch.bfloat16,
        offload: str = "none",
    ) -> None:
        self.dit = dit
        self.text_encoder = text_encoder
        self.vae_encoder = vae_encoder
        self.vae_decoder = vae_decoder
        if scheduler_config is None:
            # 2B (sin-cos positions) was trained with a shifted SNR; 5B without.
            preset = dit.family.scheduler
            scheduler_config = scheduler_preset(preset)
            logger.info("no scheduler_config.json found; using the %s scheduler preset", preset)
        self.scheduler_config = scheduler_config
        self.device = torch.device(device)
        self.torch_dtype = torch_dtype
        # The starting memory mode: with "model" or "sequential", models loaded on the CPU never visit the
        # device all at once (the later enable_* calls would come after that).
        self.offloader = ModelOffloader(self.device, mode=offload)
        self.offloader.register(self.models())
        self.parallel: ParallelContext | None = None
        self.model_manager: ModelManager | None = None  # where the models came from, and the LoRAs merged
        # The settings of the last video generated (``pipeline.settings``): pass them to save_video(settings=...)
        self.last_settings: dict[str, Any] | None = None

    @classmethod
    def from_model_manager(
        cls,
        model_manager: ModelManager,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        offload: str = "none",
    ) -> CogVideoPipeline:
        pipe = cls(
            dit=model_manager.fetch_model("cog_dit", require=True),
            text_encoder=model_manager.fetch_model("cog_text_encoder"),
            vae_encoder=model_manager.fetch_model("cog_vae_encoder"),
            vae_decoder=model_manager.fetch_model("cog_vae_decoder"),
            scheduler_config=model_manager.scheduler_config,
            device=device if device is not None else model_manager.device,
            torch_dtype=torch_dtype if torch_dtype is not None else model_manager.torch_dtype,
            offload=offload,
        )
        pipe.model_manager = model_manager
        return pipe

    def models(self) -> dict[str, torch.nn.Module]:
        named = {"dit": self.dit, "text_encoder": self.text_encoder}
        named |= {"vae_encoder": self.vae_encoder, "vae_decoder": self.vae_decoder}
        return {k: v for k, v in named.items() if v is not None}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str = "",
        negative_prompt: str = "",
        *,
        input_image: Image.Image | str | None = None,
        input_video: Sequence[Image.Image] | torch.Tensor | None = None,
        denoising_strength: float = 1.0,
        height: int = 480,
        width: int = 720,
        num_frames: int = 49,
        cfg_scale: float = 7.0,
        use_dynamic_cfg: bool = False,
        num_inference_steps: int = 50,
        sampler: str = "ddim",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_emb: torch.Tensor | None = None,
        negative_prompt_emb: torch.Tensor | None = None,
        tiled: bool = False,
        dit_tiled: bool | TileSpec = False,
        attention: str | AttentionPart | None = None,
        output_type: str = "pil",
        progress_bar: bool = True,
        callback: StepCallback | None = None,
        step_cache: StepSkipper | StepCacheSpec | float | str | None = None,
        windows: bool | WindowSpec | None = None,
        riflex: bool | tuple[int, int] | None = None,
        keep_frames: int = 0,
        conventions: str | Conventions | None = None,
    ) -> list[Image.Image] | np.ndarray | torch.Tensor | None:
        """Generates one video (DiffSynth-Studio's keywords; they become a :class:`GenerationOptions`).

        ``generator``: draws the initial noise (and DPM's per-step noise) instead of a seed;
        ``callback(i, t, latents)``: called after every step. The other keywords:

        {keywords}

        After ``enable_parallel``: call on every rank with the same arguments; the generation's first rank
        returns the result, the other ranks None.
        """
        options = GenerationOptions.from_keywords(
            prompt=prompt, negative_prompt=negative_prompt, input_image=input_image, input_video=input_video,
            height=height, width=width, num_frames=num_frames, keep_frames=keep_frames, latents=latents,
            prompt_emb=prompt_emb, negative_prompt_emb=negative_prompt_emb,
            sampler=sampler, conventions=conventions, num_inference_steps=num_inference_steps, cfg_scale=cfg_scale,
            use_dynamic_cfg=use_dynamic_cfg, seed=seed, denoising_strength=denoising_strength,
            tiled=tiled, dit_tiled=dit_tiled,
            attention=attention, step_cache=step_cache, windows=windows, riflex=riflex,
            output_type=output_type, progress_bar=progress_bar,
        )  # fmt: skip
        return self.generate(options, generator=generator, callback=callback)

    @torch.no_grad()
    def generate(
        self,
        options: GenerationOptions,
        *,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
    ) -> list[Image.Image] | np.ndarray | torch.Tensor | None:
        """One video from its options (what ``__call__`` runs; the command line and the web UI build the options
        themselves). Checks first: nothing is encoded or drawn for a call that cannot run."""
        checked = check_call(self.dit.config, options)
        self.last_settings, generator_given = None, generator
        inputs, sampling = options.inputs, options.sampling
        guided = checked.conventions.guided(sampling.cfg_scale)
        progress = options.output.progress_bar
        prompt_emb, negative_prompt_emb = inputs.prompt_emb, inputs.negative_prompt_emb
        if self.parallel is not None:  # the same call on every rank, one seed, progress from rank 0
            self.parallel.check_call(
                {**options.flat(), "generator": generator, "text_encoder_loaded": self.text_encoder is not None}
            )
            self.parallel.check_windows(checked.windows, checked.latent_shape[2])
            self.parallel.note_guidance(guided)
            progress = progress and self.parallel.shows_progress
            prompt_emb, negative_prompt_emb = self.parallel.encode_text(
                self.encode_prompt,
                self.torch_dtype,
                inputs.prompt,
                inputs.negative_prompt,
                guided=guided,
                prompt_emb=prompt_emb,
                negative_prompt_emb=negative_prompt_emb,
            )
        seed = self._seed(sampling.seed, checked.conventions) if generator is None else sampling.seed
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        strength = sampling.denoising_strength if checked.video is not None else 1.0
        steps = make_sampler(sampling.sampler, self.scheduler_config, sampling.num_inference_steps, strength=strength)
        conditions = self.encode_conditions(
            inputs.prompt,
            inputs.negative_prompt,
            conventions=checked.conventions,
            guided=guided,
            prompt_emb=prompt_emb,
            negative_prompt_emb=negative_prompt_emb,
            input_image=inputs.input_image,
            latent_shape=checked.latent_shape,
            tiled=options.memory.tiled,
            generator=generator,
        )
        start, constraint = self._start(checked, options, steps, generator, seed)
        denoiser = self.make_denoiser(
            attention=options.long_video.attention,
            step_cache=options.long_video.step_cache,
            dit_tiles=checked.tiles,
            windows=checked.windows,
            riflex=options.long_video.riflex,
        )
        with self.offloader.using("dit"):
            final = denoise(
                denoiser,
                steps,
                start,
                conditions,
                cfg_scale=sampling.cfg_scale,
                dynamic_cfg=sampling.use_dynamic_cfg,
                generator=generator,
                callback=callback,
                progress=progress,
                constraint=constraint,
            )
        final = drop_padding(final, checked.padding)  # the frames added for whole temporal patches (1.5)
        result = self.decode(final, options.output.output_type, options.memory.tiled, progress, checked.conventions)
        self.last_settings = video_settings(
            self, options, checked=checked, seed=seed if generator_given is None else None
        )
        return result if self.parallel is None or self.parallel.is_leader else None

    def _seed(self, seed: int | None, conventions: Conventions) -> int | None:
        """The seed a call draws with: its own; for -1 or None a fresh one (shared by the ranks of a generation),
        logged as the seed used; None under conventions where no seed means torch's global RNG."""
        if seed is not None and seed != RANDOM_SEED:
            return seed
        if self.parallel is not None:  # one fresh seed for every rank (no rank may use its own global RNG)
            return self.parallel.shared_seed(None)
        if seed is None and conventions.seedless_global_rng:
            return None
        fresh = int.from_bytes(os.urandom(8), "little") >> 1
        logger.info("seed used: %d", fresh)
        return fresh

    def _start(
        self,
        checked: CheckedCall,
        options: GenerationOptions,
        steps: Sampler,
        generator: torch.Generator | None,
        seed: int | None,
    ) -> tuple[torch.Tensor, KeptFrames | None]:
        """The latents the loop starts from, and the kept frames' constraint (``keep_frames``)."""
        clean = None
        if checked.video is not None:  # encoded first: the references draw the posterior sample before the noise
            clean = self.encode_video(
                checked.video, options.memory.tiled, generator, sample=checked.conventions.posterior_sample
            )
        start = self.initial_latents(
            checked.latent_shape,
            steps,
            generator,
            conventions=checked.conventions,
            seed=seed,
            latents=options.inputs.latents,
            clean=clean,
            windows=checked.windows,
        )
        if not checked.kept:
            return start, None
        kept_clean = clean[:, :, : checked.kept].to(start.dtype)
        kept_noise = checked.conventions.noise(tuple(kept_clean.shape), generator, None, start.dtype)
        constraint = KeptFrames(kept_clean, kept_noise.to(start.device), steps)
        return constraint.impose(start, 0), constraint

    def extend_video(
        self,
        video: Sequence[Image.Image] | torch.Tensor,
        extend_by: int,
        *,
        context_frames: int = 17,
        denoising_strength: float = 1.0,
        output_type: str = "pil",
        color_match: bool = False,
        **kwargs,
    ) -> list[Image.Image] | np.ndarray | torch.Tensor:
        """Continues ``video`` by ``extend_by`` frames (a multiple of 8), conditioned on its last ``context_frames``
        (8k+1) frames through the video-to-video path (see ``diffsynth_cog.pipeline.continuation``).

        ``video``: PIL frames, or pixels [1, 3, F, H, W] in [-1, 1]; its size sets height and width. The clip
        generated is the context plus ``extend_by`` new frames (at most the model's trained length unless
        ``windows=`` is passed); the context latents are pinned at every step. ``denoising_strength`` < 1 starts
        the new frames from the noised last frame instead of pure noise. Other keyword arguments as
        :meth:`__call__` (prompt, seed, cfg_scale, windows, attention, ...).

        ``color_match``: move the new frames' colours by the transform that takes the clip's re-decoded context
        onto the real one (``continuation.match_new_frames``; needs the ``evaluate`` extras, OpenCV; not with
        "latent"), against colour drift over continuations; off by default until measured on real models.

        Returns the original frames, untouched, followed by the new ones ("pil": a list of frames, "np": an
        array [F + extend_by, H, W, 3] in [0, 1]), or for "latent" the generated clip's latents. Afterwards
        ``last_settings`` holds the whole video's settings, its first new frame a join.
        """
        return extend(
            self,
            video,
            extend_by,
            context_frames=context_frames,
            denoising_strength=denoising_strength,
            output_type=output_type,
            color_match=color_match,
            **kwargs,
        )


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator from ``seed`` (so results do not depend on the device); a fresh seed, logged as the seed
    used, when None or -1 (without touching the caller's global RNG state)."""
    if seed is None or seed == RANDOM_SEED:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
        logger.info("seed used: %d", seed)
    return torch.Generator("cpu").manual_seed(seed)


CogVideoPipeline.__call__.__doc__ = (CogVideoPipeline.__call__.__doc__ or "").replace(
    "{keywords}", keywords_doc(" " * 8)
)
