"""Temporal flicker, as VBench's ``temporal_flickering`` dimension scores it (no model involved).

VBench scores a video as ``(255 - mean over consecutive pairs of mean |frame_t - frame_t+1|) / 255`` on the
frames at their stored size: 1.0 for a still video, lower as consecutive frames differ more (flicker and
fast motion alike). We report the same number and its per-pair terms.
"""

from __future__ import annotations

import cv2
import numpy as np


def frame_differences(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference of each consecutive pair of uint8 frames [F, H, W, C], in grey levels: [F - 1]."""
    size = frames[0].size
    return np.array([cv2.norm(frames[t], frames[t + 1], cv2.NORM_L1) / size for t in range(len(frames) - 1)])


def temporal_flickering(frames: np.ndarray) -> tuple[float, np.ndarray]:
    """VBench's temporal_flickering score of uint8 frames [F, H, W, C] (F >= 2) and its per-pair terms [F - 1]
    (pair t is frames t and t + 1), each ``(255 - mean |difference|) / 255``."""
    per_pair = (255.0 - frame_differences(frames)) / 255.0
    return float(per_pair.mean()), per_pair
