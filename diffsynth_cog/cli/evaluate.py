"""``diffsynth-cog evaluate``: judge videos offline, no model weights (see ``diffsynth_cog.evaluate``).

diffsynth-cog evaluate video.mp4 other.mp4 --json report.json --plot curves.png
diffsynth-cog evaluate --compare exact.mp4 approximate.mp4
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The headline numbers of ``VideoReport.summary``: (key, column title, format); the console table and the web UI.
SUMMARY_COLUMNS = (
    ("frames", "frames", "{:d}"),
    ("fps", "fps", "{:g}"),
    ("size", "size", "{}"),
    ("temporal_flickering", "flicker (VBench)", "{:.4f}"),
    ("warping_error", "warp err", "{:.2f}"),
    ("long_range_error", "long err", "{:.2f}"),
    ("color_delta_e_last", "dE end", "{:.2f}"),
    ("color_delta_e_per_second", "dE/s", "{:+.2f}"),
    ("unexplained_color_drift", "drift dE", "{:.2f}"),
    ("sharpness_ratio", "sharp end/start", "{:.2f}"),
    ("events", "events", "{:d}"),
)


def add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="judge videos offline: flicker, warping error, colour drift, jumps and seams, frozen stretches, blur",
        description="Weight-free temporal checks of videos, in seconds on a CPU. Joins of windows or continuations "
        "are read from the settings a video carries (or --joins) and scored against the rest of the video. "
        "Needs the 'evaluate' extras (pip install 'diffsynth-cog[evaluate]').",
    )
    p.add_argument("videos", nargs="*", metavar="VIDEO", help="video files to judge")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="per-frame PSNR / SSIM of two videos of one size (default: none)",
    )
    p.add_argument("--joins", default=None, help="comma-separated join frames (default: from each video's settings)")
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="write the full report (curves included) as JSON; - for stdout (default: none)",
    )
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="write the curves over time as a PNG (joins marked; default: none)"
    )
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any event is found")
    p.set_defaults(func=cmd_evaluate)


def _parse_joins(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        joins = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--joins must be comma-separated frame indices (e.g. 49,97); got {text!r}") from None
    if any(j < 1 for j in joins):
        raise ValueError(f"--joins are frame indices >= 1 (the first frame after each join); got {text!r}")
    return joins


def _check_inputs(args: argparse.Namespace) -> list[int] | None:
    """Every argument checked before any video is decoded."""
    from diffsynth_cog.io.atomic import check_output_path

    if not args.videos and not args.compare:
        raise ValueError("evaluate needs VIDEO files, or --compare A B")
    for video in [*args.videos, *(args.compare or [])]:
        if not Path(video).is_file():
            raise FileNotFoundError(f"video file not found: {video}")
    if args.json and args.json != "-":
        check_output_path(args.json, what="--json")
    if args.plot:
        if Path(args.plot).suffix.lower() != ".png":
            raise ValueError(f"--plot writes a PNG; give a .png path, got {args.plot!r}")
        check_output_path(args.plot, what="--plot")
    return _parse_joins(args.joins)


def format_table(rows: list[dict[str, Any]], names: list[str]) -> str:
    """The console table: one row per video, one column per headline number."""
    header = ["video", *(title for _, title, _ in SUMMARY_COLUMNS)]
    lines = [header]
    for name, row in zip(names, rows, strict=True):
        cells = [Path(name).name]
        for key, _, form in SUMMARY_COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else form.format(value))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


def finding_lines(events: list[dict[str, Any]], joins: list[dict[str, Any]]) -> list[str]:
    """One line per event and per join (``VideoReport.to_dict``'s ``events`` and ``joins``)."""
    lines = [f"{e['kind']} at frame {e['frame']} ({e['detail']})" for e in events]
    for join in joins:
        ratio = join["ratio_to_elsewhere"]
        lines.append(
            f"join at frame {join['frame']}: spike score {join['spike_score']:.2f}, warping error "
            f"{join['warping_error']:.2f}" + (f" ({ratio:.2f}x elsewhere)" if ratio is not None else "")
        )
    return lines


def _print_findings(report: Any) -> None:
    for line in finding_lines([e.to_dict() for e in report.events], report.joins):
        print(f"  {Path(report.name).name}: {line}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    joins = _check_inputs(args)
    from diffsynth_cog.evaluate import compare_videos, evaluate_video
    from diffsynth_cog.io.atomic import write_text_atomic

    reports = [evaluate_video(video, joins=joins) for video in args.videos]
    comparison = compare_videos(*args.compare) if args.compare else None
    if reports:
        print(format_table([r.summary() for r in reports], [r.name for r in reports]))
        for report in reports:
            _print_findings(report)
    if comparison is not None:
        result = comparison.to_dict(with_curves=False)
        where = f"they part at frame {result['parts_at']}" if result["parts_at"] is not None else "they never part"
        psnr = (
            "identical"
            if result["mean_psnr"] is None
            else f"{result['mean_psnr']:.2f} dB (min {result['min_psnr']:.2f})"
        )
        print(
            f"compare {args.compare[0]} vs {args.compare[1]}: PSNR {psnr}, SSIM {result['mean_ssim']:.4f} "
            f"(min {result['min_ssim']:.4f}); {where}"
        )
    if args.json:
        document = {"videos": [r.to_dict() for r in reports]}
        if comparison is not None:
            document["compare"] = comparison.to_dict()
        text = json.dumps(document, indent=2, allow_nan=False)
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            logger.info("report written to %s", write_text_atomic(args.json, text + "\n"))
    if args.plot:
        from diffsynth_cog.evaluate.plot import plot_reports

        logger.info("curves plotted in %s", plot_reports(reports, args.plot, comparison))
    return 1 if args.strict and any(r.events for r in reports) else 0
