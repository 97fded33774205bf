"""torchrun's environment -> the process group and this rank's device (for scripts and the CLI).

torchrun (``torchrun --nproc_per_node N [--nnodes M --node_rank K --master_addr ...] script``) sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`init_distributed` reads
them, sets the CUDA device to ``cuda:LOCAL_RANK`` and initialises the default process group (NCCL on
CUDA, gloo on the CPU) with a timeout, so that a rank that dies or hangs stops the others with an
error after at most that long instead of never (NCCL's watchdog aborts a collective past it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from diffsynth_cog.parallel.layout import ParallelError

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Waiting for another rank's download or file check is not a hang: a day.
SLOW_STEP_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch (world 1: not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(device: str = "cuda", timeout: timedelta = timedelta(minutes=10)) -> Launch:
    """Joins the torchrun launch (if any): returns this rank's place and device (``cuda:LOCAL_RANK``).

    Without torchrun's variables, or with ``WORLD_SIZE=1``, nothing is initialised and ``device`` is
    returned unchanged. ``timeout``: how long a collective may wait for the other ranks.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Launch(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ParallelError(f"rank {rank}: --device {device} but CUDA is not available on this host")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ParallelError(
                f"rank {rank} has LOCAL_RANK {local_rank} but this host has {count} CUDA devices: "
                f"start at most {count} processes per node (torchrun --nproc_per_node {count})"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": torch.device(device)} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    logger.info("rank %d of %d (%s, %s, collective timeout %s)", rank, world, device, backend, timeout)
    return Launch(rank=rank, world=world, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    """Destroys this process's process groups (if any) before it exits. A rank that finishes early (a prompt batch
    whose jobs ran out) then leaves cleanly while the others go on; without it the interpreter can abort at exit
    with the groups' threads still running, and torchrun stops every other rank."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _statuses(group: dist.ProcessGroup, error: str | None) -> list[str | None]:
    gathered: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, error, group=group)
    return gathered


def main_rank_first(fn: Callable[[], T]) -> T:
    """Runs ``fn`` on rank 0 first, then on each other host's first rank, then on every other rank (e.g. a
    download: the first run fetches, the later ones find the files). A failure anywhere stops every rank.
    Outside a distributed run, simply ``fn()``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    group = dist.new_group(backend="gloo", timeout=SLOW_STEP_TIMEOUT)  # CPU-side, patient
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    phases = (rank == 0, rank != 0 and local_rank == 0, local_rank != 0)
    result: T | None = None
    for mine in phases:
        error = None
        if mine:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - every rank must learn of it, so none waits forever
                error = f"rank {rank}: {type(e).__name__}: {e}"
        failed = [s for s in _statuses(group, error) if s is not None]
        if failed:
            raise ParallelError("; ".join(failed))
    return result  # type: ignore[return-value]
