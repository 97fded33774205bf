"""Pure sampling functions: initial noise, guidance and the denoising loop.

Nothing here loads or moves a model: the loop takes a denoiser (``diffsynth_cog.denoise.denoiser``), a
sampler (``diffsynth_cog.schedulers``) and tensors, so it can be tested and reused alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffsynth_cog.configs import DiTConfig, check_num_frames, check_size
from diffsynth_cog.denoise.denoiser import Denoiser
from diffsynth_cog.families import ROPE_SLICE, Family, get_family
from diffsynth_cog.io.frames import tensor_to_frames
from diffsynth_cog.schedulers import Sampler, diffsynth_noise

DIFFSYNTH_FAMILY = get_family("cogvideox-5b")  # the factors of DiffSynth-Studio's noise (CogVideoX 1.0)

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step index, timestep, latents [B, C, T, H, W])
# A loop-level part: (step index, latents after that step) -> the latents the next step starts from
# (e.g. ``continuation.KeptFrames`` pins known frames).
StepConstraint = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Conditions:
    """What the DiT is conditioned on besides the latents.

    context: text embeddings [B, L, D] ([negative, positive] stacked along B with guidance);
    image_latents: the I2V image's latent frames, zero-padded in time, as extra input channels
    [B, C, T, h, w] (stacked like ``context``), or None; guided: whether ``context`` holds both halves;
    one_batch: both halves go through the DiT as one batch (else as two calls, positive first).
    """

    context: torch.Tensor
    image_latents: torch.Tensor | None
    guided: bool
    one_batch: bool = True


@dataclass(frozen=True)
class LatentPlan:
    """The latents of one video: ``shape`` [1, C, T, h, w] as the DiT runs them (T padded to whole temporal
    patches), ``padding`` the latent frames added at the front (dropped before decoding, as the reference does)."""

    shape: tuple[int, int, int, int, int]
    padding: int = 0


def latent_plan(config: DiTConfig, num_frames: int, height: int, width: int) -> LatentPlan:
    """The latents of a ``num_frames`` x ``height`` x ``width`` video for this transformer's family; checks the frame
    count (``frame_multiple * k + 1``), the size (multiples of ``size_multiple``) and, for RoPE sliced from a max
    grid (1.5), that the grid fits in it. Raises ValueError naming the value and the rule."""
    family = config.family
    check_num_frames(num_frames, family.frame_multiple)
    check_size(height, width, family.size_multiple)
    if family.positions == ROPE_SLICE:
        limit_h = config.sample_height * family.vae_spatial
        limit_w = config.sample_width * family.vae_spatial
        if height > limit_h or width > limit_w:
            raise ValueError(
                f"{height}x{width} exceeds {family.label}'s position grid of {limit_h}x{limit_w} pixels "
                f"(sample_height/sample_width {config.sample_height}x{config.sample_width} latents): use a smaller "
                "size, or DiT tiles (dit_tiled) of at most that size"
            )
    frames = family.latent_frames(num_frames)
    padded = family.padded_latent_frames(frames)
    h, w = height // family.vae_spatial, width // family.vae_spatial
    return LatentPlan((1, config.out_channels, padded, h, w), padded - frames)


def drop_padding(latents: torch.Tensor, padding: int) -> torch.Tensor:
    """Final latents [B, C, T, h, w] without the ``padding`` frames added at the front (the reference drops the
    first ones: ``latents[:, additional_frames:]``)."""
    return latents[:, :, padding:] if padding else latents


def image_latent_scale(family: Family | None, scaling_factor: float, invert_scale_latents: bool = False) -> float:
    """What the I2V image's raw VAE latents are multiplied by: the scaling factor, or its inverse where the VAE
    config (or the family, 1.5 I2V) says ``invert_scale_latents`` (the reference's rule: the 1.5 I2V model was
    trained on image latents divided by the factor). ``family`` None (no transformer known): the VAE config's flag."""
    invert = invert_scale_latents or (family is not None and family.invert_scale_latents)
    return 1.0 / scaling_factor if invert else scaling_factor


def image_condition(image_latents: torch.Tensor, frames: int, patch_t: int = 1) -> torch.Tensor:
    """The I2V conditioning channels: the image's latent frame(s) [B, C, t, h, w] zero-padded in time to ``frames``
    (the reference pipelines' and trainers' layout; concatenated after the noisy latents on the channels).

    With temporal patches (1.5) the reference then prepends ``frames % patch_t`` copies of the first frame so that
    the conditioning is whole patches; at the padded lengths the pipeline runs (:func:`latent_plan`) that is none."""
    b, c, t, h, w = image_latents.shape
    padded = torch.cat([image_latents, image_latents.new_zeros(b, c, frames - t, h, w)], dim=2)
    extra = frames % patch_t
    return torch.cat([padded[:, :, :extra], padded], dim=2) if extra else padded


def draw_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard normal latents [B, C, T, H, W] (float32, on the generator's device), drawn in the reference's
    [B, T, C, H, W] order so that a seed gives the same noise as diffusers' CogVideoX pipelines."""
    b, c, t, h, w = shape
    return torch.randn((b, t, c, h, w), generator=generator, device=generator.device).transpose(1, 2)


@dataclass(frozen=True)
class Conventions:
    """How a reference implementation samples, so that a seed reproduces its videos.

    name: the sampler names that follow these conventions select them (see :func:`conventions_for`);
    guidance_above_one: guidance runs when cfg_scale > 1 (diffusers) rather than when it is not 1 (DiffSynth);
    model_dtype_latents: the latents (and the guidance arithmetic) stay in the pipeline's dtype through the
    loop, instead of float32; one_batch_guidance: both guidance halves go through the DiT as one batch,
    instead of two calls (positive, then negative); posterior_sample: video-to-video encodes a sample of the
    VAE posterior (drawn from the generator) rather than its mean; seedless_global_rng: without a seed or a
    generator the noise comes from torch's global RNG (DiffSynth's example seeds it with torch.manual_seed);
    truncated_frames: decoded pixels become uint8 by truncating ``(x + 1) * 127.5`` (DiffSynth's
    ``tensor2video``) instead of rounding it.
    """

    name: str
    guidance_above_one: bool = True
    model_dtype_latents: bool = False
    one_batch_guidance: bool = True
    posterior_sample: bool = True
    seedless_global_rng: bool = False
    truncated_frames: bool = False

    def guided(self, cfg_scale: float) -> bool:
        return cfg_scale > 1.0 if self.guidance_above_one else cfg_scale != 1.0

    def noise(
        self,
        shape: tuple[int, int, int, int, int],
        generator: torch.Generator | None,
        seed: int | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The initial noise [B, C, T, H, W] this reference draws (float32 or ``dtype``, per the conventions)."""
        if self.model_dtype_latents:  # DiffSynth draws [B, C, T, H, W] directly in the pipeline's dtype
            b, c, t, h, w = shape
            f = DIFFSYNTH_FAMILY  # DiffSynth-Studio runs CogVideoX 1.0 only (checks.check_family_call)
            frames, height, width = (t - 1) * f.vae_temporal + 1, h * f.vae_spatial, w * f.vae_spatial
            return diffsynth_noise(frames, height, width, seed=seed, dtype=dtype, channels=c, generator=generator)
        return draw_noise(shape, generator)

    def frames(self, video: torch.Tensor) -> list[Image.Image]:
        """Decoded pixels [3, F, H, W] in [-1, 1] -> RGB frames, converted as this reference converts them."""
        if not self.truncated_frames:
            return tensor_to_frames(video)
        array = ((video.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)  # truncates toward zero
        return [Image.fromarray(frame) for frame in array.permute(1, 2, 3, 0).cpu().numpy()]


DIFFUSERS = Conventions("diffusers")
DIFFSYNTH = Conventions(
    "diffsynth",
    guidance_above_one=False,
    model_dtype_latents=True,
    one_batch_guidance=False,
    posterior_sample=False,
    seedless_global_rng=True,
    truncated_frames=True,
)
# conventions= names -> conventions (the registry the command line and the web UI offer)
CONVENTIONS: dict[str, Conventions] = {c.name: c for c in (DIFFUSERS, DIFFSYNTH)}


def conventions_for(sampler: str, conventions: str | Conventions | None = None) -> Conventions:
    """A call's conventions: ``conventions`` (a name of :data:`CONVENTIONS` or a value), else the sampler's: the
    released samplers ("ddim", "dpm") follow diffusers; "diffsynth" is the shorthand for DiffSynth-Studio 1.1.x's
    DDIM *and* its conventions."""
    if isinstance(conventions, Conventions):
        return conventions
    if conventions is None:
        return DIFFSYNTH if sampler == "diffsynth" else DIFFUSERS
    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions {conventions!r} is not known; valid: {', '.join(CONVENTIONS)} or a Conventions")
    return CONVENTIONS[conventions]


def guidance_scale(cfg_scale: float, timestep: int, num_inference_steps: int, dynamic: bool) -> float:
    """The guidance of one step. Dynamic guidance grows over the steps (the reference's ``use_dynamic_cfg``
    formula, verbatim in math: it uses the timestep value where one would expect the step index)."""
    if not dynamic:
        return cfg_scale
    progress = ((num_inference_steps - timestep) / num_inference_steps) ** 5.0
    return 1 + cfg_scale * (1 - math.cos(math.pi * progress)) / 2


def velocity(denoiser: Denoiser, latents: torch.Tensor, timestep: int, conditions: Conditions) -> torch.Tensor:
    """The DiT's v-prediction (float32) for latents [B, C, T, h, w]; with guidance, both halves stacked
    [negative, positive] along B, from one batched call or two calls."""
    x = torch.cat([latents] * 2) if conditions.guided else latents
    if conditions.image_latents is not None:  # I2V: the image's latent rides along as extra channels
        x = torch.cat([x, conditions.image_latents.to(x.dtype)], dim=1)
    if not conditions.guided or conditions.one_batch:
        return denoiser(x, timestep, conditions.context)
    (x_neg, x_pos), (c_neg, c_pos) = x.chunk(2), conditions.context.chunk(2)
    v_pos = denoiser(x_pos, timestep, c_pos, call="positive")
    return torch.cat([denoiser(x_neg, timestep, c_neg, call="negative"), v_pos])


def denoise(
    denoiser: Denoiser,
    sampler: Sampler,
    latents: torch.Tensor,
    conditions: Conditions,
    *,
    cfg_scale: float,
    dynamic_cfg: bool = False,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
    constraint: StepConstraint | None = None,
) -> torch.Tensor:
    """Runs every step of ``sampler`` from ``latents`` [B, C, T, h, w] and returns the final latents.

    The latents keep their dtype (float32, or the model's under DiffSynth's conventions), and so does the
    guidance arithmetic. ``generator`` feeds stochastic samplers (DPM); ``constraint(i, latents)`` replaces the
    latents after each step (before the callback); ``callback(i, timestep, latents)`` runs after each step.
    """
    timesteps = sampler.timesteps.tolist()
    denoiser.start(len(timesteps))
    state = None
    for i, timestep in enumerate(tqdm(timesteps, desc="denoising", disable=not progress)):
        v = velocity(denoiser, latents, timestep, conditions).to(latents.dtype)
        denoiser.end_step()
        if conditions.guided:
            scale = guidance_scale(cfg_scale, timestep, len(timesteps), dynamic_cfg)
            v_uncond, v_text = v.chunk(2)
            v = v_uncond + scale * (v_text - v_uncond)
        # The step is elementwise, but DPM draws noise: the reference draws it in its
        # [B, T, C, H, W] layout, so stepping on that view keeps a seed's trajectory the same.
        latents, state = sampler.step(v.transpose(1, 2), i, latents.transpose(1, 2), state, generator=generator)
        latents = latents.transpose(1, 2)
        if constraint is not None:
            latents = constraint(i, latents)
        if callback is not None:
            callback(i, timestep, latents)
    return latents
