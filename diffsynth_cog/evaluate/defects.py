"""Planted defects: the faults the checks look for, put into a clean video at a chosen frame.

Used to measure the checks (tests, ``benchmarks/bench_evaluate.py``) and to calibrate them on your own footage.
Each function takes uint8 frames [F, H, W, 3] and returns a new array (the input is not modified); ``at`` is
the first frame the defect shows in.
"""

from __future__ import annotations

import numpy as np

from diffsynth_cog.evaluate.frames import check_video_array


def _check_at(frames: np.ndarray, at: int, length: int = 1) -> None:
    if not 1 <= at <= len(frames) - length:
        raise ValueError(f"at={at} (length {length}) must leave a frame before it and fit in {len(frames)} frames")


def brightness_flicker(frames: np.ndarray, at: int, gain: float = 1.2) -> np.ndarray:
    """Frame ``at`` alone is ``gain`` times as bright (clipped to 255)."""
    out = check_video_array(frames).copy()
    _check_at(out, at)
    out[at] = np.clip(out[at].astype(np.float32) * gain, 0, 255).round().astype(np.uint8)
    return out


def hard_cut(frames: np.ndarray, at: int, other: np.ndarray) -> np.ndarray:
    """From frame ``at`` on, the frames of ``other`` (another shot, resized by the caller to the same size)."""
    out = check_video_array(frames).copy()
    _check_at(out, at)
    needed = len(out) - at
    if len(other) < needed or other.shape[1:] != out.shape[1:]:
        raise ValueError(f"other must hold at least {needed} frames of size {out.shape[1:3]}")
    out[at:] = other[:needed]
    return out


def color_drift(frames: np.ndarray, at: int, per_frame: float = 0.005) -> np.ndarray:
    """From frame ``at`` on, a warm cast that grows by ``per_frame`` each frame: red gains, blue loses
    ``per_frame * (t - at + 1)`` of its value (0.005: 10 % after 20 frames)."""
    out = check_video_array(frames).copy()
    _check_at(out, at)
    for t in range(at, len(out)):
        amount = per_frame * (t - at + 1)
        frame = out[t].astype(np.float32)
        frame[..., 0] *= 1.0 + amount
        frame[..., 2] *= 1.0 - amount
        out[t] = np.clip(frame, 0, 255).round().astype(np.uint8)
    return out


def freeze(frames: np.ndarray, at: int, length: int = 8) -> np.ndarray:
    """Frames ``at .. at + length - 1`` all repeat frame ``at - 1``: the video stops for ``length`` frames."""
    out = check_video_array(frames).copy()
    _check_at(out, at, length)
    out[at : at + length] = out[at - 1]
    return out


def seam_jump(frames: np.ndarray, at: int, skip: int = 6) -> np.ndarray:
    """From frame ``at`` on, the video jumps ``skip`` frames ahead (``skip`` fewer frames in all), as where two
    windows that disagree on the motion meet."""
    out = check_video_array(frames)
    _check_at(out, at, skip + 1)
    return np.concatenate([out[:at], out[at + skip :]])
