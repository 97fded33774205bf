"""Colour drift and colour matching, in CIE Lab (L: lightness 0..100; a: green-red; b: blue-yellow).

Two views of drift:

* **against the opening**: each frame's Lab mean and standard deviation against those of the opening frames
  (the first ``opening_seconds``), their distance as a colour difference (CIE76 Delta E of the means) and the
  slope of each statistic per second (a least-squares line). A camera that pans to a new scene changes them
  too, so they describe the video rather than prove a fault;
* **unexplained by motion** (the drift the check flags): the signed Lab shift of each frame against its
  motion-compensated predecessor (:mod:`diffsynth_cog.evaluate.warping`), summed over time. New content
  entering the frame is predicted from where it came from, so only a change of colour itself accumulates;
  its Delta E from the start is ``cumulative_drift``.

:func:`match_color` moves frames' Lab statistics onto those of reference frames (Reinhard-style transfer:
per channel ``(x - mean_source) * std_reference / std_source + mean_reference``), the colour-stable join of
a continuation: one transform for all the new frames, measured on frames that show the same content.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from diffsynth_cog.evaluate.frames import from_lab, to_lab


def lab_statistics(lab: np.ndarray) -> np.ndarray:
    """Per-frame Lab mean and standard deviation: [F, 6] = (mean L, a, b, std L, a, b)."""
    rows = [np.concatenate([m[:3, 0], d[:3, 0]]) for m, d in (cv2.meanStdDev(frame) for frame in lab)]
    return np.array(rows, dtype=np.float64).reshape(len(lab), 6)


def opening_count(fps: float, count: int, opening_seconds: float = 0.5) -> int:
    """How many frames make the opening: ``opening_seconds`` worth, at least 1, at most half the video."""
    return int(min(max(1, round(fps * opening_seconds)), max(1, count // 2)))


@dataclass
class ColorDrift:
    """``delta_e[t]``: Delta E of frame t's Lab mean from the opening's; ``statistics`` [F, 6]; ``slopes``:
    change per second of each statistic (same order); ``cumulative[t]`` [F, 3]: the summed motion-unexplained
    Lab shift up to frame t; ``cumulative_drift[t]`` its Delta E."""

    delta_e: np.ndarray
    statistics: np.ndarray
    slopes: np.ndarray
    cumulative: np.ndarray
    cumulative_drift: np.ndarray
    opening_frames: int


STAT_NAMES = ("mean_L", "mean_a", "mean_b", "std_L", "std_a", "std_b")


def color_drift(lab: np.ndarray, fps: float, lab_shift: np.ndarray, skip: np.ndarray | None = None) -> ColorDrift:
    """The drift of Lab frames [F, h, w, 3] at ``fps``; ``lab_shift`` [F, 3] from the warping check.

    ``skip`` (bool [F]) leaves out the shifts of frames that a jump or a cut already explains."""
    statistics = lab_statistics(lab)
    count = len(statistics)
    opening = opening_count(fps, count)
    reference = statistics[:opening].mean(axis=0)
    delta_e = np.sqrt(((statistics[:, :3] - reference[:3]) ** 2).sum(axis=1))
    seconds = np.arange(count) / fps
    slopes = np.polyfit(seconds, statistics, 1)[0] if count >= 2 else np.zeros(6)
    shifts = np.array(lab_shift, dtype=np.float64)
    if skip is not None:
        shifts[np.asarray(skip, dtype=bool)] = 0.0
    cumulative = np.cumsum(shifts, axis=0)
    return ColorDrift(
        delta_e=delta_e,
        statistics=statistics,
        slopes=np.asarray(slopes, dtype=np.float64),
        cumulative=cumulative,
        cumulative_drift=np.sqrt((cumulative**2).sum(axis=1)),
        opening_frames=opening,
    )


def match_color(
    frames: np.ndarray,
    reference: np.ndarray,
    source: np.ndarray | None = None,
    strength: float = 1.0,
) -> np.ndarray:
    """``frames`` (uint8 [F, H, W, 3]) with their colours moved so that ``source`` would match ``reference``.

    One per-channel Lab transform, ``(x - mean_source) * std_reference / std_source + mean_reference``, with
    means and deviations over all pixels of ``source`` and of ``reference`` (uint8 [N, H, W, 3] each, any
    count and size), is applied to every frame. ``source`` defaults to ``frames`` themselves; for a
    continuation pass the re-decoded context frames as ``source`` and the original context as ``reference``,
    so that the transform is measured on the same content. ``strength`` in [0, 1] blends it in (0: unchanged).
    Returns uint8 frames of the same shape.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1]; got {strength}")
    frames, reference = np.asarray(frames), np.asarray(reference)
    source = frames if source is None else np.asarray(source)
    for name, array in (("frames", frames), ("reference", reference), ("source", source)):
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or len(array) == 0:
            raise ValueError(f"{name} must be uint8 [N, H, W, 3], N >= 1; got {array.dtype} {list(array.shape)}")
    if strength == 0.0:
        return frames.copy()
    src = lab_statistics(to_lab(source)).mean(axis=0)  # per-frame statistics averaged: frames of one size
    ref = lab_statistics(to_lab(reference)).mean(axis=0)
    scale = ref[3:] / np.maximum(src[3:], 1e-3)
    scale = 1.0 + strength * (scale - 1.0)
    offset = strength * (ref[:3] - src[:3])
    lab = to_lab(frames)
    moved = (lab - src[:3]) * scale + src[:3] + offset
    return (from_lab(moved.astype(np.float32)) * 255.0).round().astype(np.uint8)
