"""The long-video benchmark's script runs end to end on a tiny model (CPU), so a GPU call never finds its bugs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_long_smoke_runs_every_section_times_what_it_says_and_reports_what_it_skipped(tmp_path):
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_long.py"), "--smoke", "--frames", "9", "17"]
    argv += ["--modes", "dense", "window:1:token", "windowed", "--window-frames", "9", "--skip", "17f_dense"]
    argv += ["--fast-path", "--fast-steps", "3", "--vae", "--vae-frames", "9", "--checks"]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.monotonic()
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_long.json").read_text())
    runs = result["runs"]
    assert runs["17f_dense"] == {"skipped": "--skip"}
    assert runs["9f_windowed"]["skipped"].startswith("one window covers")
    assert runs["17f_windowed"]["windows"]["count"] == 2
    # a step was timed (two DiT calls: tens of ms at least, never 0.000) in seconds (within the run's wall time)
    assert 0 < runs["17f_windowed"]["step_s"] < wall and 0 < runs["9f_dense"]["step_s"] < wall
    assert (
        runs["9f_window:1:token"]["mask"]["name"] == "window1-token" and "rel_err_vs_dense" in runs["9f_window:1:token"]
    )
    fast = result["fast_path"]
    # the skipped step was timed as a skip: it runs no block, so it costs less than a computed step (~1/10 of it)
    assert 0 < fast["skipped_step_s"] < fast["computed_step_s"] < wall and fast["short_run"]["steps"] == 3
    assert fast["short_run"]["computed"] + fast["short_run"]["skipped"] == 3
    assert set(fast["projected_50_steps"]) == {"measured_skip_fraction", "teacache_published_0.2", "no_skipping"}
    assert result["vae_decode"]["9f_tiled"]["frames_out"] == 9
    assert "random weights" in result["note"] and "test the pipeline, not" in result["note"]
    # --checks: every mode that ran is judged beside the exact one; the windowed mode's join is scored
    dense, windowed = runs["9f_dense"]["checks"], runs["17f_windowed"]["checks"]
    assert {"flicker", "warping_error", "unexplained_color_drift", "joins", "events"} <= set(dense)
    assert dense["joins"] == [] and [join["frame"] for join in windowed["joins"]] == [5]
    assert "checks" in runs["9f_window:1:token"] and windowed["flicker"] >= 0
