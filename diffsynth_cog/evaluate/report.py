"""One video's evaluation: every check run once, the curves kept for plotting, a summary for tables and JSON."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffsynth_cog.evaluate import color, events, flicker, warping
from diffsynth_cog.evaluate.frames import prepare

logger = logging.getLogger(__name__)


@dataclass
class VideoReport:
    """The checks of one video. Per-frame curves have one value per frame (index t describes frame t, and for
    pairwise checks the pair t - 1, t; NaN or 0 where undefined); ``events`` and ``joins`` list findings."""

    name: str
    num_frames: int
    fps: float
    size: tuple[int, int]  # (width, height)
    flicker_score: float
    curves: dict[str, np.ndarray]
    slopes: dict[str, float]
    events: list[events.Event]
    joins: list[dict] = field(default_factory=list)
    settings: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """The headline numbers (no curves): what the table shows and the JSON's ``summary``."""
        curves = self.curves
        return {
            "frames": self.num_frames,
            "fps": self.fps,
            "size": f"{self.size[0]}x{self.size[1]}",
            "temporal_flickering": self.flicker_score,
            "warping_error": float(np.mean(curves["warping_error"][1:])),
            "long_range_error": float(np.nanmean(curves["long_range_error"])) if self.num_frames > 2 else None,
            "color_delta_e_last": float(curves["color_delta_e"][-1]),
            "color_delta_e_per_second": float(
                np.polyfit(np.arange(self.num_frames) / self.fps, curves["color_delta_e"], 1)[0]
            ),
            "unexplained_color_drift": float(np.max(curves["unexplained_drift"])),
            "sharpness_ratio": _sharpness_ratio(curves["sharpness"], self.fps),
            "events": len(self.events),
        }

    def to_dict(self, with_curves: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "video": self.name,
            "summary": self.summary(),
            "slopes_per_second": self.slopes,
            "events": [e.to_dict() for e in self.events],
            "joins": self.joins,
        }
        if with_curves:
            out["curves"] = {
                k: [None if not np.isfinite(v) else round(float(v), 5) for v in c] for k, c in self.curves.items()
            }
        return out


def _sharpness_ratio(values: np.ndarray, fps: float) -> float:
    window = color.opening_count(fps, len(values), 1.0)
    opening = float(np.median(values[:window]))
    return float(np.median(values[-window:]) / opening) if opening > 0 else 1.0


def evaluate_frames(
    frames: np.ndarray, fps: float, joins: list[int] | None = None, name: str = "video", settings: dict | None = None
) -> VideoReport:
    """Every check on uint8 frames [F, H, W, 3] (F >= 2) at ``fps``; ``joins``: frames where windows or a
    continuation join (scored against the rest of the video)."""
    prepared = prepare(frames, fps)
    flicker_score, per_pair = flicker.temporal_flickering(prepared.full)
    warps = warping.warping_errors(prepared)
    differences = flicker.frame_differences(prepared.small)
    into = np.concatenate([[0.0], differences])  # into[t]: frame t against frame t - 1
    found = events.jump_events(warps.short, into, warps.lab_shift[:, 0], warps.valid)
    skip = np.zeros(prepared.count, dtype=bool)
    skip[events.jump_frames(found)] = True
    drift = color.color_drift(prepared.lab, fps, warps.lab_shift, skip=skip)
    frozen = events.frozen_events(differences)
    resumes = {e.frame + e.length for e in frozen}  # a replaced stretch ends in a leap: part of the freeze
    found = [e for e in found if not (e.kind == "jump" and e.frame in resumes)] + frozen
    found += events.drift_events(drift.cumulative)
    sharp = events.sharpness(prepared.gray_full)
    cuts = [e.frame for e in found if e.kind == "cut"]
    found += events.blur_events(sharp, color.opening_count(fps, prepared.count, 1.0), cuts)
    found.sort(key=lambda e: (e.frame, e.kind))
    curves = {
        "temporal_flickering": np.concatenate([[np.nan], per_pair]),
        "warping_error": warps.short,
        "long_range_error": warps.long,
        "color_delta_e": drift.delta_e,
        "unexplained_drift": drift.cumulative_drift,
        "sharpness": sharp,
    }
    slopes = {n: float(v) for n, v in zip(color.STAT_NAMES, drift.slopes, strict=True)}
    height, width = prepared.full.shape[1:3]
    return VideoReport(
        name=name,
        num_frames=prepared.count,
        fps=float(fps),
        size=(width, height),
        flicker_score=flicker_score,
        curves=curves,
        slopes=slopes,
        events=found,
        joins=events.join_scores(warps.short, into, sorted(joins or [])),
        settings=settings,
    )


def evaluate_video(path: str | os.PathLike[str], joins: list[int] | None = None) -> VideoReport:
    """Every check on a video file; the joins come from ``joins`` or else from the settings it carries."""
    from diffsynth_cog.io.settings import joins_of, read_settings
    from diffsynth_cog.io.video import load_video_array

    source = Path(path)
    frames, fps = load_video_array(source)
    settings = read_settings(source)
    if joins is None:
        joins = joins_of(settings)
    logger.info("evaluating %s: %d frames at %g fps, joins %s", source, len(frames), fps, joins or "none")
    return evaluate_frames(frames, fps, joins=joins, name=str(source), settings=settings)
