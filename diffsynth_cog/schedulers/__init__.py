"""CogVideoX's noise schedule and its samplers (what diffusers calls ``CogVideoXDDIMScheduler`` /
``CogVideoXDPMScheduler``), as plain functions of a config.

* :mod:`.schedule`: ``SchedulerConfig`` (read from a diffusers ``scheduler_config.json``) and the
  released presets, ``alphas_cumprod`` (scaled-linear betas, SNR shift, zero-terminal-SNR rescale), the
  timesteps a run visits (also video-to-video's tail) and ``add_noise``;
* :mod:`.samplers`: ``make_sampler`` and the DDIM, DPM-Solver++(2M) and DiffSynth-Studio DDIM samplers
  whose steps return the new latents and the state the next step needs; ``diffsynth_noise``.

The pipeline's denoising loop that drives a sampler is :mod:`diffsynth_cog.pipeline.sampling`; the training
loss on this schedule is :mod:`diffsynth_cog.training.loss`.
"""

from diffsynth_cog.schedulers.samplers import (
    DIFFSYNTH_SCHEDULE,
    SAMPLER_KINDS,
    SAMPLERS,
    DDIMSampler,
    DiffSynthSampler,
    DPMSampler,
    GeneratorArg,
    Sampler,
    SamplerState,
    diffsynth_noise,
    make_sampler,
    register_sampler,
)
from diffsynth_cog.schedulers.schedule import (
    SUPPORTED_BETA_SCHEDULES,
    SUPPORTED_PREDICTION_TYPES,
    SUPPORTED_TIMESTEP_SPACINGS,
    SchedulerConfig,
    add_noise,
    alpha_at,
    alphas_cumprod,
    img2img_timesteps,
    scheduler_preset,
    timesteps,
)

__all__ = [
    "DIFFSYNTH_SCHEDULE",
    "SAMPLER_KINDS",
    "SAMPLERS",
    "SUPPORTED_BETA_SCHEDULES",
    "SUPPORTED_PREDICTION_TYPES",
    "SUPPORTED_TIMESTEP_SPACINGS",
    "DDIMSampler",
    "DPMSampler",
    "DiffSynthSampler",
    "GeneratorArg",
    "Sampler",
    "SamplerState",
    "SchedulerConfig",
    "add_noise",
    "alpha_at",
    "alphas_cumprod",
    "diffsynth_noise",
    "img2img_timesteps",
    "make_sampler",
    "register_sampler",
    "scheduler_preset",
    "timesteps",
]
