"""The frames every check reads: the video at its own size (flicker, sharpness) and a small copy (flow, colour).

Optical flow and colour statistics do not need full resolution: a copy whose longer side is at most
``ANALYSIS_SIDE`` pixels (area-averaged, which also averages out codec noise) keeps ``evaluate`` within seconds
for a 129-frame 480x720 video on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

ANALYSIS_SIDE = 360


@dataclass
class Frames:
    """One video, ready for the checks. ``full``: uint8 [F, H, W, 3] RGB as stored; ``small``: uint8
    [F, h, w, 3] RGB, longer side <= ANALYSIS_SIDE; ``gray``: uint8 [F, h, w]; ``lab``: float32 [F, h, w, 3]
    CIE Lab (L in 0..100); ``fps``: frames per second."""

    full: np.ndarray
    gray_full: np.ndarray
    small: np.ndarray
    gray: np.ndarray
    lab: np.ndarray
    fps: float

    @property
    def count(self) -> int:
        return int(self.full.shape[0])

    @cached_property
    def small_float(self) -> np.ndarray:
        """``small`` as float32 (grey levels 0..255), converted once for the warping checks."""
        return self.small.astype(np.float32)


def check_video_array(frames: np.ndarray, what: str = "video") -> np.ndarray:
    """``frames`` as a uint8 array [F, H, W, 3] (at least 2 frames), or ValueError saying what it is."""
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[3] != 3 or array.dtype != np.uint8:
        raise ValueError(f"{what} must be a uint8 array [F, H, W, 3]; got {array.dtype} of shape {list(array.shape)}")
    if array.shape[0] < 2:
        raise ValueError(f"{what} has {array.shape[0]} frame; the temporal checks need at least 2")
    return array


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., H, W, 3] -> float32 CIE Lab (D65; L 0..100, a and b about -128..127), via OpenCV."""
    flat = rgb.reshape(-1, *rgb.shape[-3:])
    lab = np.stack([cv2.cvtColor(frame.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab) for frame in flat])
    return lab.reshape(rgb.shape).astype(np.float32)


def from_lab(lab: np.ndarray) -> np.ndarray:
    """float32 CIE Lab [..., H, W, 3] -> float32 RGB in [0, 1] (clipped), the inverse of :func:`to_lab`."""
    flat = lab.reshape(-1, *lab.shape[-3:]).astype(np.float32)
    rgb = np.stack([cv2.cvtColor(frame, cv2.COLOR_Lab2RGB) for frame in flat])
    return np.clip(rgb, 0.0, 1.0).reshape(lab.shape)


def prepare(frames: np.ndarray, fps: float, side: int = ANALYSIS_SIDE) -> Frames:
    """The :class:`Frames` of a uint8 video [F, H, W, 3] at ``fps``."""
    full = check_video_array(frames)
    height, width = full.shape[1:3]
    scale = min(1.0, side / max(height, width))
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    if scale < 1.0:
        small = np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in full])
    else:
        small = full
    gray = np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in small])
    gray_full = np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in full]) if scale < 1.0 else gray
    return Frames(full=full, gray_full=gray_full, small=small, gray=gray, lab=to_lab(small), fps=float(fps))
