"""Starts N processes joined by a gloo process group, runs a function on each, returns what each returned.

For the CPU tests of ``diffsynth_cog.parallel``: processes are spawned (not forked: a fresh
interpreter, as torchrun starts them), meet through a file store (no ports), use one thread each,
and each writes its result (or its error) to a file. The launcher waits a bounded time and kills
only the processes it started.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch


def _entry(rank: int, world: int, folder: str, fn: Callable, args: tuple, pg_timeout: float, backend: str) -> None:
    torch.set_num_threads(1)
    out = Path(folder) / f"rank{rank}.pt"
    try:
        import torch.distributed as dist

        dist.init_process_group(
            backend,
            init_method=f"file://{folder}/store",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=pg_timeout),
        )
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        result = {"ok": fn(rank, world, *args)}
    except BaseException as e:  # noqa: BLE001 - reported to the test
        result = {"error": f"{type(e).__name__}: {e}", "type": type(e).__name__, "trace": traceback.format_exc()}
    torch.save(result, out)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def run_ranks(
    world: int,
    fn: Callable,
    folder: Path,
    *args: Any,
    timeout: float = 240.0,
    pg_timeout: float = 60.0,
    backend: str = "gloo",
) -> list[dict[str, Any]]:
    """Runs ``fn(rank, world, *args)`` on ``world`` new processes; returns each rank's ``{"ok": result}`` or
    ``{"error": ..., "type": ..., "trace": ...}`` (``{"error": "no result"}`` for a process that died)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_entry, args=(r, world, str(folder), fn, args, pg_timeout, backend)) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:  # only the processes started here, by their own handle
        p.kill()
        p.join()
    results = []
    for rank in range(world):
        path = folder / f"rank{rank}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else {"error": "no result"})
    if hung:
        raise TimeoutError(f"ranks {[procs.index(p) for p in hung]} did not finish within {timeout} s: {results}")
    return results


def ok(results: list[dict[str, Any]]) -> list[Any]:
    """The ranks' results; fails with every rank's error if any rank failed."""
    errors = [f"rank {r}: {res.get('trace', res['error'])}" for r, res in enumerate(results) if "error" in res]
    assert not errors, "\n".join(errors)
    return [res["ok"] for res in results]
