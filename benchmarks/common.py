"""Shared pieces of the side-by-side benchmarks: timing with CUDA events, FLOP counts, reporting."""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffsynth_cog.io.atomic import write_json_atomic


def timed(fn: Callable[[], Any], warmup: int = 1, repeat: int = 3) -> dict[str, float]:
    """Median and min seconds of ``fn`` over ``repeat`` runs after ``warmup`` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": repeat}


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def reset_peak() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def dit_flops(n_params: int, tokens: int, inner_dim: int, layers: int, batch: int) -> float:
    """Forward FLOPs: 2 per parameter per token for the linears, 4*L^2*D per layer for attention."""
    return batch * (2 * n_params * tokens + 4 * tokens * tokens * inner_dim * layers)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def environment() -> dict[str, Any]:
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def out_dir() -> Path:
    """Where a benchmark writes its results: $OUT on the device (they come back), else the working folder."""
    return Path(os.environ.get("OUT", "."))


def write_json(name: str, data: dict[str, Any]) -> Path:
    return write_json_atomic(out_dir() / name, data)


def kernel_times(prof: Any, groups: Sequence[tuple[str, Sequence[str]]], top: int = 15) -> dict[str, Any]:
    """CUDA kernel time of a finished ``torch.profiler.profile``, grouped by the first group whose
    keys occur in the kernel's name (else "elementwise/other"), plus the ``top`` kernels by time."""
    totals: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if evt.device_type != torch.autograd.DeviceType.CUDA or not cuda_us:
            continue
        lower = evt.key.lower()
        group = next((g for g, keys in groups if any(k in lower for k in keys)), "elementwise/other")
        totals[group] += cuda_us / 1e6
        kernels[evt.key] += cuda_us / 1e6
    total = sum(totals.values())
    return {
        "gpu_time_s": round(total, 3),
        "groups_s": {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
        "groups_share": {k: round(v / total, 3) for k, v in totals.items()} if total else {},
        "top_kernels_s": {k[:140]: round(v, 3) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]},
    }
