"""TeaCache: calibrated step skipping (ali-vilab/TeaCache), the denoiser's default step-skipping part.

Neighbouring denoising steps produce almost the same DiT output. TeaCache predicts how much the output
will change from something that costs almost nothing: the input of block 0 after its timestep
modulation (``blocks[0].norm1`` on the video stream, which moves with both the latents and the
timestep). Its relative L1 change since the previous step, ``x = sum|m_i - m_{i-1}| / sum|m_{i-1}|``,
is mapped through a polynomial fitted per model on real generations to an estimate of the relative
change of the output; these estimates are summed since the last computed step. While the sum stays
below ``threshold`` the step skips *every* block and adds the residual of the whole block stack
(last block's output minus the embedded input, both token streams) stored at the last computed step;
otherwise all blocks run, the residual is stored and the sum resets. The first ``warmup`` steps and the
last step are always computed.

The polynomials are published per family (``families.Family.teacache``) and used for the released
transformer of that family: CogVideoX-5B (TeaCache4CogVideoX, fitted on block 0's modulated input) and
CogVideoX1.5-5B / 1.5-5B-I2V (TeaCache4CogVideoX1.5, fitted on a different signal: the relative L1 change of
the timestep embedding, plus the ofs embedding on I2V, which is what its reference measures; ``signal``
"embedding"). Outside the range it was fitted on, a polynomial says nothing: where it turns negative
(small x) its estimate counts as 0, and beyond its maximum on [0, 4] (x ~ 0.26 for CogVideoX-5B, where
it starts to fall) the step is computed. Both only make this version compute where TeaCache's might
skip. A transformer without a published polynomial (2B, 5B-I2V, a fine-tune) has no calibration:
``pipe(step_cache=<number>)`` then uses the first-block residual cache (``step_cache.StepCache``) and
says so in the log; ``TeaCache(threshold, coefficients=...)`` takes a polynomial of your own.

Thresholds (TeaCache's figures on CogVideoX1.5, H100, 50 steps): 0.1 / 0.2 / 0.3 gave 1.3x / 1.8x /
2.1x with visible quality loss growing at the top; 0 never skips and is bitwise the exact path.

Composes like the other step-skipping part: one state per DiT call site (spatial tile, temporal window);
with a sequence split every process adds its share of the two sums, so all decide alike. Memory: the
previous modulated input and the stored residuals, in the model's dtype (about 1.1 GB per call site
for a 129-frame CFG batch of the 5B model).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from diffsynth_cog.configs import teacache_coefficients
from diffsynth_cog.denoise.denoiser import DenoiserParts, StepSkipper, TokenSplit
from diffsynth_cog.denoise.step_cache import STEP_SKIPPERS, StepBook, StepCache, l1_change, register_step_skipper
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.models.tokens import DiTState

logger = logging.getLogger(__name__)


def polynomial_peak(coefficients: Sequence[float], upper: float = 4.0) -> float:
    """Where the polynomial (highest power first) is largest on [0, ``upper``]: the end of the range where a
    larger input can mean a larger estimated change."""
    grid = np.linspace(0.0, upper, 400_001)
    return float(grid[int(np.argmax(np.polyval(np.asarray(coefficients, dtype=np.float64), grid)))])


@dataclasses.dataclass
class _Track:
    """What one DiT call site (the whole call, a tile, a window) remembers between steps."""

    accumulated: float = 0.0
    previous: torch.Tensor | None = None  # the signal at the last step: block 0's modulated video input, or cond
    residual: tuple[torch.Tensor, torch.Tensor] | None = None  # all blocks on (video, text), model dtype


@register_step_skipper("teacache")
class TeaCache(StepBook):
    """TeaCache step skipping for ONE generation at a time (see the module docstring).

    Args:
        threshold: skip while the accumulated estimated change stays below this (>= 0; 0 = never skip).
        coefficients: the rescaling polynomial, highest power first; None = the model's published one (the
            denoiser checks that there is one when it is built).
        warmup: first steps always computed (>= 1: the first step has nothing to compare with).
        signal: what the polynomial was fitted on, with ``coefficients``: ``"modulated"`` (block 0's modulated
            video input) or ``"embedding"`` (the timestep embedding); with the published polynomial, its own.
    """

    name = "teacache"
    min_warmup = 1  # the first step has nothing to compare with
    SIGNALS = ("modulated", "embedding")

    def __init__(
        self,
        threshold: float,
        coefficients: Sequence[float] | None = None,
        warmup: int = 1,
        signal: str = "modulated",
    ) -> None:
        super().__init__(threshold, warmup)
        if signal not in self.SIGNALS:
            raise ValueError(f"TeaCache signal must be one of {self.SIGNALS}; got {signal!r}")
        self.coefficients: tuple[float, ...] | None = None
        self.signal = signal
        if coefficients is not None:
            self._set_coefficients(coefficients)

    def _set_coefficients(self, coefficients: Sequence[float]) -> None:
        values = tuple(float(c) for c in coefficients)
        if not values or not all(math.isfinite(c) for c in values):
            raise ValueError(f"TeaCache coefficients must be finite numbers, highest power first; got {coefficients}")
        self.coefficients = values
        self.peak = polynomial_peak(values)

    def check_compatible(self, parts: DenoiserParts) -> None:
        """Called by the denoiser: takes the model's published polynomial when none was given, or refuses."""
        if self.coefficients is not None:
            return
        published = teacache_coefficients(parts.config)
        if published is None:
            raise ValueError(
                "TeaCache has no calibrated polynomial for this transformer (published for the released CogVideoX-5B, "
                "CogVideoX1.5-5B and CogVideoX1.5-5B-I2V only): pass "
                "TeaCache(threshold, coefficients=[...]) fitted for it, or use the uncalibrated first-block cache "
                "(step_cache.StepCache, CLI --step-cache-method first-block)"
            )
        self._set_coefficients(published)
        self.signal = parts.config.family.teacache.signal

    def rescale(self, change: float) -> float:
        """The polynomial's estimate of the output's change for a relative input change ``change``."""
        if self.coefficients is None:
            raise RuntimeError("TeaCache has no coefficients yet: build a Denoiser with it (or pass coefficients)")
        if not change <= self.peak:  # beyond the fitted range (or NaN): compute
            return math.inf
        return max(0.0, float(np.polyval(self.coefficients, change)))

    def _reset(self) -> None:
        self.changes: list[float | None] = []  # raw relative L1 change per call; None without a previous step
        self.estimates: list[float | None] = []  # rescaled

    def _extra_stats(self) -> dict[str, object]:
        return {"changes": list(self.changes), "estimates": list(self.estimates)}

    def _new_track(self) -> _Track:
        return _Track()

    def run(self, dit: CogDiT, state: DiTState, key: Hashable, reduce: TokenSplit) -> DiTState:
        """All blocks of one DiT call of the current step, or the stored residual when the estimate allows."""
        track = self._track(key)
        if self.signal == "embedding":  # [B, time_embed_dim], the same on every process of a split
            signal = state.cond
        else:
            signal = dit.blocks[0].norm1(state.video, state.text, state.cond)[0]  # [B, Lv, D]
        change = estimate = None
        if track.previous is not None:
            diff, scale = reduce.all_reduce(l1_change(signal, track.previous)).tolist()
            change = math.inf if scale == 0.0 else diff / scale
            estimate = self.rescale(change)
        self.changes.append(change)
        self.estimates.append(estimate)
        track.previous = signal

        compute = self._always_computed() or track.residual is None
        if not compute:
            track.accumulated += estimate if estimate is not None else math.inf
            compute = not track.accumulated < self.threshold  # `not <`: a NaN computes
        if compute:
            out = dit.run_blocks(state)
            track.residual = (out.video - state.video, out.text - state.text)
            track.accumulated = 0.0
            self._book(skipped=False)
            return out
        self._book(skipped=True)
        video_residual, text_residual = track.residual
        return dataclasses.replace(state, video=state.video + video_residual, text=state.text + text_residual)


def make_step_skipper(threshold: float, method: str = "auto", dit: CogDiT | None = None) -> StepSkipper:
    """A step-skipping part from a threshold: a method of :data:`~diffsynth_cog.denoise.step_cache.STEP_SKIPPERS`
    (``"teacache"``, ``"first-block"`` = ``step_cache.StepCache``) or ``"auto"`` = TeaCache where the model has a
    published polynomial (``dit`` given), else first-block."""
    if method == "auto":
        if dit is not None and teacache_coefficients(dit.config) is not None:
            return TeaCache(threshold)
        logger.info("no TeaCache calibration for this transformer: using the first-block step cache")
        return StepCache(threshold)
    if method not in STEP_SKIPPERS:
        raise ValueError(f"unknown step cache method {method!r}; valid: 'auto', {', '.join(STEP_SKIPPERS)}")
    return STEP_SKIPPERS[method](threshold)
