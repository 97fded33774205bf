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
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffsynth_cog.configs import check_num_frames, check_size, dit_family
from diffsynth_cog.model_manager import ModelManager
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.models.text_encoder import CogTextEncoder
from diffsynth_cog.models.vae import CogVAEDecoder, CogVAEEncoder
from diffsynth_cog.offload import ModelOffloader
from diffsynth_cog.schedulers import SchedulerConfig, add_noise, make_sampler, scheduler_preset
from diffsynth_cog.step_cache import StepCache
from diffsynth_cog.tiling import tiled_dit_forward
from diffsynth_cog.video_io import load_image, tensor_to_frames, video_to_tensor

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step index, timestep, latents [B, C, T, H, W])


def dynamic_guidance(cfg_scale: float, timestep: int, num_inference_steps: int) -> float:
    """Guidance that grows over the steps (the reference's ``use_dynamic_cfg`` formula, verbatim in math:
    it uses the timestep value where one would expect the step index)."""
    return 1 + cfg_scale * (1 - math.cos(math.pi * ((num_inference_steps - timestep) / num_inference_steps) ** 5.0)) / 2


class CogVideoPipeline:
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
    ) -> None:
        self.dit = dit
        self.text_encoder = text_encoder
        self.vae_encoder = vae_encoder
        self.vae_decoder = vae_decoder
        if scheduler_config is None:
            # 2B (sin-cos positions) was trained with a shifted SNR; 5B without.
            preset = dit_family(dit.config)
            scheduler_config = scheduler_preset(preset)
            logger.info("no scheduler_config.json found; using the %s scheduler preset", preset)
        self.scheduler_config = scheduler_config
        self.device = torch.device(device)
        self.torch_dtype = torch_dtype
        self.offloader = ModelOffloader(self.device, mode="none")
        self.offloader.register(self.models())

    @classmethod
    def from_model_manager(
        cls,
        model_manager: ModelManager,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> CogVideoPipeline:
        return cls(
            dit=model_manager.fetch_model("cog_dit", require=True),
            text_encoder=model_manager.fetch_model("cog_text_encoder"),
            vae_encoder=model_manager.fetch_model("cog_vae_encoder"),
            vae_decoder=model_manager.fetch_model("cog_vae_decoder"),
            scheduler_config=model_manager.scheduler_config,
            device=device if device is not None else model_manager.device,
            torch_dtype=torch_dtype if torch_dtype is not None else model_manager.torch_dtype,
        )

    def models(self) -> dict[str, torch.nn.Module]:
        named = {"dit": self.dit, "text_encoder": self.text_encoder}
        named |= {"vae_encoder": self.vae_encoder, "vae_decoder": self.vae_decoder}
        return {k: v for k, v in named.items() if v is not None}

    # -- memory modes ------------------------------------------------------------------------

    def enable_model_cpu_offload(self) -> None:
        """Keep models on the CPU; move each to the device only while it runs."""
        self.offloader.set_mode("model")

    def enable_sequential_cpu_offload(self) -> None:
        """Stream the DiT's and text encoder's blocks to the device one at a time (lowest memory)."""
        self.offloader.set_mode("sequential")

    def disable_offload(self) -> None:
        self.offloader.set_mode("none")

    # -- pieces ------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[str]) -> torch.Tensor:
        """Prompt(s) -> T5 embeddings [B, max_text_seq_length, text_embed_dim] on the device."""
        if self.text_encoder is None:
            raise ValueError("no text encoder is loaded: load one, or pass prompt_emb/negative_prompt_emb")
        with self.offloader.using("text_encoder"):
            emb = self.text_encoder.encode(prompt, device=self.device)
        return emb.to(self.device, self.torch_dtype)

    def encode_video(self, video: torch.Tensor, tiled: bool, generator: torch.Generator | None) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> scaled latents [B, C, T, h, w] (posterior sample)."""
        if self.vae_encoder is None:
            raise ValueError("input_video / input_image need the VAE encoder: load the VAE")
        with self.offloader.using("vae_encoder"):
            latents = self.vae_encoder.encode(
                video.to(self.device, self.torch_dtype), tiled=tiled, sample=True, generator=generator
            )
        return latents.float() * self.vae_encoder.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor, tiled: bool, progress: bool) -> torch.Tensor:
        """Scaled latents [B, C, T, h, w] -> pixels [B, 3, F, H, W] in [-1, 1] (float32, on the CPU)."""
        if self.vae_decoder is None:
            raise ValueError("decoding needs the VAE decoder: load the VAE, or use output_type='latent'")
        with self.offloader.using("vae_decoder"):
            scaled = (latents / self.vae_decoder.config.scaling_factor).to(self.device, self.torch_dtype)
            video = self.vae_decoder.decode(scaled, tiled=tiled, progress=progress)
        return video.float().clamp(-1, 1).cpu()

    def predict_velocity(
        self,
        latents: torch.Tensor,
        timestep: int,
        prompt_emb: torch.Tensor,
        image_latents: torch.Tensor | None,
        dit_tiled: bool,
        tile_size: tuple[int, int],
        tile_stride: tuple[int, int],
        step_cache: StepCache | None = None,
    ) -> torch.Tensor:
        """The DiT's v-prediction for a batch of latents [B, C, T, h, w] (float32 out).

        ``step_cache`` (already reset for this generation) stands in for the DiT call: one call per step."""
        x = latents.to(self.torch_dtype)
        if image_latents is not None:  # I2V: the image's latent rides along as extra channels
            x = torch.cat([x, image_latents.to(self.torch_dtype)], dim=1)
        t = torch.full((x.shape[0],), timestep, device=self.device, dtype=torch.long)
        if dit_tiled:
            return tiled_dit_forward(self.dit, x, t, prompt_emb, tile_size, tile_stride).float()
        if step_cache is not None:
            return step_cache(self.dit, x, t, prompt_emb).float()
        return self.dit(x, t, prompt_emb).float()

    # -- generation --------------------------------------------------------------------------

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
        dit_tiled: bool = False,
        dit_tile_size: tuple[int, int] = (60, 90),
        dit_tile_stride: tuple[int, int] = (30, 45),
        output_type: str = "pil",
        progress_bar: bool = True,
        callback: StepCallback | None = None,
        step_cache: StepCache | float | None = None,
    ) -> list[Image.Image] | np.ndarray | torch.Tensor:
        """Generates one video.

        Args:
            prompt / negative_prompt: text (or pass ``prompt_emb`` / ``negative_prompt_emb`` directly).
            input_image: I2V conditioning image (needs an I2V transformer, 2 x latent channels in).
            input_video: frames to edit (video-to-video); ``denoising_strength`` in (0, 1] sets how much
                of the schedule is run (1.0 = from pure noise).
            height, width: multiples of 16. num_frames: 4k+1 (49; 129 with the ExVideo LoRA).
            cfg_scale: classifier-free guidance (<= 1 disables it: one DiT pass per step).
            sampler: "ddim" (deterministic) or "dpm" (stochastic; its noise comes from the generator).
            seed / generator: the initial noise (and DPM's per-step noise). A seed makes a CPU generator,
                so results do not depend on the device.
            latents: initial noise [B, C, T, H/8, W/8] instead of drawing it.
            tiled: tiled VAE. dit_tiled: the DiT on overlapping spatial tiles (latent units).
            output_type: "pil" (list of frames), "np" (float array [F, H, W, 3] in [0, 1]) or "latent"
                (the final latents [B, C, T, h, w]).
            callback: called after every step with (step index, timestep, latents).
            step_cache: skip the DiT's blocks 1..N-1 on steps where block 0's output barely changed,
                reusing the last computed residual (see ``diffsynth_cog.step_cache``). A number is the
                threshold of a fresh ``StepCache`` (0 = never skip = exact); pass a ``StepCache`` to
                read its ``stats()`` afterwards (it is reset at the start of every call).
        """
        check_num_frames(num_frames, self.dit.config.temporal_compression_ratio)
        check_size(height, width)
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent'; got {output_type!r}")
        if not 0.0 < denoising_strength <= 1.0:
            raise ValueError(f"denoising_strength must be in (0, 1]; got {denoising_strength}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1; got {num_inference_steps}")
        if step_cache is not None and not isinstance(step_cache, StepCache):
            step_cache = StepCache(threshold=step_cache)
        if step_cache is not None and dit_tiled:
            raise ValueError("step_cache does not support dit_tiled=True (each tile is a separate DiT call)")
        is_i2v = self.dit.config.in_channels != self.dit.config.out_channels
        if is_i2v and input_image is None:
            raise ValueError("this transformer is an image-to-video model: pass input_image")
        if input_image is not None and not is_i2v:
            raise ValueError("input_image needs an I2V transformer (e.g. CogVideoX-5B-I2V)")
        if generator is None:
            if seed is None:  # a fresh seed without touching the caller's global RNG state
                seed = int.from_bytes(os.urandom(8), "little") >> 1
                logger.info("seed: %d", seed)
            generator = torch.Generator("cpu").manual_seed(seed)

        use_cfg = cfg_scale > 1.0
        if prompt_emb is None:
            prompt_emb = self.encode_prompt(prompt)
        if use_cfg and negative_prompt_emb is None:
            negative_prompt_emb = self.encode_prompt(negative_prompt)
        context = torch.cat([negative_prompt_emb, prompt_emb]) if use_cfg else prompt_emb
        context = context.to(self.device, self.torch_dtype)

        c = self.dit.config
        shape = (1, c.out_channels, (num_frames - 1) // c.temporal_compression_ratio + 1, height // 8, width // 8)
        if latents is None:
            noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {list(shape)} for these settings; got {list(latents.shape)}")
            noise = latents
        noise = noise.to(self.device, torch.float32)

        strength = denoising_strength if input_video is not None else 1.0
        steps = make_sampler(sampler, self.scheduler_config, num_inference_steps, strength=strength)
        if step_cache is not None:
            step_cache.reset(len(steps.timesteps))
        if input_video is not None:
            video = input_video if isinstance(input_video, torch.Tensor) else video_to_tensor(input_video)[None]
            if tuple(video.shape[2:]) != (num_frames, height, width):
                raise ValueError(
                    f"input_video must have {num_frames} frames of {height}x{width}; got {list(video.shape)}"
                )
            clean = self.encode_video(video, tiled, generator)
            latents = add_noise(clean, noise, int(steps.timesteps[0]), steps.alphas_cumprod.float())
        else:
            latents = noise

        image_latents = None
        if input_image is not None:
            image = video_to_tensor([load_image(input_image, height, width)])[None]  # [1, 3, 1, H, W]
            first = self.encode_video(image, tiled, generator)  # [1, C, 1, h, w]
            pad = first.new_zeros(first.shape[0], first.shape[1], shape[2] - 1, *first.shape[3:])
            image_latents = torch.cat([first, pad], dim=2)
            if use_cfg:
                image_latents = torch.cat([image_latents] * 2)

        state = None
        with self.offloader.using("dit"):
            for i, timestep in enumerate(tqdm(steps.timesteps.tolist(), desc="denoising", disable=not progress_bar)):
                model_in = torch.cat([latents] * 2) if use_cfg else latents
                v = self.predict_velocity(
                    model_in, timestep, context, image_latents, dit_tiled, dit_tile_size, dit_tile_stride, step_cache
                )
                if use_cfg:
                    scale = dynamic_guidance(cfg_scale, timestep, num_inference_steps) if use_dynamic_cfg else cfg_scale
                    v_uncond, v_text = v.chunk(2)
                    v = v_uncond + scale * (v_text - v_uncond)
                # The step is elementwise, but DPM draws noise: the reference draws it in its
                # [B, T, C, H, W] layout, so stepping on that view keeps a seed's trajectory the same.
                latents, state = steps.step(v.transpose(1, 2), i, latents.transpose(1, 2), state, generator=generator)
                latents = latents.transpose(1, 2)
                if callback is not None:
                    callback(i, timestep, latents)

        if output_type == "latent":
            return latents
        video = self.decode_latents(latents, tiled, progress_bar)[0]  # [3, F, H, W]
        if output_type == "np":
            return ((video + 1) / 2).permute(1, 2, 3, 0).numpy()
        return tensor_to_frames(video)
