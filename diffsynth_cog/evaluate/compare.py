"""Two videos of the same prompt and seed, frame by frame: PSNR and SSIM (scikit-image), and where they part."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffsynth_cog.evaluate.frames import check_video_array

PART_PSNR = 30.0  # dB: below it two renderings of one video visibly differ
PART_SSIM = 0.9


@dataclass
class Comparison:
    """``psnr`` [F] in dB (inf where identical), ``ssim`` [F]; ``parted``: frames below PART_PSNR or PART_SSIM;
    ``parts_at``: the first of them (None when they never part)."""

    names: tuple[str, str]
    psnr: np.ndarray
    ssim: np.ndarray
    parted: list[int]

    @property
    def parts_at(self) -> int | None:
        return self.parted[0] if self.parted else None

    def to_dict(self, with_curves: bool = True) -> dict[str, Any]:
        finite = self.psnr[np.isfinite(self.psnr)]
        out: dict[str, Any] = {
            "videos": list(self.names),
            "mean_psnr": float(finite.mean()) if len(finite) else None,  # None: every frame identical
            "min_psnr": float(finite.min()) if len(finite) else None,
            "mean_ssim": float(self.ssim.mean()),
            "min_ssim": float(self.ssim.min()),
            "parts_at": self.parts_at,
            "parted_frames": self.parted,
        }
        if with_curves:
            out["psnr"] = [None if not np.isfinite(v) else round(float(v), 4) for v in self.psnr]
            out["ssim"] = [round(float(v), 6) for v in self.ssim]
        return out


def compare_frames(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("a", "b")) -> Comparison:
    """Per-frame PSNR and SSIM of two uint8 videos [F, H, W, 3] of one size and length."""
    a, b = check_video_array(a, names[0]), check_video_array(b, names[1])
    if a.shape != b.shape:
        raise ValueError(
            f"--compare needs two videos of one size and length: {names[0]} is {_shape(a)}, {names[1]} is {_shape(b)}"
        )
    psnr = np.array([_psnr(x, y) for x, y in zip(a, b, strict=True)])
    ssim = np.array([structural_similarity(x, y, channel_axis=2, data_range=255) for x, y in zip(a, b, strict=True)])
    parted = [int(i) for i in np.nonzero((psnr < PART_PSNR) | (ssim < PART_SSIM))[0]]
    return Comparison(names=names, psnr=psnr, ssim=ssim, parted=parted)


def _psnr(x: np.ndarray, y: np.ndarray) -> float:
    if np.array_equal(x, y):
        return float("inf")
    return float(peak_signal_noise_ratio(x, y, data_range=255))


def _shape(video: np.ndarray) -> str:
    return f"{video.shape[0]} frames of {video.shape[2]}x{video.shape[1]}"


def compare_videos(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> Comparison:
    """:func:`compare_frames` of two video files."""
    from diffsynth_cog.io.video import load_video_array

    return compare_frames(load_video_array(a)[0], load_video_array(b)[0], names=(str(a), str(b)))
