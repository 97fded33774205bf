"""The model stages of :class:`~diffsynth_cog.pipeline.cog_video.CogVideoPipeline` and its memory and parallel
switches, as the mixin :class:`PipelineStages`.

One concept: what the pipeline does with each loaded model, one stage at a time (encode a prompt, encode or decode
a video, build the denoiser, the conditions and the initial latents, decode the result), and where those models
run (CPU offload modes, several GPUs). The generation that composes the stages (``__call__``, ``generate``,
seeding, ``extend_video``) stays in ``cog_video``; this module does not import it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffsynth_cog.denoise.denoiser import AttentionPart, Denoiser, StepSkipper
from diffsynth_cog.denoise.teacache import make_step_skipper
from diffsynth_cog.denoise.windows import WindowSpec, reschedule_noise
from diffsynth_cog.io.frames import video_to_tensor
from diffsynth_cog.io.video import load_image
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.models.text_encoder import CogTextEncoder
from diffsynth_cog.models.tiling import TileSpec
from diffsynth_cog.models.vae import CogVAEDecoder, CogVAEEncoder
from diffsynth_cog.parallel.context import ParallelContext
from diffsynth_cog.parallel.layout import ParallelError, ParallelLayout
from diffsynth_cog.pipeline.offload import ModelOffloader, to_host
from diffsynth_cog.pipeline.options import StepCacheSpec, attention_value, step_cache_value
from diffsynth_cog.pipeline.sampling import (
    DIFFUSERS,
    Conditions,
    Conventions,
    image_condition,
    image_latent_scale,
)
from diffsynth_cog.schedulers import Sampler


class PipelineStages:
    """The stages and the memory / parallel switches of a pipeline holding a CogVideoX DiT, VAE and T5 encoder.

    A mixin: the class that uses it (``CogVideoPipeline``) sets the attributes below in its ``__init__``.
    """

    dit: CogDiT
    text_encoder: CogTextEncoder | None
    vae_encoder: CogVAEEncoder | None
    vae_decoder: CogVAEDecoder | None
    device: torch.device
    torch_dtype: torch.dtype
    offloader: ModelOffloader
    parallel: ParallelContext | None

    # -- memory modes ------------------------------------------------------------------------

    def enable_model_cpu_offload(self) -> None:
        """Keep models on the CPU; move each to the device only while it runs."""
        self.offloader.set_mode("model")

    def enable_sequential_cpu_offload(self) -> None:
        """Stream the DiT's and text encoder's blocks to the device one at a time (lowest memory)."""
        self.offloader.set_mode("sequential")

    def disable_offload(self) -> None:
        self.offloader.set_mode("none")

    # -- several GPUs ------------------------------------------------------------------------

    def enable_parallel(
        self,
        layout: ParallelLayout | None = None,
        *,
        timeout: timedelta | None = None,
        ulysses_head_chunks: int | None = None,
        ulysses_transport: str = "auto",
        **degrees: Any,
    ) -> None:
        """Share every generation between the ranks of the initialised ``torch.distributed`` process group.

        Launch every rank with torchrun, call ``torch.distributed.init_process_group()`` and build the pipeline
        on the rank's own device (``cuda:LOCAL_RANK``), then call this on every rank (it creates process groups:
        collective). Then call the pipeline on every rank with the same arguments (checked): the generation's
        first rank (rank 0 without groups) returns the result, for every ``output_type``; the others return None.

        Args:
            layout: a :class:`~diffsynth_cog.parallel.layout.ParallelLayout` (its degrees must multiply to the
                world size), or None for the layout the keywords below ask for (``ParallelLayout.resolve``):
                window_degree: window groups that each run a contiguous share of every step's temporal windows
                    (default 1; the calls must pass ``windows``, with at least this many windows per step); each
                    group holds the degrees below.
                cfg_parallel: the unconditional and conditional halves on two rank groups (default True).
                ulysses_degree: ranks sharing the token sequence by all-to-all over heads (must divide the
                    heads: 48 for 5B, 30 for 2B); None (default) = the ranks that are left.
                ring_degree: ranks sharing the token sequence by ring attention (any number; dense attention
                    only; default 1).
                group_size: ranks per generation (default: all); the world splits into groups that generate
                    different videos (e.g. the prompts of a batch), each with these degrees.
                E.g. on 4 ranks ``window_degree=2, cfg_parallel=True``: two window groups of a CFG pair each.
            timeout: of the new process groups' collectives (default: the default group's).
            ulysses_head_chunks: with Ulysses alone, the groups of heads pipelined through the all-to-all so
                that communication may overlap attention (default 1: all heads in one exchange, the fastest on
                2 H200s over NVLink; more groups may pay where the link is slow). Any value gives the same result.
            ulysses_transport: how Ulysses moves heads between ranks: ``"p2p"``, the copy engines write straight
                into the other GPUs' memory (PyTorch symmetric memory; one host, GPUs with peer access; with
                a CFG batch the rows' transfers overlap the attention); ``"nccl"``, NCCL's all-to-all (any
                link, several hosts); ``"auto"`` (default): ``"p2p"`` where every Ulysses group can use it,
                else ``"nccl"``. Both give the same result.
        See ``diffsynth_cog.parallel`` for what each part does.
        """
        if layout is not None and degrees:
            raise ParallelError(f"enable_parallel: pass a ParallelLayout or the degrees {sorted(degrees)}, not both")
        if layout is None:
            inspect.signature(ParallelLayout.resolve).bind(0, **degrees)  # a misspelt degree: TypeError, now
            layout = functools.partial(ParallelLayout.resolve, **degrees)
        self.parallel = ParallelContext.create(
            self.dit.config.num_attention_heads,
            self.device,
            layout,
            timeout=timeout,
            ulysses_head_chunks=ulysses_head_chunks,
            ulysses_transport=ulysses_transport,
        )

    def disable_parallel(self) -> None:
        """Back to one process per generation (the process groups stay)."""
        self.parallel = None

    def _spread_tiles(self) -> contextlib.AbstractContextManager:
        return self.parallel.spread_tiles() if self.parallel is not None else contextlib.nullcontext()

    # -- pieces ------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[str]) -> torch.Tensor:
        """Prompt(s) -> T5 embeddings [B, max_text_seq_length, text_embed_dim] on the device."""
        if self.text_encoder is None:
            raise ValueError("no text encoder is loaded: load one, or pass prompt_emb/negative_prompt_emb")
        with self.offloader.using("text_encoder"):
            emb = self.text_encoder.encode(prompt, device=self.device)
        return emb.to(self.device, self.torch_dtype)

    def encode_video(
        self,
        video: torch.Tensor,
        tiled: bool,
        generator: torch.Generator | None,
        sample: bool = True,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> scaled latents [B, C, T, h, w] (a posterior sample drawn from
        ``generator``, or with ``sample=False`` the posterior mean); ``scale``: instead of the VAE's factor."""
        if self.vae_encoder is None:
            raise ValueError("input_video / input_image need the VAE encoder: load the VAE")
        with self.offloader.using("vae_encoder"), self._spread_tiles():
            latents = self.vae_encoder.encode(
                video.to(self.device, self.torch_dtype), tiled=tiled, sample=sample, generator=generator
            )
        return latents.float() * (self.vae_encoder.config.scaling_factor if scale is None else scale)

    def decode_latents(self, latents: torch.Tensor, tiled: bool, progress: bool) -> torch.Tensor:
        """Scaled latents [B, C, T, h, w] -> pixels [B, 3, F, H, W] in [-1, 1] (float32, on the CPU)."""
        if self.vae_decoder is None:
            raise ValueError("decoding needs the VAE decoder: load the VAE, or use output_type='latent'")
        with self.offloader.using("vae_decoder"), self._spread_tiles():
            scaled = (latents / self.vae_decoder.config.scaling_factor).to(self.device, self.torch_dtype)
            video = self.vae_decoder.decode(scaled, tiled=tiled, progress=progress)
        return to_host(video.float().clamp_(-1, 1))

    # -- the denoiser ----------------------------------------------------------------------

    def make_denoiser(
        self,
        *,
        attention: str | AttentionPart | None = None,
        step_cache: StepSkipper | StepCacheSpec | float | str | None = None,
        dit_tiles: TileSpec | None = None,
        windows: WindowSpec | None = None,
        riflex: bool | tuple[int, int] | None = None,
    ) -> Denoiser:
        """The denoiser of one generation, from the call's options (see :class:`~diffsynth_cog.denoise.denoiser.Denoiser`).

        ``attention``: a kernel name, ``"window:W"`` / ``"radial"`` (``masks.parse_attention``) or a part;
        ``step_cache``: a threshold, a :class:`StepCacheSpec`, ``"teacache:0.2"`` or a :class:`StepSkipper`. After
        ``enable_parallel`` the token split shares every DiT call between the ranks."""
        attention = attention_value(attention)
        step_cache = step_cache_value(step_cache)
        if isinstance(step_cache, StepCacheSpec):
            step_cache = make_step_skipper(step_cache.threshold, step_cache.method, self.dit)
        split = self.parallel.split if self.parallel is not None else None
        window_share = self.parallel.window_share if self.parallel is not None else None
        return Denoiser(
            self.dit,
            attention=attention,
            split=split,
            step_skip=step_cache,
            tiles=dit_tiles,
            windows=windows,
            riflex=riflex,
            window_share=window_share,
        )

    def encode_conditions(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str],
        *,
        conventions: Conventions = DIFFUSERS,
        guided: bool,
        prompt_emb: torch.Tensor | None = None,
        negative_prompt_emb: torch.Tensor | None = None,
        input_image: Image.Image | str | None = None,
        latent_shape: tuple[int, int, int, int, int],
        tiled: bool = False,
        generator: torch.Generator | None = None,
    ) -> Conditions:
        """Stage 1: the text embeddings (both halves with guidance) and, for I2V, the image's latent channels."""
        if prompt_emb is None:
            prompt_emb = self.encode_prompt(prompt)
        if guided and negative_prompt_emb is None:
            negative_prompt_emb = self.encode_prompt(negative_prompt)
        context = torch.cat([negative_prompt_emb, prompt_emb]) if guided else prompt_emb
        image_latents = None
        if input_image is not None:
            _, _, frames, h, w = latent_shape
            family, vae = self.dit.family, self.vae_encoder.config if self.vae_encoder is not None else None
            size = (h * family.vae_spatial, w * family.vae_spatial)
            image = video_to_tensor([load_image(input_image, *size)])[None]  # [1, 3, 1, H, W]
            scale = image_latent_scale(family, vae.scaling_factor, vae.invert_scale_latents) if vae else None
            latents = self.encode_video(image, tiled, generator, scale=scale)
            image_latents = image_condition(latents, frames, family.patch_size_t)  # [1, C, T, h, w]
            if guided:
                image_latents = torch.cat([image_latents] * 2)
        return Conditions(
            context=context.to(self.device, self.torch_dtype),
            image_latents=image_latents,
            guided=guided,
            one_batch=conventions.one_batch_guidance,
        )

    def initial_latents(
        self,
        latent_shape: tuple[int, int, int, int, int],
        sampler: Sampler,
        generator: torch.Generator | None,
        *,
        conventions: Conventions = DIFFUSERS,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        input_video: torch.Tensor | None = None,
        tiled: bool = False,
        clean: torch.Tensor | None = None,
        windows: WindowSpec | None = None,
    ) -> torch.Tensor:
        """Stage 2: the latents the loop starts from (on the device; float32, or the pipeline's dtype under
        DiffSynth's conventions): noise, or for video-to-video the encoded video (``input_video``, or its latents
        ``clean``) noised to the sampler's first timestep. ``latents`` replaces the drawn noise; with ``windows``
        drawn noise is rescheduled for the windows."""
        dtype = self.torch_dtype if conventions.model_dtype_latents else torch.float32
        if input_video is not None:  # encoded first: the references draw the posterior sample before the noise
            clean = self.encode_video(input_video, tiled, generator, sample=conventions.posterior_sample)
        if latents is None:
            noise = conventions.noise(latent_shape, generator, seed, dtype)
            if windows is not None:
                noise = reschedule_noise(noise, windows.plan(latent_shape[2]), generator)
        else:
            noise = latents
        noise = noise.to(self.device, dtype)
        if clean is None:
            return noise
        return sampler.add_noise(clean.to(dtype), noise)

    def decode(
        self, latents: torch.Tensor, output_type: str, tiled: bool, progress: bool, conventions: Conventions = DIFFUSERS
    ) -> list[Image.Image] | np.ndarray | torch.Tensor:
        """Stage 4: final latents -> the requested output (pil frames, converted to uint8 as ``conventions`` do, a
        float array, or the latents)."""
        if output_type == "latent":
            return latents
        video = self.decode_latents(latents, tiled, progress)[0]  # [3, F, H, W]
        if output_type == "np":
            return ((video + 1) / 2).permute(1, 2, 3, 0).numpy()
        return conventions.frames(video)
