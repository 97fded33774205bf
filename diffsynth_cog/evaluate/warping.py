"""Warping error: how well each frame is predicted by an earlier one moved along dense optical flow.

The flow is OpenCV's DIS (classical, no weights) on the grey analysis frames. To predict frame ``t`` from
frame ``s``, the backward flow ``t -> s`` tells where each pixel of ``t`` came from; frame ``s`` sampled there
(bilinear) is the prediction. Pixels the forward flow ``s -> t`` does not bring back to where they started
(the usual forward-backward check: ``|f + b|^2 < 0.01 (|f|^2 + |b|^2) + 0.5``) are occluded or mismatched
and left out, as are pixels whose source lies outside the frame.

* short range: ``s = t - 1``; motion is compensated, so what remains is flicker, jumps and noise;
* long range: ``s = t - lag`` (an *anchor* about a second earlier): content that should persist but changed
  (identity or texture drift, a seam) raises it. It skips the forward-backward check (one flow per frame,
  not two), so occlusions count: compare it along one video or between videos, not against the short range.

Each pair also gives the signed mean Lab difference over the kept pixels (``t`` minus the prediction): a
colour change of the whole frame that motion does not explain (the colour drift check sums it).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from diffsynth_cog.evaluate.frames import Frames

MIN_VALID = 0.05  # below this fraction of kept pixels the flow failed (a cut): every pixel counts


@dataclass
class PairError:
    """The prediction of frame ``t`` from frame ``s``: mean absolute RGB error (grey levels) over the kept
    pixels, the signed mean Lab shift [3] (``t`` minus the prediction) and the kept fraction."""

    error: float
    lab_shift: np.ndarray
    valid: float


def _flow_engine() -> cv2.DISOpticalFlow:
    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)


def _sample(image: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    return cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _masked_mean(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-channel mean of ``image`` [h, w, C] over the non-zero pixels of the uint8 ``mask`` (OpenCV: fast)."""
    return np.array(cv2.mean(image, mask=mask)[: image.shape[2] if image.ndim == 3 else 1])


def predict_pair(
    engine: cv2.DISOpticalFlow, frames: Frames, s: int, t: int, occlusion: bool = True, grid: tuple | None = None
) -> PairError:
    """Frame ``t`` predicted from frame ``s`` through the flow (see the module docstring); without
    ``occlusion`` only pixels whose source is outside the frame are left out (one flow instead of two) and
    the Lab shift is not measured. ``grid``: the pixel coordinates (x, y), float32 [h, w] each."""
    backward = engine.calc(frames.gray[t], frames.gray[s], None)  # t's pixel x came from x + backward(x)
    height, width = backward.shape[:2]
    if grid is None:
        grid = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    map_x, map_y = grid[0] + backward[..., 0], grid[1] + backward[..., 1]
    keep = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
    if occlusion:
        forward_there = _sample(engine.calc(frames.gray[s], frames.gray[t], None), map_x, map_y)
        round_trip = cv2.magnitude(backward[..., 0] + forward_there[..., 0], backward[..., 1] + forward_there[..., 1])
        magnitude = cv2.magnitude(backward[..., 0], backward[..., 1]) ** 2
        magnitude += cv2.magnitude(forward_there[..., 0], forward_there[..., 1]) ** 2
        keep &= round_trip**2 < 0.01 * magnitude + 0.5
    valid = float(np.count_nonzero(keep)) / keep.size
    mask = np.full(keep.shape, 255, np.uint8) if valid < MIN_VALID else keep.astype(np.uint8) * 255
    predicted = _sample(frames.small_float[s], map_x, map_y)
    error = float(_masked_mean(cv2.absdiff(predicted, frames.small_float[t]), mask).mean())
    shift = np.zeros(3)
    if occlusion:
        shift = _masked_mean(frames.lab[t] - _sample(frames.lab[s], map_x, map_y), mask)
    return PairError(error=error, lab_shift=shift, valid=valid)


@dataclass
class WarpingErrors:
    """``short[t]``: frame t predicted from t - 1 (t = 1 .. F-1; short[0] is 0); ``lab_shift[t]`` its signed Lab
    shift [F, 3]; ``valid[t]`` its kept fraction; ``long[t]``: frame t from its anchor t - lag (NaN for t < lag)."""

    short: np.ndarray
    lab_shift: np.ndarray
    valid: np.ndarray
    long: np.ndarray
    lag: int


def long_range_lag(fps: float, count: int) -> int:
    """The anchor distance: about one second, at least 2 frames, and within the video."""
    return int(min(max(2, round(fps)), max(1, count - 1)))


def warping_errors(frames: Frames, lag: int | None = None) -> WarpingErrors:
    """Short- and long-range warping errors of every frame (see :class:`WarpingErrors`)."""
    engine = _flow_engine()
    count = frames.count
    height, width = frames.gray.shape[1:3]
    grid = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    lag = long_range_lag(frames.fps, count) if lag is None else lag
    short, valid = np.zeros(count), np.ones(count)
    shifts = np.zeros((count, 3))
    for t in range(1, count):
        pair = predict_pair(engine, frames, t - 1, t, grid=grid)
        short[t], shifts[t], valid[t] = pair.error, pair.lab_shift, pair.valid
    long = np.full(count, np.nan)
    for t in range(lag, count):
        long[t] = predict_pair(engine, frames, t - lag, t, occlusion=False, grid=grid).error
    return WarpingErrors(short=short, lab_shift=shifts, valid=valid, long=long, lag=lag)
