"""Long-clip LoRA training steps: the sequence split over GPUs, and sparse against dense attention.

Launch with torchrun (one process per GPU); every measurement goes through the trainer's own module
(``CogLoRAModule``: frozen bf16 base, fp32 LoRA rank 64 on all eight block layers, gradient
checkpointing, AdamW, clipping 1.0) on random weights at the 5B config, batch 1, 480x720::

    torchrun --nproc_per_node 2 benchmarks/bench_train_sp.py --mode sp       # 257 f on 1 GPU, then split on 2
    torchrun --nproc_per_node 2 benchmarks/bench_train_sp.py --mode sparse   # 129 f and 257 f, dense vs sparse
    torchrun --nproc_per_node 2 benchmarks/bench_train_sp.py --tiny          # CPU (gloo) smoke run of both

Modes (``--mode``, both by default; each writes its JSON into $OUT from rank 0):

* ``sp``: a ``--sp-frames`` (257) step on one GPU (rank 0 alone, the other ranks wait), then the same step
  with ``sequence_parallel`` = every rank (Ulysses: each GPU holds 1/N of the tokens); step time per
  rank, peak memory per GPU, the speed-up (goal: >= 1.85 on 2 GPUs) and the loss of each rank (equal: all
  ranks train the same sample). ``--sp-attention`` runs both under a mask. Written: bench_train_sp.json.
* ``sparse``: steps at each of ``--sparse-frames`` (129 257), dense and under each ``--sparse`` mask (radial
  and window:2), on one GPU each; the jobs are spread over the ranks (job i on rank i mod N, every job alone on its GPU; the
  GPU of each is recorded; ``--one-gpu`` runs them all on rank 0). Goal: sparse <= 0.5 x dense at 257 f.
  Written: bench_train_sparse.json.

Timing: ``--steps`` timed optimizer steps after one warm-up step (kernels, FlexAttention's compilation,
optimizer states); the median is reported. A 257 f dense step on one H100 takes about a minute: run the
two modes as two invocations to stay within a 10-minute command limit.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import LAYOUTS, TINY, build, latent_batch, release, sync  # noqa: E402
from common import write_json  # noqa: E402

from diffsynth_cog.configs import DiTConfig, dit_preset  # noqa: E402
from diffsynth_cog.parallel.launch import init_distributed, shutdown_distributed  # noqa: E402
from diffsynth_cog.training.module import CogLoRAModule  # noqa: E402

logger = logging.getLogger("bench_train_sp")

SPEEDUP_GOAL = 1.85  # 257 f on 2 GPUs vs 1
SPARSE_GOAL = 0.5  # sparse step / dense step at 257 f


def measure(
    dit_config: DiTConfig, device: torch.device, args: argparse.Namespace, frames: int, **changes: Any
) -> dict[str, Any]:
    """One training configuration: build, one warm-up step, ``args.steps`` timed steps."""
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    module, optimizer, params = build(dit_config, "baseline", args.layout, device, args.lr, **changes)
    reduce = changes.get("sequence_parallel", 1) > 1
    sync(device)
    built_s = time.perf_counter() - start
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = latent_batch(dit_config, frames, args.height, args.width, device, dtype)
    times, losses, norms = [], [], []
    for i in range(1 + args.steps):
        sync(device)
        t0 = time.perf_counter()
        loss, norm = train_step(module, optimizer, params, batch, i, reduce)
        losses.append(loss)
        norms.append(norm)
        sync(device)
        times.append(time.perf_counter() - t0)
    result: dict[str, Any] = {
        "config": changes,
        "frames": frames,
        "tokens": tokens_of(dit_config, frames, args),
        "parts": module.denoiser.parts(),
        "build_s": round(built_s, 2),
        "step_times_s": [round(t, 3) for t in times],
        "median_step_s": round(statistics.median(times[1:]), 3),
        "losses": [round(v, 5) for v in losses],
        "grad_norms": [float(f"{v:.6g}") for v in norms],
    }
    if device.type == "cuda":
        result["gpu"] = str(device)
        result["peak_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_reserved_GiB"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    del module, optimizer, params
    release(device)
    return result


def train_step(
    module: CogLoRAModule, optimizer: torch.optim.Optimizer, params: list, batch: dict, step: int, reduce: bool
) -> tuple[float, float]:
    """One optimizer step; (loss, gradient norm before clipping). ``reduce``: as the strategies run it over
    several ranks, with the mean of the LoRA gradients over all ranks (DDP's all-reduce; see
    ``training/sequence.py`` for why that is the right reduction of a sequence split)."""
    loss = module.batch_loss(batch, step=step)
    loss.backward()
    world = dist.get_world_size()
    if reduce and world > 1:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= world
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad.copy_(g.view_as(p))
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss), float(norm)


def tokens_of(dit_config: DiTConfig, frames: int, args: argparse.Namespace) -> int:
    t = (frames - 1) // dit_config.temporal_compression_ratio + 1
    p = dit_config.patch_size
    return t * (args.height // 8 // p) * (args.width // 8 // p) + dit_config.max_text_seq_length


def gathered(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (on every rank)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# --------------------------------------------------------------------------------------------- modes
def run_sp(args: argparse.Namespace, dit_config: DiTConfig, device: torch.device, env: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    attention = {"attention": args.sp_attention} if args.sp_attention else {}
    result: dict[str, Any] = {**env, "mode": "sp", "frames": args.sp_frames, "ranks": world, "layout": args.layout}
    single = measure(dit_config, device, args, args.sp_frames, **attention) if rank == 0 else None
    dist.barrier()
    result["one_gpu"] = single
    if rank == 0:
        logger.info("sp: one GPU %s", single)
        write_json(args.prefix + "_sp.json", result)
    split = measure(dit_config, device, args, args.sp_frames, sequence_parallel=world, devices=world, **attention)
    per_rank = gathered(split)
    if rank == 0:
        result["split"] = per_rank
        slowest = max(r["median_step_s"] for r in per_rank)
        result["speedup"] = round(single["median_step_s"] / slowest, 3)
        result["losses_equal_on_ranks"] = all(r["losses"] == per_rank[0]["losses"] for r in per_rank)
        if device.type == "cuda":
            result["peak_GiB_per_gpu"] = [r["peak_GiB"] for r in per_rank]
            if world == 2 and args.sp_frames == 257 and not args.tiny:
                result["goal_speedup_ge_1.85"] = result["speedup"] >= SPEEDUP_GOAL
        logger.info("sp: split over %d ranks %s; speed-up %.3f", world, per_rank, result["speedup"])
        write_json(args.prefix + "_sp.json", result)
    return result


def run_sparse(args: argparse.Namespace, dit_config: DiTConfig, device: torch.device, env: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    jobs = [(frames, attention) for frames in args.sparse_frames for attention in (None, *args.sparse)]
    mine = {}
    for i, (frames, attention) in enumerate(jobs):
        owner = 0 if args.one_gpu else i % world
        if owner == rank:
            changes = {"attention": attention} if attention else {}
            mine[i] = {**measure(dit_config, device, args, frames, **changes), "rank": rank}
            logger.info("sparse: rank %d, %d frames, %s: %s", rank, frames, attention or "dense", mine[i])
    runs: dict[int, Any] = {}
    for part in gathered(mine):
        runs.update(part)
    result: dict[str, Any] = {**env, "mode": "sparse", "sparse": args.sparse, "layout": args.layout, "runs": {}}
    for frames in args.sparse_frames:
        dense = runs[jobs.index((frames, None))]
        sparse = {spec: runs[jobs.index((frames, spec))] for spec in args.sparse}
        ratios = {spec: round(run["median_step_s"] / dense["median_step_s"], 3) for spec, run in sparse.items()}
        entry = {"dense": dense, "sparse": sparse, "sparse_vs_dense": ratios}
        if frames == 257 and device.type == "cuda" and not args.tiny:
            entry["goal_sparse_le_0.5x"] = {spec: ratio <= SPARSE_GOAL for spec, ratio in ratios.items()}
        result["runs"][str(frames)] = entry
    if rank == 0:
        write_json(args.prefix + "_sparse.json", result)
    return result


MODES = {"sp": run_sp, "sparse": run_sparse}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", nargs="+", choices=sorted(MODES), default=["sp", "sparse"])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="r64_all8")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--steps", type=int, default=1, help="timed steps (after one warm-up step)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--sp-frames", type=int, default=257)
    parser.add_argument("--sp-attention", default=None, help="a mask for both sp runs (default: dense)")
    parser.add_argument("--sparse-frames", type=int, nargs="+", default=[129, 257])
    parser.add_argument(
        "--sparse", nargs="+", default=["radial", "window:2"], help="masks of the sparse runs (sparse_attention specs)"
    )
    parser.add_argument("--one-gpu", action="store_true", help="sparse mode: every job on rank 0")
    parser.add_argument("--tiny", action="store_true", help="CPU (gloo) smoke run at a tiny size")
    parser.add_argument("--prefix", default="bench_train", help="output names: PREFIX_sp.json, PREFIX_sparse.json")
    parser.add_argument("--timeout-min", type=float, default=30.0, help="how long a rank waits for the others")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    if args.tiny:
        device_name = "cpu"
        dit_config = DiTConfig.from_dict(TINY)
        args.height, args.width = 32, 48
        args.lr = 1e-2  # steps that move the tiny LoRA: the runs' later losses then check the gradient reduction
        args.sp_frames = 17 if args.sp_frames == 257 else args.sp_frames  # 5 latent frames: 6x2x3 + 7 = 37 tokens
        args.sparse_frames = [9, 17] if args.sparse_frames == [129, 257] else args.sparse_frames
        if args.sparse == ["radial", "window:2"]:  # block masks are dense at a tiny size (one 128-token block)
            args.sparse = ["window:1:token", "radial:token"]
        LAYOUTS[args.layout] = {t: (4, 4.0) for t in LAYOUTS[args.layout]}
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny for the CPU smoke run")
        device_name = "cuda"
        dit_config = dit_preset("cogvideox-5b")
    launch = init_distributed(device_name, timedelta(minutes=args.timeout_min))
    if not dist.is_initialized():  # one process: a group of one, so that every mode runs the same code
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        backend = "nccl" if device_name == "cuda" else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1, timeout=timedelta(minutes=args.timeout_min))
    device = torch.device(launch.device)
    if launch.is_main:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if device.type == "cuda":
        env = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    else:
        env = {"device": "cpu (tiny smoke run)", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    results = {}
    try:
        for mode in args.mode:
            results[mode] = MODES[mode](args, dit_config, device, env)
    finally:
        shutdown_distributed()  # else a rank can abort at exit with the group's threads running
    return results


if __name__ == "__main__":
    main()
