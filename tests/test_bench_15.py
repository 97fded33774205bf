"""The CogVideoX 1.5 benchmark's script runs every section on a tiny model (CPU), so the GPU run never finds its bugs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_15_smoke_runs_every_section_and_agrees_with_diffusers(tmp_path):
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_15.py"), "--smoke", "--repeat", "1"]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_15.json").read_text())
    runs = result["runs"]
    dense = runs["9f_dense"]
    # 9 frames: 3 latent frames padded to 4 = 2 temporal patches of 2 x 3 patches at 32x48.
    assert dense["latent_frames"] == 4 and dense["video_tokens"] == 12
    assert dense["rel_diff_vs_reference"] < 1e-5 and dense["speedup"] > 0
    assert runs["17f_dense"]["latent_frames"] == 6 and runs["17f_window:1:token"]["attention"] == "window:1:token"
    assert runs["17f_window:1:frame"]["attention"] == "window:1:frame"  # the same window, frame by frame
    for spec in ("window:1:token", "window:1:frame"):
        assert result[f"{spec}_vs_short_dense"] > 0
    assert "random weights" in result["note"]


def test_whole_video_benchmark_smoke_times_every_run_and_compares_the_approximate_one_with_the_exact(tmp_path):
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_video_15.py"), "--smoke", "--warmup"]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads((tmp_path / "bench_video_15.json").read_text())["runs"]
    assert list(runs) == ["exact_81", "fast_81", "fast_81_frame", "window_161", "window_161_frame"]
    for run in runs.values():  # the parts add up to the whole, within the clock's rounding
        parts = run["text_encode_s"] + run["denoise_s"] + run["decode_s"]
        assert abs(parts - run["total_s"]) < 0.05 and run["steps_computed"] <= run["steps"]
        assert run["untimed_warmup_step_s"] > 0  # the compiler's step is timed apart, outside total_s
    assert runs["fast_81"]["mask"] == "window:2" and runs["fast_81"]["step_cache"]["threshold"] == 0.2
    assert 0 < runs["fast_81"]["rel_err_vs_exact"] < 1  # approximate: not bitwise, not unrelated
    assert isinstance(runs["fast_81"]["step_cache_signal"], dict)  # what the skipper saw (empty for first-block)
    assert "step_cache_signal" not in runs["exact_81"]
    assert runs["window_161"]["frames"] > runs["exact_81"]["frames"]
    assert runs["window_161_frame"]["mask"] == "window:2:frame"


def test_bench_15_refuses_a_bad_window_spec_and_compiled_only_without_compile_before_building_the_model(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = str(ROOT / "benchmarks" / "bench_15.py")
    refusals = (
        (["--windows", "window:x"], "window"),
        (["--compiled-only"], "--compiled-only needs"),
        (["--compile", "--no-reference"], "--no-reference needs"),
    )
    for extra, expected in refusals:
        done = subprocess.run([sys.executable, script, "--smoke", *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode != 0 and expected in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "bench_15.json").exists()  # nothing was run, nothing written


def test_whole_video_benchmark_holds_latents_saved_by_another_process_against_its_exact_video(tmp_path):
    script = str(ROOT / "benchmarks" / "bench_video_15.py")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def bench(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, "--smoke", *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    refused = bench("--runs", "fast_81", "--compare", str(tmp_path / "latents_fast_81.safetensors"))
    assert refused.returncode != 0 and "--compare needs exact_81" in refused.stderr
    missing = bench("--runs", "exact_81", "--compare", str(tmp_path / "nowhere.safetensors"))
    assert missing.returncode != 0 and "is not a file" in missing.stderr + missing.stdout
    # one process: both runs, the approximate one's error computed in place
    done = bench("--runs", "exact_81", "fast_81", "--json", "together.json")
    assert done.returncode == 0, done.stderr[-3000:]
    in_place = json.loads((tmp_path / "together.json").read_text())["runs"]["fast_81"]["rel_err_vs_exact"]
    # two processes: the approximate run saves its latents, the exact one decodes and compares them
    done = bench("--runs", "fast_81", "--save-latents", "--json", "first.json")
    assert done.returncode == 0, done.stderr[-3000:]
    saved = tmp_path / "latents_fast_81.safetensors"
    assert saved.is_file()
    done = bench("--runs", "exact_81", "--compare", str(saved), "--json", "second.json")
    assert done.returncode == 0, done.stderr[-3000:]
    compared = json.loads((tmp_path / "second.json").read_text())["compared"]
    assert compared["fast_81"]["rel_err_vs_exact"] == pytest.approx(in_place, rel=1e-4, abs=1e-6)
