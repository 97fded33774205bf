"""Opt-in step caching for generation: reuse the deep blocks' work across denoising steps.

Neighbouring denoising steps feed the DiT almost the same input (the latents move a little, the
timestep a little), so what blocks 1..N-1 add on top of block 0 changes little too. ``StepCache``
runs the cheap front of the DiT (``embed`` and block 0) at every step, measures how far block 0's
contribution moved since the previous step, and sums these distances since the last fully computed
step. While the sum stays below ``threshold`` the step skips blocks 1..N-1 and instead adds the
residual they produced at the last computed step (last block's output minus block 0's output, both
token streams) to this step's block-0 output; otherwise it runs every block, stores the new residual
and resets the sum. The first ``warmup`` steps and the last step are always computed in full.

The signal: block 0's *residual* on the video stream (its output minus its input). It has been
through one whole block (timestep-modulated norms, joint text/video attention, MLP), so it reacts
both to the latents' change and to the timestep's change, the way the deeper blocks do; this is the
first-block cache's argument. It is preferred over TeaCache's modulated input of block 0 because
TeaCache turns that raw distance into an estimate of the output's change with a polynomial fitted per
model on real generations; no such fit exists for an arbitrary checkpoint, a merged LoRA or random
weights, and the unfitted input distance ignores what the block does with its input. The residual
rather than the output, because the output is ``input + residual`` and the (slowly varying)
embedded input dominates its norm, which would dilute the relative distance.

The rule: TeaCache's accumulation (without its rescaling). A direct comparison with the previous
step alone could let a slow, steady drift skip forever; the sum of consecutive distances bounds the
drift from the last computed step.

Threshold semantics: the distance of one step is the relative L1 distance
``sum|r_i - r_{i-1}| / sum|r_{i-1}|`` of block 0's residuals ``r`` at steps i-1 and i, over the
whole CFG batch (one decision for the batch; summed over every process that shares the DiT call, so
they all decide alike). A step is skipped when the sum of these distances
since the last computed step is *strictly* below ``threshold``. ``threshold = 0`` therefore never
skips and gives bitwise the same result as no cache; larger values skip more (0.05 - 0.2 is the
usual range for trained models; the right value depends on the model and the step count).

Within the denoiser (``diffsynth_cog.denoise.denoiser``) this is the step-skipping part: it runs a DiT
call's blocks. With spatial tiles, every tile keeps its own residual, sum and decision.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Hashable

import torch

from diffsynth_cog.denoise.denoiser import DenoiserParts, StepSkipper, TokenSplit
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.models.tokens import DiTState
from diffsynth_cog.validators import integer, is_real, number

logger = logging.getLogger(__name__)

_THRESHOLD = number(0).described("a finite number >= 0 (0 = never skip)")

# Every step-skipping method by name: a constructor taking the threshold (``pipe(step_cache="NAME:THRESHOLD")``,
# the command line's methods). A new method is a :class:`StepBook` subclass with ``@register_step_skipper(name)``.
STEP_SKIPPERS: dict[str, Callable[[float], StepSkipper]] = {}


def register_step_skipper(name: str) -> Callable[[type[StepBook]], type[StepBook]]:
    """Adds the class to :data:`STEP_SKIPPERS` under ``name`` ("auto" is the method choice, not a method)."""

    def register(cls: type[StepBook]) -> type[StepBook]:
        if name == "auto" or name in STEP_SKIPPERS:
            raise ValueError(f"step-skipping method name {name!r} is taken")
        STEP_SKIPPERS[name] = cls
        return cls

    return register


def l1_change(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``[sum|current - previous|, sum|previous|]`` in float32 (sums, so processes can add theirs)."""
    return torch.stack([(current - previous).abs().sum(dtype=torch.float32), previous.abs().sum(dtype=torch.float32)])


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``sum|current - previous| / sum|previous|``; inf if ``previous`` is all zero."""
    change, scale = l1_change(current, previous).tolist()  # one device sync per step, not two
    return math.inf if scale == 0.0 else change / scale


class StepBook:
    """The bookkeeping every step-skipping part shares: its settings, the generation's steps, one state per DiT
    call site (``key``: a guidance half, a temporal window, a spatial tile), and which steps were computed or
    skipped (a step counts as skipped when every call site of it skipped).

    Subclasses give ``name``, ``min_warmup``, ``_new_track()`` and ``run``; ``_reset()`` / ``_extra_stats()``
    add their own per-generation records.
    """

    name = "step-skipping"
    min_warmup = 0

    def __init__(self, threshold: float, warmup: int) -> None:
        if not is_real(threshold):
            raise TypeError(f"threshold must be a number; got {type(threshold).__name__}")
        _THRESHOLD.require("threshold", threshold)
        integer(self.min_warmup).require("warmup", warmup)
        self.threshold = float(threshold)
        self.warmup = warmup
        self.start(0)

    def start(self, num_steps: int) -> None:
        """Starts a new generation of ``num_steps`` steps: forgets every call site's state and the counts."""
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0; got {num_steps}")
        self.num_steps = num_steps
        self.step = 0
        self._tracks: dict[Hashable, object] = {}
        self._step_skipped: list[bool] = []  # decisions of the current step's calls
        self.computed_steps: list[int] = []
        self.skipped_steps: list[int] = []  # steps on which every call (site) was skipped
        self._reset()

    def _reset(self) -> None:
        """The subclass's own per-generation records."""

    def _extra_stats(self) -> dict[str, object]:
        return {}

    def _new_track(self) -> object:
        raise NotImplementedError

    def check_compatible(self, parts: DenoiserParts) -> None:
        """Step skipping goes with every transformer and part unless a subclass says otherwise."""

    def stats(self) -> dict[str, object]:
        """Counts of this generation: steps done, computed, skipped, which were skipped, and the part's records."""
        return {
            "method": self.name,
            "threshold": self.threshold,
            "warmup": self.warmup,
            "steps": self.step,
            "computed": len(self.computed_steps),
            "skipped": len(self.skipped_steps),
            "skipped_steps": list(self.skipped_steps),
            **self._extra_stats(),
        }

    def _track(self, key: Hashable) -> object:
        """The state of call site ``key`` in the current step (checks that the step was announced)."""
        if self.step >= self.num_steps:
            raise RuntimeError(
                f"{type(self).__name__} was called for step {self.step + 1} of a generation announced with "
                f"start(num_steps={self.num_steps}); call start(num_steps) before each generation"
            )
        if key not in self._tracks:
            self._tracks[key] = self._new_track()
        return self._tracks[key]

    def _always_computed(self) -> bool:
        """The first ``warmup`` steps and the last one are computed in full."""
        return self.step < self.warmup or self.step == self.num_steps - 1

    def _book(self, skipped: bool) -> None:
        self._step_skipped.append(skipped)

    def end_step(self) -> None:
        """Books the current step as computed or skipped (skipped when every call skipped) and moves on."""
        (self.skipped_steps if all(self._step_skipped) else self.computed_steps).append(self.step)
        self._step_skipped = []
        self.step += 1
        if self.step == self.num_steps:
            logger.info(
                "%s (threshold %g): %d of %d steps computed, %d skipped %s",
                self.name,
                self.threshold,
                len(self.computed_steps),
                self.num_steps,
                len(self.skipped_steps),
                self.skipped_steps,
            )


@dataclasses.dataclass
class _Track:
    """What one DiT call site (the whole frame, or one tile) remembers between steps."""

    accumulated: float = 0.0
    previous_signal: torch.Tensor | None = None  # block 0's video residual [B, Lv, D], last step
    residual: tuple[torch.Tensor, torch.Tensor] | None = None  # blocks 1.. on (video, text), float32


@register_step_skipper("first-block")
class StepCache(StepBook):
    """Step caching across the denoising steps of ONE generation: the denoiser's step-skipping part.

    Usage: ``pipe(..., step_cache=0.1)`` or ``step_cache=StepCache(0.1)`` (then read ``stats()``), or
    ``Denoiser(dit, step_skip=StepCache(0.1))``. :meth:`start` begins a new generation and clears
    everything (the pipeline calls it at the start of every generation, so one object can be reused and
    its :meth:`stats` then describe the latest generation).

    Args:
        threshold: skip while the accumulated relative L1 change of block 0's residual is below this
            (>= 0; 0 = never skip = the exact path). See the module docstring.
        warmup: number of first steps always computed in full (the first steps change the most).

    Memory: the stored residual of both token streams (float32, ``[B, L, inner_dim]`` each) and block 0's
    residual of the previous step (model dtype), i.e. about 0.65 GB for a 49-frame CFG batch of the 5B model
    (per tile, with tiles).
    """

    name = "step-cache"

    def __init__(self, threshold: float, warmup: int = 2) -> None:
        super().__init__(threshold, warmup)

    def _reset(self) -> None:
        self.distances: list[float | None] = []  # per call; None where there is no previous step

    def _extra_stats(self) -> dict[str, object]:
        return {"distances": list(self.distances)}

    def _new_track(self) -> _Track:
        return _Track()

    def _must_compute(self, track: _Track) -> bool:
        if self._always_computed() or track.residual is None:
            return True
        # `not <` rather than `>=`: a NaN distance (should never happen) computes the step.
        return not track.accumulated < self.threshold

    def run(self, dit: CogDiT, state: DiTState, key: Hashable, reduce: TokenSplit) -> DiTState:
        """The blocks of one DiT call of the current step, with blocks 1..N-1 skipped when the cache allows."""
        track = self._track(key)
        first = dit.run_blocks(state, start=0, stop=1)
        signal = first.video - state.video  # [B, Lv, D], block 0's contribution
        distance = None
        if track.previous_signal is not None:
            change, scale = reduce.all_reduce(l1_change(signal, track.previous_signal)).tolist()
            distance = math.inf if scale == 0.0 else change / scale
        self.distances.append(distance)
        track.previous_signal = signal
        track.accumulated += math.inf if distance is None else distance

        if self._must_compute(track):
            last = dit.run_blocks(first, start=1)
            # float32: there the difference of two bf16 tensors is (nearly) exact, so on an unchanged input
            # block 0's output plus the residual gives back the last block's output.
            track.residual = (last.video.float() - first.video.float(), last.text.float() - first.text.float())
            track.accumulated = 0.0
            self._book(skipped=False)
            return last
        self._book(skipped=True)
        video_residual, text_residual = track.residual
        video = (first.video.float() + video_residual).to(first.video.dtype)  # [B, Lv, D]
        text = (first.text.float() + text_residual).to(first.text.dtype)  # [B, Lt, D]
        return dataclasses.replace(first, video=video, text=text)
