"""The 1.5 training benchmark's script runs on a tiny model on the CPU, so the GPU run never finds its bugs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_15_smoke_times_the_padded_15_step_plain_and_with_the_switches(tmp_path: Path) -> None:
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_train_15.py"), "--smoke", "--steps", "1"]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_train_15_9f.json").read_text())
    # 9 frames: 3 latent frames padded to 4 = 2 temporal patches x 2 x 3 patches at 32x48.
    assert result["latent_frames"] == 4 and result["video_tokens"] == 12 and "random" in result["note"]
    runs = result["runs"]
    assert list(runs) == ["baseline", "int8+stream+adam8bit"]  # fp8 stands in as int8 on the CPU
    base, switched = runs["baseline"], runs["int8+stream+adam8bit"]
    assert switched["config"] == {"base_quantization": "int8", "activation_offload": "stream", "optimizer": "adamw8bit"}
    assert switched["step_vs_baseline"] > 0 and len(base["step_times_s"]) == 2
    # The same step on an 8-bit base: the first losses (same draws, LoRA B = 0) agree to the quantization error.
    assert abs(switched["losses"][0] - base["losses"][0]) < 1e-2 * base["losses"][0]
