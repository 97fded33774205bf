"""Parallel VAE: the spatial tiles of a tiled encode or decode spread over the ranks of a generation.

The tiled VAE runs every tile on its own (``tiling.map_tiles``), so tiles can run anywhere: each rank
runs a share of them (costliest first, each to the least loaded rank), then every tile's result is
broadcast from its rank, and every rank stitches the same tiles with the same blender. The result is
the one-process tiled result, on every rank (all need the encoded latents; for a decode only the
leader uses the pixels).

A tile's cost is first its area; once tiles of a shape have run, the seconds they took (the fastest
run seen, shared by every rank of the group so all plan alike) replace the estimate. Areas
undercount small tiles (an edge tile of 10 x 18 latents keeps the GPU far from busy), so the second
call of a shape is the balanced one.

Untiled calls (``tiled=False``, or a video that fits one tile) have nothing to spread: every rank
runs the whole call itself, with the one-GPU time and memory.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from diffsynth_cog.parallel.comm import all_reduce, broadcast

# dtypes a tile result may have, by code (the header of each broadcast tile)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MAX_DIMS = 8
Shape = tuple[int, ...]


def assign_tiles(costs: Sequence[float], ranks: int) -> list[int]:
    """The rank (0..ranks-1) of each tile: costliest first, each to the least loaded rank (ties: lowest rank)."""
    load = [0.0] * ranks
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += costs[i]
    return owner


class TileTimes:
    """Seconds a tile of each input shape took (the fastest run seen); the same on every rank of a group."""

    def __init__(self) -> None:
        self.seconds: dict[Shape, float] = {}

    def costs(self, shapes: Sequence[Shape]) -> list[float]:
        """Measured seconds where every shape has run, else areas (one unit for all tiles of a call)."""
        if all(s in self.seconds for s in shapes):
            return [self.seconds[s] for s in shapes]
        return [float(math.prod(s[-2:])) for s in shapes]

    def record(self, shapes: Sequence[Shape], seconds: Sequence[float]) -> None:
        for shape, s in zip(shapes, seconds, strict=True):
            if s > 0:
                self.seconds[shape] = min(s, self.seconds.get(shape, math.inf))


class TileClock:
    """Seconds each tile took on this rank's device: CUDA events around each tile on the current stream (read
    once, after the last tile, so the host never waits between tiles), or wall time off CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[int, tuple] = {}

    @contextlib.contextmanager
    def timing(self, i: int) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.marks[i] = (start, end)
        else:
            start = time.perf_counter()
            yield
            self.marks[i] = (time.perf_counter() - start,)

    def seconds(self, n: int) -> list[float]:
        """Tile i's seconds for i < n (0 for tiles this rank did not run)."""
        if self.cuda and self.marks:
            torch.cuda.synchronize()
        out = [0.0] * n
        for i, mark in self.marks.items():
            out[i] = mark[0].elapsed_time(mark[1]) / 1000 if self.cuda else mark[0]
        return out


class SpreadTiles:
    """A ``tiling.TileRunner`` that spreads tiles over the ranks of ``group`` (global ``ranks``)."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        ranks: Sequence[int],
        rank: int,
        device: torch.device,
        times: TileTimes | None = None,
    ) -> None:
        self.group = group
        self.ranks = list(ranks)
        self.me = self.ranks.index(rank)
        self.device = device
        self.times = times if times is not None else TileTimes()

    def __call__(self, shapes: Sequence[Shape], run_one: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
        n = len(shapes)
        costs = self.times.costs(shapes)
        owner = assign_tiles(costs, len(self.ranks))
        results: list[torch.Tensor | None] = [None] * n
        # Costliest first: a launch-bound small tile then queues while a large one still computes. Nothing waits
        # for the device between tiles; the clock reads the GPU's own timestamps once all are queued.
        mine = sorted((i for i in range(n) if owner[i] == self.me), key=lambda i: (-costs[i], i))
        clock = TileClock(self.device)
        for i in mine:
            with clock.timing(i):
                results[i] = run_one(i).contiguous()
        seconds = torch.tensor(clock.seconds(n), dtype=torch.float64, device=self.device)
        for i, tile in enumerate(results):
            src = self.ranks[owner[i]]
            header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64, device=self.device)
            if tile is not None:
                header[0], header[1] = tile.ndim, _DTYPES.index(tile.dtype)
                header[2 : 2 + tile.ndim] = torch.tensor(tile.shape)
            broadcast(header, src, self.group, f"sharing VAE tile {i + 1}/{n} (shape)")
            if tile is None:
                ndim, code = int(header[0]), int(header[1])
                tile = torch.empty(header[2 : 2 + ndim].tolist(), dtype=_DTYPES[code], device=self.device)
            results[i] = broadcast(tile, src, self.group, f"sharing VAE tile {i + 1}/{n}")
        # every rank learns every tile's time (each was run by one rank), so the next plan is the same everywhere
        self.times.record(shapes, all_reduce(seconds, self.group, "sharing VAE tile times").tolist())
        return results  # type: ignore[return-value]
