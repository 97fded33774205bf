"""Spatial tiles: one planner and one blender for the VAE and the DiT.

A model that does not fit (or was not trained for) a whole frame runs on overlapping tiles: a tile
starts every ``stride`` rows / columns and spans ``tile`` (the last ones are cut at the edge), each
tile runs on its own, and the results are stitched. Stitching cross-fades every tile linearly with
its upper and left neighbours over their overlap, then keeps the tile's first ``stride`` rows and
columns; tiles are visited in raster order and blended in place, which is the reference's (diffusers')
exact arithmetic for the VAE. The DiT uses the same stitching.

Sizes are given to users in pixels (:class:`TileSpec`); each model converts them to its own input
units when it plans (:meth:`TileSpec.grid`): latent rows for the DiT and the VAE decoder, pixels for
the VAE encoder.

Where the tiles run is a separate choice: by default here, one after the other; inside
``with tiles_run_by(runner)`` a runner decides (``parallel.vae`` spreads them over the ranks of a
distributed run). The stitching is the same either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

# Default overlap (fraction of a tile, rows then columns): the values the CogVideoX release tuned for
# its 480x720 VAE tiles.
DEFAULT_TILE_OVERLAP = (1 / 6, 1 / 5)


def pair(value: float | Sequence[float], name: str) -> tuple[float, float]:
    """A number or a (rows, columns) pair -> a pair of floats."""
    if isinstance(value, int | float):
        return float(value), float(value)
    values = tuple(value)
    if len(values) != 2:
        raise ValueError(f"{name} must be a number or a (rows, columns) pair, got {value!r}")
    return float(values[0]), float(values[1])


@dataclass(frozen=True)
class TileGrid:
    """Overlapping tiles over a ``size`` = (rows, columns) input, in the input's units.

    A tile starts every ``stride`` and spans ``tile`` (cut at the edge, so the last tiles of a row or
    column may be smaller); consecutive tiles overlap by ``tile - stride``.
    """

    size: tuple[int, int]
    tile: tuple[int, int]
    stride: tuple[int, int]

    def __post_init__(self) -> None:
        for name in ("size", "tile", "stride"):
            if min(getattr(self, name)) < 1:
                raise ValueError(f"tile grid {name} {getattr(self, name)} must be positive")
        if any(s > t for s, t in zip(self.stride, self.tile, strict=True)):
            raise ValueError(f"tile stride {self.stride} must not exceed the tile size {self.tile} (gaps)")

    @classmethod
    def with_overlap(
        cls,
        size: tuple[int, int],
        tile: tuple[int, int],
        overlap: float | Sequence[float] | None = None,
        multiple: int = 1,
    ) -> TileGrid:
        """Tiles of ``tile`` overlapping by the fraction ``overlap`` (default ``DEFAULT_TILE_OVERLAP``);
        strides are rounded down to a multiple of ``multiple`` (the model's input granularity)."""
        fractions = pair(overlap if overlap is not None else DEFAULT_TILE_OVERLAP, "tile_overlap")
        if not all(0.0 <= f < 1.0 for f in fractions):
            raise ValueError(f"tile_overlap {fractions} must be fractions in [0, 1)")
        if any(t < 1 or t % multiple for t in tile):
            raise ValueError(f"tile size {tile} must be a positive multiple of {multiple}")
        stride = tuple(int(t // multiple * (1 - f)) * multiple for t, f in zip(tile, fractions, strict=True))
        if min(stride) < 1:
            raise ValueError(
                f"tile size {tile} with overlap {fractions} leaves no stride between tiles; use larger tiles"
            )
        return cls(size=size, tile=tile, stride=stride)

    @property
    def single(self) -> bool:
        """One tile covers the whole input."""
        return self.tile[0] >= self.size[0] and self.tile[1] >= self.size[1]

    def starts(self) -> tuple[list[int], list[int]]:
        """Start rows and start columns of the tiles."""
        return list(range(0, self.size[0], self.stride[0])), list(range(0, self.size[1], self.stride[1]))

    def __len__(self) -> int:
        return math.ceil(self.size[0] / self.stride[0]) * math.ceil(self.size[1] / self.stride[1])


def _mix(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a * (1 - w) + b * w`` rounded like the reference's per-column float weights: each
    product is computed in float32 (float64 for float64 data) and rounded to the data type."""
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    wa, wb = (1 - w).to(a.device, compute), w.to(a.device, compute)
    return (a.to(compute) * wa).to(a.dtype) + (b.to(compute) * wb).to(a.dtype)


def _blend_(before: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """Linear cross-fade of ``tile``'s first ``extent`` entries along ``dim`` with ``before``'s last ones, in place."""
    extent = min(before.shape[dim], tile.shape[dim], extent)
    if extent <= 0:
        return
    w = (torch.arange(extent, dtype=torch.float64) / extent).view([-1] + [1] * (tile.ndim - 1 - dim))
    head = tile.narrow(dim, 0, extent)
    head.copy_(_mix(before.narrow(dim, before.shape[dim] - extent, extent), head, w))


def stitch(tiles: list[list[torch.Tensor]], blend: tuple[int, int], keep: tuple[int, int]) -> torch.Tensor:
    """Joins a raster of result tiles [..., rows, columns] (``tiles[i][j]``, the results of the tiles of
    row i, column j): each is cross-faded over ``blend`` with its (already blended) upper and left
    neighbours, then cropped to its first ``keep`` rows / columns. Blends in place."""
    for i, row in enumerate(tiles):
        for j, out in enumerate(row):
            if i > 0:
                _blend_(tiles[i - 1][j], out, blend[0], out.ndim - 2)
            if j > 0:
                _blend_(row[j - 1], out, blend[1], out.ndim - 1)
    return torch.cat([torch.cat([out[..., : keep[0], : keep[1]] for out in row], dim=-1) for row in tiles], dim=-2)


TileRunner = Callable[[Sequence[tuple[int, ...]], Callable[[int], torch.Tensor]], list[torch.Tensor]]
"""Runs the tiles of one :func:`map_tiles` call: ``runner(shapes, run_one)`` -> the results of tiles
0..n-1 (raster order), where ``run_one(i)`` computes tile i and ``shapes[i]`` is the shape of its input
(tiles of equal shape cost the same; the last two sizes are its rows and columns)."""

_tile_runner: contextvars.ContextVar[TileRunner | None] = contextvars.ContextVar("tile_runner", default=None)


@contextlib.contextmanager
def tiles_run_by(runner: TileRunner | None) -> Iterator[None]:
    """Every :func:`map_tiles` inside the block hands its tiles to ``runner`` (e.g. one that spreads them
    over the ranks of a distributed run); None = run them here, one after the other (the default)."""
    token = _tile_runner.set(runner)
    try:
        yield
    finally:
        _tile_runner.reset(token)


def map_tiles(
    x: torch.Tensor,
    grid: TileGrid,
    run: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor],
    scale: Fraction | int = 1,
) -> torch.Tensor:
    """``run`` over the tiles of x [..., rows, columns], stitched.

    ``run(tile, (row, col))`` gets each tile and its start, and returns a result whose last two sizes
    are the tile's times ``scale`` (8 for a VAE decoder, 1/8 for its encoder, 1 for the DiT).
    """
    if tuple(x.shape[-2:]) != grid.size:
        raise ValueError(f"input of {tuple(x.shape[-2:])} rows x columns does not match the tile grid's {grid.size}")
    rows, cols = grid.starts()
    th, tw = grid.tile
    starts = [(r, c) for r in rows for c in cols]

    def run_one(i: int) -> torch.Tensor:
        r, c = starts[i]
        return run(x[..., r : r + th, c : c + tw], (r, c))

    runner = _tile_runner.get()
    if runner is None:
        flat = [run_one(i) for i in range(len(starts))]
    else:
        lead = tuple(x.shape[:-2])
        flat = runner([(*lead, min(th, grid.size[0] - r), min(tw, grid.size[1] - c)) for r, c in starts], run_one)
    results = [flat[i * len(cols) : (i + 1) * len(cols)] for i in range(len(rows))]
    scale = Fraction(scale)
    blend = tuple(int((t - s) * scale) for t, s in zip(grid.tile, grid.stride, strict=True))
    keep = tuple(int(s * scale) for s in grid.stride)
    return stitch(results, blend, keep)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TileSpec:
    """Tiles as users give them: ``size`` in pixels (rows, columns) and ``overlap`` as a fraction of a tile."""

    size: tuple[int, int]
    overlap: tuple[float, float] = DEFAULT_TILE_OVERLAP

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in pair(self.size, "tile size"))
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "overlap", pair(self.overlap, "tile_overlap"))
        if min(size) < 1:
            raise ValueError(f"tile size {size} px must be positive")
        if not all(0.0 <= f < 1.0 for f in self.overlap):
            raise ValueError(f"tile_overlap {self.overlap} must be fractions in [0, 1)")

    def grid(self, size: tuple[int, int], pixels_per_unit: int, multiple: int = 1) -> TileGrid:
        """The grid over an input of ``size`` (its own units, ``pixels_per_unit`` pixels each); tile sizes
        and strides are multiples of ``multiple`` units."""
        tile = tuple(t // pixels_per_unit for t in self.size)
        if any(t * pixels_per_unit != p or t % multiple or t < multiple for t, p in zip(tile, self.size, strict=True)):
            raise ValueError(
                f"tile size {self.size} px must be a positive multiple of {pixels_per_unit * multiple} px "
                f"({multiple} input unit(s) of {pixels_per_unit} px)"
            )
        return TileGrid.with_overlap(size, tile, self.overlap, multiple)  # type: ignore[arg-type]
