"""The CogVideoX noise schedule: its config and presets, the training timesteps a run visits, noising.

The schedule (what diffusers calls ``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler``):

* betas on a "scaled linear" ramp: ``sqrt(beta)`` linear from ``sqrt(beta_start)`` to ``sqrt(beta_end)``;
* ``a_t = prod(1 - beta)`` (``alphas_cumprod``), then the SD3-style SNR shift
  ``a <- a / (s + (1 - s) * a)`` (``snr_shift_scale`` s: 3.0 for 2B, 1.0 = no shift for 5B);
* then the zero-terminal-SNR rescale: ``sqrt(a)`` is shifted and scaled so that it ends at exactly 0
  (pure noise at t = T - 1) and still starts at its old value.

Everything here is a plain function of a :class:`SchedulerConfig`. The schedule is kept in float64
(as the reference does); :func:`add_noise` (x0 -> x_t, for video-to-video, continuation and training)
reads it through :func:`alpha_at`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffsynth_cog.io.json_files import read_json
from diffsynth_cog.validators import check_field_types

logger = logging.getLogger(__name__)

SUPPORTED_BETA_SCHEDULES = ("scaled_linear",)
SUPPORTED_PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")
SUPPORTED_TIMESTEP_SPACINGS = ("trailing", "linspace", "leading")

# Keys of diffusers' scheduler_config.json that do not change the CogVideoX math: the CogVideoX steppers
# never clip or threshold the x0 prediction, whatever these say.
_IGNORED_KEYS = frozenset({"clip_sample", "clip_sample_range", "sample_max_value"})
_KNOWN_CLASS_NAMES = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")


@dataclass(frozen=True)
class SchedulerConfig:
    """The noise schedule and sampling conventions; field names follow diffusers' scheduler_config.json."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "v_prediction"
    rescale_betas_zero_snr: bool = True
    # The last step lands on a_{-1} = 1 (a clean sample) instead of a_0.
    set_alpha_to_one: bool = True
    timestep_spacing: str = "trailing"
    snr_shift_scale: float = 3.0
    steps_offset: int = 0  # only used by "leading" spacing

    def __post_init__(self) -> None:
        def check(cond: bool, message: str) -> None:
            if not cond:
                raise ValueError(f"SchedulerConfig: {message}")

        check(self.num_train_timesteps > 1, f"num_train_timesteps must be > 1, got {self.num_train_timesteps}")
        check(
            0 < self.beta_start < self.beta_end < 1,
            f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}",
        )
        check(
            self.beta_schedule in SUPPORTED_BETA_SCHEDULES,
            f"beta_schedule {self.beta_schedule!r} is not supported (supported: {SUPPORTED_BETA_SCHEDULES})",
        )
        check(
            self.prediction_type in SUPPORTED_PREDICTION_TYPES,
            f"prediction_type {self.prediction_type!r} is not supported (supported: {SUPPORTED_PREDICTION_TYPES})",
        )
        check(
            self.timestep_spacing in SUPPORTED_TIMESTEP_SPACINGS,
            f"timestep_spacing {self.timestep_spacing!r} is not supported (supported: {SUPPORTED_TIMESTEP_SPACINGS})",
        )
        check(self.snr_shift_scale > 0, f"snr_shift_scale must be positive, got {self.snr_shift_scale}")
        check(self.steps_offset >= 0, f"steps_offset must be >= 0, got {self.steps_offset}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "scheduler config") -> SchedulerConfig:
        """Reads a diffusers scheduler config dict. Keys starting with ``_`` and keys with no effect on
        the CogVideoX math are ignored; any other unknown key is an error (it would be silently dropped
        otherwise). Missing keys take this class's defaults (the CogVideoX values)."""
        class_name = values.get("_class_name")
        if class_name is not None and class_name not in _KNOWN_CLASS_NAMES:
            logger.warning("%s: written for %s, read as a CogVideoX scheduler config", source, class_name)
        if values.get("trained_betas") is not None:
            raise ValueError(f"{source}: trained_betas (an explicit beta table) is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in values.items():
            if key in names:
                kwargs[key] = value
            elif not (key.startswith("_") or key in _IGNORED_KEYS or key == "trained_betas"):
                unknown.append(key)
        if unknown:
            raise ValueError(f"{source}: unsupported scheduler config field(s) {sorted(unknown)}")
        check_field_types(cls, kwargs, source)
        defaulted = sorted(names - set(kwargs))
        if defaulted:
            logger.info("%s: %s not given, using the CogVideoX defaults", source, defaulted)
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SchedulerConfig:
        """``path``: a scheduler_config.json, or a folder holding one (``<model>/scheduler``)."""
        p = Path(path)
        if p.is_dir():
            p = p / "scheduler_config.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no scheduler config file")
        return cls.from_dict(read_json(p, ValueError), source=str(p))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PRESETS = {
    "cogvideox-2b": SchedulerConfig(snr_shift_scale=3.0),
    "cogvideox-5b": SchedulerConfig(snr_shift_scale=1.0),
    "cogvideox-5b-i2v": SchedulerConfig(snr_shift_scale=1.0),
}


def scheduler_preset(name: str) -> SchedulerConfig:
    """The released scheduler configs of each family (:func:`~diffsynth_cog.configs.dit_family`):
    ``cogvideox-2b`` (SNR shift 3.0), ``cogvideox-5b`` and ``cogvideox-5b-i2v`` (1.0)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown scheduler preset {name!r}; known: {sorted(_PRESETS)}")
    return _PRESETS[name]


# ----------------------------------------------------------------------------------------------------
# The schedule


def alphas_cumprod(config: SchedulerConfig) -> torch.Tensor:
    """``a_t`` for t = 0 .. T-1, a float64 tensor [T]: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
    n = config.num_train_timesteps
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float64) ** 2
    a = torch.cumprod(1.0 - betas, dim=0)
    # SNR shift: the SNR a/(1-a) is divided by s.
    s = config.snr_shift_scale
    a = a / (s + (1.0 - s) * a)
    if config.rescale_betas_zero_snr:
        # Move sqrt(a) so the last step has exactly zero signal, rescaled to keep sqrt(a_0).
        root = a.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        a = root**2
    return a


def timesteps(config: SchedulerConfig, num_inference_steps: int) -> torch.Tensor:
    """The descending training timesteps visited by an ``num_inference_steps`` sampler, LongTensor [N].

    "trailing" (CogVideoX): ``round(arange(T, 0, -T/N)) - 1``, so it starts at T-1 (N=50: 999, 979, ..., 19).
    "linspace": N points rounded from [0, T-1]. "leading": ``k * (T // N) + steps_offset``.
    numpy is used on purpose: the float ``arange`` and its round-half-to-even are the definition.
    """
    n_train = config.num_train_timesteps
    if not 1 <= num_inference_steps <= n_train:
        raise ValueError(f"num_inference_steps must be in [1, {n_train}], got {num_inference_steps}")
    if config.timestep_spacing == "trailing":
        steps = np.round(np.arange(n_train, 0, -n_train / num_inference_steps)).astype(np.int64) - 1
    elif config.timestep_spacing == "linspace":
        steps = np.linspace(0, n_train - 1, num_inference_steps).round()[::-1].astype(np.int64)
    else:  # "leading"
        ratio = n_train // num_inference_steps
        steps = (np.arange(num_inference_steps) * ratio)[::-1].astype(np.int64) + config.steps_offset
    return torch.from_numpy(steps.copy())


def img2img_timesteps(steps: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of ``steps`` that a video-to-video run with ``strength`` in [0, 1] visits.

    ``int(N * strength)`` steps are kept (all of them at strength 1, none at 0); the input video is
    noised to the first kept timestep.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    n = len(steps)
    kept = min(int(n * strength), n)
    return steps[n - kept :]


def alpha_at(
    t: torch.Tensor | int, alphas: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """a_t per batch item, shaped [B, 1, ..., 1] (or [1, ...] for a scalar t) to broadcast over ``like``,
    in ``dtype`` (default: ``like``'s dtype)."""
    table = alphas.to(device=like.device, dtype=dtype or like.dtype)
    a = table[torch.as_tensor(t, dtype=torch.long, device=like.device)].flatten()
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, alphas: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise. x0, noise: [B, ...]; t: [B] (or a scalar).

    The table is cast to x0's dtype before the square roots, as the reference trainers do, so the
    same inputs give bit-identical x_t.
    """
    a = alpha_at(t, alphas, x0)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise
