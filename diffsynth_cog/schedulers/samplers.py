"""The CogVideoX samplers: DDIM, DPM-Solver++(2M) and DiffSynth-Studio's own DDIM, and ``make_sampler``.

A sampler walks the timesteps of a :class:`~diffsynth_cog.schedulers.schedule.SchedulerConfig` from
noise to a clean sample. Its step returns the new latents *and* the state the next step needs
(:class:`SamplerState`), so nothing is hidden in mutable scheduler objects. Step coefficients are
computed from the float64 schedule in float64; only the final multiply-adds run in the latents' dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffsynth_cog.schedulers.schedule import SchedulerConfig, add_noise, alphas_cumprod, img2img_timesteps, timesteps

logger = logging.getLogger(__name__)

# Every sampler by its ``kind``: what ``make_sampler``, the command line and the web UI offer. A new sampler is a
# :class:`Sampler` subclass with a ``kind`` and ``@register_sampler`` (``register_sampler(cls)`` elsewhere).
SAMPLERS: dict[str, type[Sampler]] = {}

# One generator, or one per batch item (as diffusers accepts); None: the global RNG.
GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class SamplerState:
    """What one step hands to the next: the x0 prediction it made and the timestep it made it at.

    The DPM sampler's second-order update needs both; DDIM only reports them (e.g. for previews).
    """

    x0: torch.Tensor | None = None
    timestep: int | None = None


def _noise_like(sample: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
    """Standard normal noise shaped like ``sample``, drawn the way diffusers' samplers draw it.

    A CPU generator with a GPU sample draws on the CPU and moves the result (so a seed gives the same
    noise on any device); a list of generators draws one batch item from each.
    """
    device, dtype = sample.device, sample.dtype
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        generators = list(generator)
        if len(generators) == 1:
            generator = generators[0]
        else:
            if len(generators) != sample.shape[0]:
                raise ValueError(f"{len(generators)} generators for a batch of {sample.shape[0]}")
            draw_device = generators[0].device if generators[0].device.type == "cpu" else device
            parts = [
                torch.randn((1, *sample.shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generators
            ]
            return torch.cat(parts).to(device)
    if generator is None:
        return torch.randn(sample.shape, device=device, dtype=dtype)
    if generator.device.type != device.type and generator.device.type != "cpu":
        raise ValueError(f"a {generator.device.type} generator cannot draw noise for a {device.type} sample")
    draw_device = generator.device if generator.device.type == "cpu" else device
    return torch.randn(sample.shape, generator=generator, device=draw_device, dtype=dtype).to(device)


class Sampler:
    """Shared parts of the DDIM and DPM samplers: the schedule, the timesteps, the x0 prediction.

    ``timesteps`` are the timesteps this sampler visits, in order; ``step(model_output, i, ...)``
    advances the latents from ``timesteps[i]`` to the next noise level.
    """

    kind = ""

    def __init__(self, config: SchedulerConfig, num_inference_steps: int, *, strength: float = 1.0) -> None:
        self.config = config
        self.num_inference_steps = num_inference_steps
        self.alphas_cumprod = alphas_cumprod(config)
        self.timesteps = img2img_timesteps(timesteps(config, num_inference_steps), strength)
        # Each step lands T // N below its timestep (also when the spacing does not divide evenly and
        # when video-to-video skips the first steps): the reference samplers' rule, kept for parity.
        self.stride = config.num_train_timesteps // num_inference_steps
        # Below t = 0 the signal is complete (a = 1), or a_0 when set_alpha_to_one is off.
        self._final_alpha = (
            torch.tensor(1.0, dtype=torch.float64) if config.set_alpha_to_one else self.alphas_cumprod[0]
        )

    def __len__(self) -> int:
        return len(self.timesteps)

    def _alpha(self, t: int) -> torch.Tensor:
        """a_t as a float64 scalar tensor; t < 0 means past the last training step."""
        return self.alphas_cumprod[t] if t >= 0 else self._final_alpha

    def _timestep(self, i: int) -> int:
        if not 0 <= i < len(self.timesteps):
            raise IndexError(f"step index {i} out of range for {len(self.timesteps)} steps")
        return int(self.timesteps[i])

    def predict_x0(self, model_output: torch.Tensor, sample: torch.Tensor, t: int) -> torch.Tensor:
        """The clean-sample estimate implied by the model output at timestep t (same shape as sample)."""
        a = self._alpha(t)
        if self.config.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0
            return a.sqrt() * sample - (1 - a).sqrt() * model_output
        if self.config.prediction_type == "epsilon":
            return (sample - (1 - a).sqrt() * model_output) / a.sqrt()
        return model_output  # "sample"

    def step(
        self,
        model_output: torch.Tensor,
        i: int,
        sample: torch.Tensor,
        state: SamplerState | None = None,
        generator: GeneratorArg = None,
    ) -> tuple[torch.Tensor, SamplerState]:
        raise NotImplementedError

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``clean`` noised to the first timestep (video-to-video): x = sqrt(a) clean + sqrt(1 - a) noise."""
        return add_noise(clean, noise, int(self.timesteps[0]), self.alphas_cumprod.float())


def register_sampler(cls: type[Sampler]) -> type[Sampler]:
    """Adds ``cls`` to :data:`SAMPLERS` under its ``kind``."""
    if not isinstance(getattr(cls, "kind", None), str) or cls.kind in SAMPLERS:
        raise ValueError(f"sampler {cls.__name__} needs a kind of its own; taken: {sorted(SAMPLERS)}")
    SAMPLERS[cls.kind] = cls
    return cls


@register_sampler
class DDIMSampler(Sampler):
    """Deterministic DDIM (eta = 0): x_s = sqrt(a_s) x0 + sqrt(1-a_s) eps_hat, eps_hat taken from x_t."""

    kind = "ddim"

    def step(
        self,
        model_output: torch.Tensor,
        i: int,
        sample: torch.Tensor,
        state: SamplerState | None = None,
        generator: GeneratorArg = None,
    ) -> tuple[torch.Tensor, SamplerState]:
        """One step from ``timesteps[i]``. ``model_output``, ``sample``: same shape (any layout).
        ``state`` and ``generator`` are accepted for a uniform interface and not used."""
        t = self._timestep(i)
        a_t, a_s = self._alpha(t), self._alpha(t - self.stride)
        x0 = self.predict_x0(model_output, sample, t)
        # Written as a mix of x_t and x0: eps_hat = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t).
        keep = ((1 - a_s) / (1 - a_t)).sqrt()
        from_x0 = a_s.sqrt() - a_t.sqrt() * keep
        return keep * sample + from_x0 * x0, SamplerState(x0=x0, timestep=t)


@register_sampler
class DPMSampler(Sampler):
    """Stochastic DPM-Solver++(2M) (the SDE variant), as CogVideoX's DPM scheduler.

    With log-SNR lambda = log(sqrt(a / (1 - a))), h = lambda_s - lambda_t, a step is
    ``x_s = (sigma_s / sigma_t) e^-h x_t + alpha_s (1 - e^-2h) D + sigma_s sqrt(1 - e^-2h) z``
    with D = x0 (first order: first step, and a step landing past t = 0) or
    D = (1 + 1/2r) x0 - (1/2r) x0_prev, r = h_prev / h (second order). z ~ N(0, 1) from ``generator``.
    """

    kind = "dpm"

    @staticmethod
    def _log_snr(a: torch.Tensor) -> torch.Tensor:
        # -inf at a = 0 (t = T-1 after the zero-SNR rescale) and +inf at a = 1: both give the correct
        # limits below (e^-h -> 0), so no special cases are needed.
        return 0.5 * torch.log(a / (1 - a))

    def step(
        self,
        model_output: torch.Tensor,
        i: int,
        sample: torch.Tensor,
        state: SamplerState | None = None,
        generator: GeneratorArg = None,
    ) -> tuple[torch.Tensor, SamplerState]:
        """One step from ``timesteps[i]``; pass the state returned by the previous step (None at i=0)."""
        t = self._timestep(i)
        s = t - self.stride
        a_t, a_s = self._alpha(t), self._alpha(s)
        x0 = self.predict_x0(model_output, sample, t)

        lam_t = self._log_snr(a_t)
        h = self._log_snr(a_s) - lam_t
        one_minus_decay = -torch.expm1(-2 * h)  # 1 - e^-2h
        keep = ((1 - a_s) / (1 - a_t)).sqrt() * torch.exp(-h)
        from_x0 = a_s.sqrt() * one_minus_decay
        noise_scale = (1 - a_s).sqrt() * one_minus_decay.sqrt()

        # The reference draws one noise tensor before choosing the update and a fresh one for the
        # second-order update; drawing in the same order keeps a shared seed on the same trajectory.
        noise = _noise_like(sample, generator)
        if state is None or state.x0 is None or state.timestep is None or s < 0:
            return keep * sample + from_x0 * x0 + noise_scale * noise, SamplerState(x0=x0, timestep=t)

        r = (lam_t - self._log_snr(self._alpha(state.timestep))) / h
        x0_extrapolated = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * state.x0
        noise = _noise_like(sample, generator)
        return keep * sample + from_x0 * x0_extrapolated + noise_scale * noise, SamplerState(x0=x0, timestep=t)


@register_sampler
class DiffSynthSampler(Sampler):
    """DiffSynth-Studio 1.1.x's own DDIM for CogVideoX (its ``EnhancedDDIMScheduler``), to reproduce its videos.

    It differs from the released CogVideoX scheduler in three ways:

    * the schedule is fixed (scaled-linear betas 0.00085 -> 0.012, zero-terminal-SNR rescale, no SNR
      shift, v-prediction) whatever the model's scheduler_config.json says, and it is computed in
      float32 (then read back as Python floats);
    * the timesteps run from ``max_t = round(T * strength) - 1`` down to 0 in equal float strides,
      each rounded with Python's ``round`` (50 steps: 999, 979, ..., 20, 0);
    * each step lands on the *next listed* timestep (``a_p = 1`` after the last one), with
      ``x <- x (sqrt(a_t a_p) + sqrt((1-a_t)(1-a_p))) + v (sqrt(a_t (1-a_p)) - sqrt(a_p (1-a_t)))``.

    The step multiplies in the dtype of the tensors it gets: to reproduce DiffSynth, keep the latents in
    the pipeline's dtype (see :func:`diffsynth_noise`) and pass the guided DiT output in that dtype.
    """

    kind = "diffsynth"

    def __init__(self, config: SchedulerConfig, num_inference_steps: int, *, strength: float = 1.0) -> None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if config.snr_shift_scale != 1.0:
            logger.warning(
                "sampler 'diffsynth' follows DiffSynth-Studio and ignores snr_shift_scale=%s of this model's "
                "scheduler config (DiffSynth-Studio only runs CogVideoX-5B, which has none)",
                config.snr_shift_scale,
            )
        self.config = config
        self.num_inference_steps = num_inference_steps
        n_train = DIFFSYNTH_SCHEDULE.num_train_timesteps
        root = torch.linspace(  # float32 on purpose, as the reference
            math.sqrt(DIFFSYNTH_SCHEDULE.beta_start),
            math.sqrt(DIFFSYNTH_SCHEDULE.beta_end),
            n_train,
            dtype=torch.float32,
        )
        a = torch.cumprod(1.0 - root.square(), dim=0).sqrt()
        first, last = a[0].clone(), a[-1].clone()
        a = ((a - last) * (first / (first - last))).square()
        self._alphas: list[float] = a.tolist()  # the reference's step works on these Python floats
        self.alphas_cumprod = torch.tensor(self._alphas, dtype=torch.float64)
        self._final_alpha = torch.tensor(1.0, dtype=torch.float64)

        max_t = max(round(n_train * strength) - 1, 0)
        count = min(num_inference_steps, max_t + 1)
        if count == 1:
            steps = [max_t]
        else:
            stride = max_t / (count - 1)  # divide first, then multiply: the reference's rounding
            steps = [round(max_t - i * stride) for i in range(count)]
        self.timesteps = torch.tensor(steps, dtype=torch.int64)

    def step(
        self,
        model_output: torch.Tensor,
        i: int,
        sample: torch.Tensor,
        state: SamplerState | None = None,
        generator: GeneratorArg = None,
    ) -> tuple[torch.Tensor, SamplerState]:
        """One step from ``timesteps[i]`` to ``timesteps[i + 1]`` (a clean sample after the last), in the
        tensors' dtype. ``state`` and ``generator`` are accepted for a uniform interface and not used."""
        t = self._timestep(i)
        a_t = self._alphas[t]
        a_p = self._alphas[int(self.timesteps[i + 1])] if i + 1 < len(self.timesteps) else 1.0
        keep = math.sqrt(a_t * a_p) + math.sqrt((1 - a_t) * (1 - a_p))
        from_v = -math.sqrt(a_p * (1 - a_t)) + math.sqrt(a_t * (1 - a_p))
        return sample * keep + model_output * from_v, SamplerState(timestep=t)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``clean`` noised to the first timestep (video-to-video), in the tensors' dtype, as the reference."""
        a = self._alphas[int(self.timesteps[0])]
        return math.sqrt(a) * clean + math.sqrt(1 - a) * noise


# DiffSynth-Studio's CogVideoX schedule constants (its pipeline builds its scheduler with these).
DIFFSYNTH_SCHEDULE = SchedulerConfig(snr_shift_scale=1.0)


def diffsynth_noise(
    num_frames: int,
    height: int,
    width: int,
    *,
    seed: int | None,
    dtype: torch.dtype,
    channels: int = 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The initial noise DiffSynth-Studio 1.1.x's CogVideo pipeline draws for ``seed``.

    ``torch.randn((1, channels, num_frames // 4 + 1, height // 8, width // 8))`` on the CPU, drawn
    directly in ``dtype`` (the pipeline's dtype: bf16 noise is not fp32 noise rounded) from
    ``torch.Generator("cpu").manual_seed(seed)``; ``seed=None`` draws from the global RNG (so
    ``torch.manual_seed(6)`` before the call reproduces DiffSynth's example); a ``generator`` replaces the
    seed. Returns a tensor on the generator's device (the CPU without one).
    """
    shape = (1, channels, num_frames // 4 + 1, height // 8, width // 8)
    if generator is None and seed is not None:
        generator = torch.Generator("cpu").manual_seed(seed)
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def make_sampler(kind: str, config: SchedulerConfig, num_inference_steps: int, *, strength: float = 1.0) -> Sampler:
    """The sampler of :data:`SAMPLERS` named ``kind``: "ddim", "dpm" or "diffsynth" (DiffSynth-Studio's own DDIM,
    :class:`DiffSynthSampler`). ``strength`` < 1 keeps only the last steps (video-to-video)."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; choose one of {tuple(SAMPLERS)}")
    return SAMPLERS[kind](config, num_inference_steps, strength=strength)


SAMPLER_KINDS = tuple(SAMPLERS)  # the built-in kinds (SAMPLERS is the live registry)
