"""Pure sampling functions: initial noise, guidance and the denoising loop.

Nothing here loads or moves a model: the loop takes a denoiser (``diffsynth_cog.denoiser``), a
sampler (``diffsynth_cog.schedulers``) and tensors, so it can be tested and reused alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from diffsynth_cog.denoiser import Denoiser
from diffsynth_cog.schedulers import Sampler

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step index, timestep, latents [B, C, T, H, W])
# A loop-level part: (step index, latents after that step) -> the latents the next step starts from
# (e.g. ``continuation.KeptFrames`` pins known frames).
StepConstraint = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Conditions:
    """What the DiT is conditioned on besides the latents.

    context: text embeddings [B, L, D] ([negative, positive] stacked along B with guidance);
    image_latents: the I2V image's latent frames, zero-padded in time, as extra input channels
    [B, C, T, h, w] (stacked like ``context``), or None; guided: whether ``context`` holds both halves.
    """

    context: torch.Tensor
    image_latents: torch.Tensor | None
    guided: bool


def draw_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard normal latents [B, C, T, H, W] (float32, on the generator's device), drawn in the reference's
    [B, T, C, H, W] order so that a seed gives the same noise as diffusers' CogVideoX pipelines."""
    b, c, t, h, w = shape
    return torch.randn((b, t, c, h, w), generator=generator, device=generator.device).transpose(1, 2)


def guidance_scale(cfg_scale: float, timestep: int, num_inference_steps: int, dynamic: bool) -> float:
    """The guidance of one step. Dynamic guidance grows over the steps (the reference's ``use_dynamic_cfg``
    formula, verbatim in math: it uses the timestep value where one would expect the step index)."""
    if not dynamic:
        return cfg_scale
    progress = ((num_inference_steps - timestep) / num_inference_steps) ** 5.0
    return 1 + cfg_scale * (1 - math.cos(math.pi * progress)) / 2


def velocity(denoiser: Denoiser, latents: torch.Tensor, timestep: int, conditions: Conditions) -> torch.Tensor:
    """The DiT's v-prediction for latents [B, C, T, h, w] (float32), both guidance halves in one batch."""
    x = torch.cat([latents] * 2) if conditions.guided else latents
    if conditions.image_latents is not None:  # I2V: the image's latent rides along as extra channels
        x = torch.cat([x, conditions.image_latents.to(x.dtype)], dim=1)
    return denoiser(x, timestep, conditions.context)


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
    """Runs every step of ``sampler`` from ``latents`` [B, C, T, h, w] (float32) and returns the final latents.

    ``generator`` feeds stochastic samplers (DPM); ``constraint(i, latents)`` replaces the latents after each
    step (before the callback); ``callback(i, timestep, latents)`` runs after each step.
    """
    timesteps = sampler.timesteps.tolist()
    denoiser.start(len(timesteps))
    state = None
    for i, timestep in enumerate(tqdm(timesteps, desc="denoising", disable=not progress)):
        v = velocity(denoiser, latents, timestep, conditions)
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
