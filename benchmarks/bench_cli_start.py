"""How long the command line takes to answer what needs no model: ``--help``, ``--version``, each subcommand's
``--help``; plus, for scale, the bare interpreter and ``import torch``.

Each command is a fresh process (``python -m diffsynth_cog.cli ...``), timed wall-clock from start to exit,
``--repeat`` times after one warm-up run (so the files are in the page cache, as on a second call):

    python benchmarks/bench_cli_start.py [--repeat 5] [--all-subcommands] [--json out.json]

Needs no GPU and imports no torch itself (the reference row starts its own process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("generate", "download", "upload-lora", "info", "webui", "prepare", "train", "export-lora")
GOAL_S = 1.0  # issue 26: --help and --version under a second


def run_once(argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.decode()[-500:]}")
    return elapsed


def timed(argv: list[str], repeat: int) -> dict[str, float]:
    run_once(argv)  # warm-up: files in the page cache, bytecode compiled
    times = [run_once(argv) for _ in range(repeat)]
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": repeat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per command (default: 5)")
    parser.add_argument("--all-subcommands", action="store_true", help="time every subcommand's --help")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    cli = [sys.executable, "-m", "diffsynth_cog.cli"]
    cases = {
        "python -c pass (floor)": [sys.executable, "-c", "pass"],
        "python -c 'import torch' (what --help used to pay)": [sys.executable, "-c", "import torch"],
        "diffsynth-cog --help": [*cli, "--help"],
        "diffsynth-cog --version": [*cli, "--version"],
        "diffsynth-cog info --help": [*cli, "info", "--help"],
    }
    if args.all_subcommands:
        cases.update({f"diffsynth-cog {c} --help": [*cli, c, "--help"] for c in SUBCOMMANDS if c != "info"})
    results = {name: timed(argv, args.repeat) for name, argv in cases.items()}

    width = max(len(name) for name in results)
    print(f"{'command':<{width}}  median    min      max   (s, {args.repeat} runs)")
    for name, r in results.items():
        flag = "" if not name.startswith("diffsynth-cog") else ("  ok" if r["median_s"] < GOAL_S else "  OVER 1 s")
        print(f"{name:<{width}}  {r['median_s']:.3f}  {r['min_s']:.3f}  {r['max_s']:.3f}{flag}")
    if args.json:
        env = {
            "python": platform.python_version(),
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
        }
        Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
