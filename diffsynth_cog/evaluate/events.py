"""Events: the frames where something goes wrong, found in the per-frame curves with robust scores.

* **jumps** (``cut``, ``jump``) and one-frame **flicker**: the short-range warping error of a frame (how badly
  its predecessor, moved along the optical flow, predicts it), and its plain difference from its
  predecessor. A frame is an event when either curve there is ``JUMP_RATIO`` times both the median of the
  ``NEIGHBOURS`` frames either side (robust: fast motion elsewhere does not hide a jump, and a jump does not
  hide itself) and the larger of the values just before and after it (motion changes smoothly, a seam does
  not), and ``JUMP_LEVELS`` grey levels above them. Two frames in a row that stand out together
  (``FLICKER_RATIO``), with Lightness shifts that cancel (brighter, then back), are one flickering frame. A jump where the flow
  matches less than ``CUT_VALID`` of the pixels (the frames share no content) is a ``cut``, else a ``jump``;
* **frozen** stretches: at least ``FROZEN_MIN`` consecutive frames that differ from the frame before by less
  than ``FROZEN_LEVEL`` grey levels on average (a stopped video, not a slow one);
* **drift**: the change of chroma (a, b) that motion does not explain (:mod:`diffsynth_cog.evaluate.color`),
  once its Delta E passes ``DRIFT_DELTA_E``; the onset is the start of the best fitting ramp;
* **blur**: in a shot (the frames between cuts), the sharpness (variance of the Laplacian) of the closing
  second below ``BLUR_RATIO`` times that of the opening second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

NEIGHBOURS = 8
JUMP_RATIO = 2.2
FLICKER_RATIO = 1.8  # a pair that stands out together and whose Lightness shifts cancel: stronger evidence
JUMP_LEVELS = 1.0
FLOOR_LEVELS = 0.1
CUT_VALID = 0.3
FROZEN_LEVEL = 0.15
FROZEN_MIN = 3
DRIFT_DELTA_E = 5.0
BLUR_RATIO = 0.5


@dataclass
class Event:
    """One finding: ``kind`` (cut, jump, flicker, frozen, drift, blur), the first ``frame`` it shows in,
    ``length`` in frames, ``score`` (robust score, Delta E or ratio, per kind) and a readable ``detail``."""

    kind: str
    frame: int
    length: int
    score: float
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def local_medians(values: np.ndarray, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """Per index: the median of the ``neighbours`` values either side of it (itself left out)."""
    count = len(values)
    medians = np.zeros(count)
    for i in range(count):
        around = np.concatenate([values[max(1, i - neighbours) : i], values[i + 1 : i + 1 + neighbours]])
        medians[i] = float(np.median(around)) if len(around) else 0.0
    return medians


def spike_scores(values: np.ndarray, width: int = 1, still: np.ndarray | None = None) -> np.ndarray:
    """How far ``values[t : t + width]`` (all of them) stand above the video around them: the smaller of
    their minimum over the local median and over the larger of the values just before and just after (index
    0 is unused: frame 0 has no predecessor). A smooth curve scores about 1; a lone spike its height ratio.

    Frames in ``still`` (bool [F]: a repeat of their predecessor) are left out of the comparison and score 0:
    a frame next to a repeated one is not a spike for being compared with nothing."""
    moving = np.ones(len(values), dtype=bool) if still is None else ~np.asarray(still, dtype=bool)
    moving[0] = True  # keeps index 0 as the unused first entry
    index = np.flatnonzero(moving)
    packed = values[index]
    count = len(packed)
    medians = local_medians(packed)
    packed_scores = np.zeros(count)
    for t in range(1, count - width + 1):
        low = float(packed[t : t + width].min())
        before = packed[t - 1] if t - 1 >= 1 else 0.0
        after = packed[t + width] if t + width < count else 0.0
        near = max(before, after, FLOOR_LEVELS)
        packed_scores[t] = min(low / max(float(medians[t]), FLOOR_LEVELS), low / near)
        if low - near < JUMP_LEVELS:  # a spike must also stand out in grey levels, not just in ratio
            packed_scores[t] = min(packed_scores[t], 1.0)
    scores = np.zeros(len(values))
    scores[index] = packed_scores
    return scores


def jump_events(
    error: np.ndarray, difference: np.ndarray, lightness_shift: np.ndarray, valid: np.ndarray
) -> list[Event]:
    """Cuts, jumps and one-frame flicker from the short-range warping error [F] and the plain difference of
    each frame from its predecessor [F] (index 0 unused in both), the signed L shift [F] of each frame
    against its motion-compensated predecessor and the fraction of its pixels the flow matched [F].

    A spike in either curve counts: the flow hides a seam that leaps along the motion, the plain difference
    one that fast motion drowns."""
    still = difference < FROZEN_LEVEL
    single = np.maximum(spike_scores(error, 1, still), spike_scores(difference, 1, still))
    double = np.maximum(spike_scores(error, 2, still), spike_scores(difference, 2, still))
    found: list[Event] = []
    t = 1
    while t < len(error):
        shift = lightness_shift[t]
        after = lightness_shift[t + 1] if t + 1 < len(error) else 0.0
        if double[t] >= FLICKER_RATIO and shift * after < 0 and abs(shift + after) < 0.5 * abs(shift):
            detail = f"frame {t} alone is {shift:+.1f} L off its neighbours"
            found.append(Event("flicker", t, 1, float(double[t]), detail))
            t += 2
            continue
        if single[t] >= JUMP_RATIO:
            kind = "cut" if valid[t] < CUT_VALID else "jump"
            detail = (
                f"{single[t]:.1f}x the change around it (warping error {error[t]:.1f}, difference {difference[t]:.1f})"
            )
            found.append(Event(kind, t, 1, float(single[t]), detail))
        t += 1
    return found


def jump_frames(events: list[Event]) -> np.ndarray:
    """Frame indices that a cut, jump or flicker event covers (a flicker covers its frame and the next)."""
    frames = [e.frame for e in events if e.kind in ("cut", "jump", "flicker")]
    frames += [e.frame + 1 for e in events if e.kind == "flicker"]
    return np.array(sorted(frames), dtype=int)


def frozen_events(differences: np.ndarray) -> list[Event]:
    """Stretches of at least FROZEN_MIN frames each within FROZEN_LEVEL of its predecessor; ``differences``
    [F - 1] are the mean absolute differences of consecutive frames (pair t: frames t and t + 1)."""
    still = np.append(differences < FROZEN_LEVEL, False)
    events, start = [], None
    for pair, is_still in enumerate(still):
        if is_still and start is None:
            start = pair
        elif not is_still and start is not None:
            length = pair - start
            if length >= FROZEN_MIN:
                frame = start + 1  # the first frame that repeats its predecessor
                detail = f"frames {frame}..{frame + length - 1} repeat frame {start}"
                events.append(Event("frozen", frame, length, float(length), detail))
            start = None
    return events


def drift_onset(cumulative: np.ndarray) -> int:
    """The frame where a ramp starts in the cumulative colour shift [F, 3]: the hinge ``a * max(0, t - s)``
    (one slope vector ``a``) that fits it best gives ``s``; the drift shows from frame ``s + 1``."""
    count = len(cumulative)
    best, best_error = 0, np.inf
    times = np.arange(count)
    for s in range(count - 1):
        ramp = np.maximum(0, times - s).astype(np.float64)
        slope = ramp @ cumulative / (ramp @ ramp)
        error = float(((cumulative - ramp[:, None] * slope) ** 2).sum())
        if error < best_error:
            best, best_error = s, error
    return best + 1


def drift_events(cumulative: np.ndarray) -> list[Event]:
    """A drift event when the motion-unexplained change of chroma (a, b of the cumulative Lab shift [F, 3])
    passes DRIFT_DELTA_E. Lightness is left out: cameras' exposure control changes it in clean footage."""
    chroma = cumulative[:, 1:]
    distance = np.sqrt((chroma**2).sum(axis=1))
    peak = int(np.argmax(distance))
    if distance[peak] < DRIFT_DELTA_E:
        return []
    onset = min(drift_onset(chroma), peak)
    detail = f"chroma moves by Delta E {distance[peak]:.1f} (frame {peak}) without motion explaining it"
    return [Event("drift", onset, peak - onset + 1, float(distance[peak]), detail)]


def sharpness(gray_frames: np.ndarray) -> np.ndarray:
    """Variance of the Laplacian of each grey frame [F, H, W] (higher: sharper)."""
    return np.array([float(cv2.meanStdDev(cv2.Laplacian(frame, cv2.CV_32F))[1][0, 0]) ** 2 for frame in gray_frames])


def blur_events(values: np.ndarray, window: int, cuts: list[int]) -> list[Event]:
    """A blur event per shot (the frames between ``cuts``) whose closing ``window`` frames keep less than
    BLUR_RATIO of the sharpness of its opening ``window`` frames (medians); shots under 3 windows are skipped."""
    found = []
    bounds = [0, *sorted(cuts), len(values)]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        if stop - start < 3 * window:
            continue
        opening = float(np.median(values[start : start + window]))
        closing = float(np.median(values[stop - window : stop]))
        ratio = closing / opening if opening > 0 else 1.0
        if ratio < BLUR_RATIO:
            detail = f"frames {stop - window}..{stop - 1} keep {ratio:.0%} of the sharpness of frames {start}..{start + window - 1}"
            found.append(Event("blur", stop - window, window, ratio, detail))
    return found


def join_scores(error: np.ndarray, difference: np.ndarray, joins: list[int]) -> list[dict]:
    """Per join frame (inside the video): its warping error, its spike score (as for jumps), the ratio of
    its warping error to the median elsewhere, and the share of other frames whose spike score is lower."""
    still = difference < FROZEN_LEVEL
    score = np.maximum(spike_scores(error, 1, still), spike_scores(difference, 1, still))
    inside = [j for j in joins if 1 <= j < len(error)]
    others = np.delete(np.arange(1, len(error)), [j - 1 for j in inside])
    median = float(np.median(error[others])) if len(others) else 0.0
    return [
        {
            "frame": j,
            "warping_error": float(error[j]),
            "spike_score": float(score[j]),
            "ratio_to_elsewhere": float(error[j] / median) if median > 0 else None,
            "above_share": float((score[others] < score[j]).mean()) if len(others) else None,
        }
        for j in inside
    ]
