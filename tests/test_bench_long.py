"""The long-video benchmark's script runs end to end on a tiny model (CPU), so a GPU call never finds its bugs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_long_smoke_runs_every_section_and_reports_what_it_skipped(tmp_path):
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_long.py"), "--smoke", "--frames", "9", "17"]
    argv += ["--modes", "dense", "window:1:token", "windowed", "--window-frames", "9", "--skip", "17f_dense"]
    argv += ["--fast-path", "--fast-steps", "3", "--vae", "--vae-frames", "9"]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_long.json").read_text())
    runs = result["runs"]
    assert runs["17f_dense"] == {"skipped": "--skip"}
    assert runs["9f_windowed"]["skipped"].startswith("one window covers")
    assert runs["17f_windowed"]["windows"]["count"] == 2 and runs["17f_windowed"]["step_s"] >= 0
    assert (
        runs["9f_window:1:token"]["mask"]["name"] == "window1-token" and "rel_err_vs_dense" in runs["9f_window:1:token"]
    )
    fast = result["fast_path"]
    # the skipped step was timed as a skip: one computed step, then one skipped (the step bookkeeping ran)
    assert fast["skipped_step_s"] >= 0 and fast["short_run"]["steps"] == 3
    assert fast["short_run"]["computed"] + fast["short_run"]["skipped"] == 3
    assert set(fast["projected_50_steps"]) == {"measured_skip_fraction", "teacache_published_0.2", "no_skipping"}
    assert result["vae_decode"]["9f_tiled"]["frames_out"] == 9
    assert "random weights" in result["note"]
