"""Parallel VAE: the spatial tiles of a tiled encode or decode spread over the ranks of a generation.

The tiled VAE runs every tile on its own (``tiling.map_tiles``), so tiles can run anywhere: each rank
runs a share of them (largest first, each to the least loaded rank: the edge tiles are smaller), then
every tile's result is broadcast from its rank, and every rank stitches the same tiles with the same
blender. The result is the one-process tiled result, on every rank (all need the encoded latents;
for a decode only the leader uses the pixels).

Untiled calls (``tiled=False``, or a video that fits one tile) have nothing to spread: every rank
runs the whole call itself, with the one-GPU time and memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from diffsynth_cog.parallel.comm import broadcast

# dtypes a tile result may have, by code (the header of each broadcast tile)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MAX_DIMS = 8


def assign_tiles(costs: Sequence[int], ranks: int) -> list[int]:
    """The rank (0..ranks-1) of each tile: largest first, each to the least loaded rank (ties: lowest rank)."""
    load = [0] * ranks
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += costs[i]
    return owner


class SpreadTiles:
    """A ``tiling.TileRunner`` that spreads tiles over the ranks of ``group`` (global ``ranks``)."""

    def __init__(self, group: dist.ProcessGroup, ranks: Sequence[int], rank: int, device: torch.device) -> None:
        self.group = group
        self.ranks = list(ranks)
        self.me = self.ranks.index(rank)
        self.device = device

    def __call__(self, costs: Sequence[int], run_one: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
        owner = assign_tiles(costs, len(self.ranks))
        results: list[torch.Tensor | None] = [
            run_one(i).contiguous() if owner[i] == self.me else None for i in range(len(costs))
        ]
        for i, tile in enumerate(results):
            src = self.ranks[owner[i]]
            header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64, device=self.device)
            if tile is not None:
                header[0], header[1] = tile.ndim, _DTYPES.index(tile.dtype)
                header[2 : 2 + tile.ndim] = torch.tensor(tile.shape)
            broadcast(header, src, self.group, f"sharing VAE tile {i + 1}/{len(costs)} (shape)")
            if tile is None:
                ndim, code = int(header[0]), int(header[1])
                tile = torch.empty(header[2 : 2 + ndim].tolist(), dtype=_DTYPES[code], device=self.device)
            results[i] = broadcast(tile, src, self.group, f"sharing VAE tile {i + 1}/{len(costs)}")
        return results  # type: ignore[return-value]
