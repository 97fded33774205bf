"""``--plot``: each curve of one or more reports over time, joins and events marked (matplotlib, Agg)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffsynth_cog.evaluate.compare import Comparison
from diffsynth_cog.evaluate.report import VideoReport

CURVES = {
    "temporal_flickering": "VBench flicker term (1 = still)",
    "warping_error": "warping error, t-1 -> t (grey levels)",
    "long_range_error": "long-range warping error (grey levels)",
    "color_delta_e": "colour Delta E vs opening",
    "unexplained_drift": "colour change motion does not explain (Delta E)",
    "sharpness": "sharpness (variance of Laplacian)",
}


def plot_reports(
    reports: list[VideoReport], path: str | os.PathLike[str], comparison: Comparison | None = None
) -> Path:
    """Write a PNG with one panel per curve (one line per video; joins dashed, events dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffsynth_cog.io.atomic import atomic_path

    panels = len(CURVES) + (1 if comparison is not None else 0)
    figure, axes = plt.subplots(panels, 1, figsize=(10, 2.2 * panels), sharex=True)
    for axis, (key, title) in zip(axes, CURVES.items(), strict=False):
        for report in reports:
            axis.plot(np.arange(report.num_frames), report.curves[key], label=Path(report.name).name, linewidth=1)
            for join in report.joins:
                axis.axvline(join["frame"], color="tab:red", linestyle="--", linewidth=0.8)
            for event in report.events:
                axis.axvline(event.frame, color="tab:purple", linestyle=":", linewidth=0.8)
        axis.set_title(title, fontsize=9)
    if comparison is not None:
        axis = axes[-1]
        axis.plot(np.minimum(comparison.psnr, 60.0), label="PSNR (dB, capped at 60)")
        if comparison.parts_at is not None:
            axis.axvline(comparison.parts_at, color="tab:red", linestyle="--", linewidth=0.8)
        axis.set_title("A vs B: PSNR per frame (dashed: where they part)", fontsize=9)
    axes[0].legend(fontsize=7, loc="lower left")
    axes[-1].set_xlabel("frame")
    figure.tight_layout()
    target = Path(path).expanduser()
    with atomic_path(target) as partial:
        figure.savefig(partial, dpi=80, format="png")
    plt.close(figure)
    return target
