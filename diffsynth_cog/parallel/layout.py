"""How the ranks of a distributed run share the work: the layout and its process groups.

A run of ``world`` ranks is cut into ``groups`` independent groups (each generates its own
videos, e.g. different prompts of a batch); inside a group the ranks share every denoising step:

  * ``windows``: the temporal windows of a step (``denoise.windows``) spread over window groups, each running a
    contiguous share of them (``parallel.windows``); every window group holds the dimensions below, which share
    each DiT call:
  * ``cfg``: the guidance halves (unconditional / conditional batch rows) on separate ranks;
  * ``ring`` x ``ulysses``: the flattened ``[text, video]`` token sequence, cut into
    ``ring * ulysses`` contiguous shards. Ulysses ranks exchange heads for tokens (all-to-all), so
    each attends over a whole ring shard with ``heads / ulysses`` heads; ring ranks pass keys and
    values around (ring attention).

Ranks are numbered group-major, then window group, then CFG half, then ring, then Ulysses (innermost), so the
ranks of a Ulysses group, which exchange the most data, are neighbours (the same host, NVLink), and the window
groups, which exchange once a step, are farthest apart:
``rank = (((group * windows + window) * cfg + half) * ring + ring_rank) * ulysses + ulysses_rank``.

The dimensions are named once, in :data:`AXES`; coordinates, ranks, a layout's name, its checks and the
process groups (``parallel.mesh``) are derived from that table.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from diffsynth_cog.errors import DiffSynthCogError
from diffsynth_cog.validators import POSITIVE_INT, divisor_of, divisors


class ParallelError(DiffSynthCogError, ValueError):
    """A distributed run cannot go on: a bad layout, ranks that disagree, or a rank that is gone."""


@dataclass(frozen=True)
class Axis:
    """One dimension of a layout: its degree (a :class:`ParallelLayout` field), the matching coordinate (a
    :class:`RankCoords` field), the keyword of :meth:`ParallelLayout.resolve` that sets it and, for the
    dimensions that share one generation, its place in a layout's name (None: not named)."""

    degree: str
    coord: str
    keyword: str
    name_order: int | None


# The dimensions, outermost first: ranks are numbered along them like digits (the last one varies fastest),
# ``rank = (((group * windows + window) * cfg + half) * ring + ring_rank) * ulysses + ulysses_rank``. A new
# dimension is one line here, one degree field of ParallelLayout and one coordinate field of RankCoords.
AXES: tuple[Axis, ...] = (
    Axis("groups", "group", "group_size", None),
    Axis("windows", "window", "window_degree", 0),
    Axis("cfg", "half", "cfg_parallel", 1),
    Axis("ring", "ring", "ring_degree", 3),
    Axis("ulysses", "ulysses", "ulysses_degree", 2),
)
AXIS_BY_COORD = {axis.coord: axis for axis in AXES}
SHARING_AXES = tuple(a for a in AXES if a.name_order is not None)  # the dimensions inside one generation
SEQUENCE_COORDS = ("ring", "ulysses")  # the coordinates that cut the token sequence
CALL_COORDS = ("half", *SEQUENCE_COORDS)  # the coordinates that share one DiT call (inside a window group)


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits in a :class:`ParallelLayout` (one field per :data:`AXES` coordinate)."""

    group: int
    window: int  # window group
    half: int  # CFG half
    ring: int
    ulysses: int


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of a distributed run: ``groups x windows x cfg x ring x ulysses`` ranks (see the module docstring)."""

    cfg: int = 1
    ring: int = 1
    ulysses: int = 1
    groups: int = 1
    windows: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            POSITIVE_INT.require(f"parallel degree {axis.degree}", getattr(self, axis.degree), ParallelError)

    def degree(self, coord: str) -> int:
        """The degree of the dimension whose coordinate is ``coord`` (e.g. ``"half"`` -> ``cfg``)."""
        return getattr(self, AXIS_BY_COORD[coord].degree)

    @property
    def sequence(self) -> int:
        """Ranks sharing the token sequence of one call (ring x Ulysses)."""
        return math.prod(self.degree(c) for c in SEQUENCE_COORDS)

    @property
    def call_size(self) -> int:
        """Ranks sharing one DiT call (CFG halves x ring x Ulysses): one window group."""
        return math.prod(self.degree(c) for c in CALL_COORDS)

    @property
    def group_size(self) -> int:
        """Ranks sharing one generation."""
        return math.prod(getattr(self, a.degree) for a in SHARING_AXES)

    @property
    def world(self) -> int:
        return math.prod(getattr(self, a.degree) for a in AXES)

    def name(self) -> str:
        """E.g. ``cfg2xulysses2``, ``windows2xcfg2``, ``ring2``, ``single``; with groups, ``2 groups of cfg2``."""
        named = sorted(SHARING_AXES, key=lambda a: a.name_order)
        inner = "x".join(f"{a.degree}{getattr(self, a.degree)}" for a in named if getattr(self, a.degree) > 1)
        inner = inner or "single"
        return inner if self.groups == 1 else f"{self.groups} groups of {inner}"

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world:
            raise ParallelError(f"rank {rank} is outside this layout's {self.world} ranks")
        coords = {}
        for axis in reversed(AXES):  # the innermost dimension is the last digit
            rank, coords[axis.coord] = divmod(rank, getattr(self, axis.degree))
        return RankCoords(**coords)

    def rank(self, coords: RankCoords) -> int:
        rank = 0
        for axis in AXES:
            rank = rank * getattr(self, axis.degree) + getattr(coords, axis.coord)
        return rank

    def ranks(self, rank: int, *, vary: tuple[str, ...]) -> list[int]:
        """The ranks that differ from ``rank`` only in the coordinates named in ``vary`` (sorted)."""
        out = [self.coords(rank)]
        for coord in vary:
            out = [dataclasses.replace(c, **{coord: i}) for c in out for i in range(self.degree(coord))]
        return sorted(self.rank(c) for c in out)

    def check_heads(self, num_heads: int) -> None:
        """Ulysses gives each rank ``num_heads / ulysses`` whole heads."""
        if num_heads % self.ulysses:
            raise ParallelError(
                f"ulysses degree {self.ulysses} does not divide the DiT's {num_heads} attention heads; "
                f"valid Ulysses degrees: {divisors(num_heads)} (use ring attention for the rest, e.g. ulysses x ring)"
            )

    @classmethod
    def resolve(
        cls,
        world: int,
        *,
        cfg_parallel: bool = True,
        ulysses_degree: int | None = None,
        ring_degree: int = 1,
        group_size: int | None = None,
        num_heads: int | None = None,
        window_degree: int = 1,
    ) -> ParallelLayout:
        """The layout for ``world`` ranks: groups of ``group_size`` ranks (None: one group of all),
        each with ``window_degree`` window groups (a share of every step's temporal windows each; the call
        must then use windows), and in each of those CFG 2 if ``cfg_parallel``, ``ring_degree`` and
        ``ulysses_degree`` (None: the ranks that are left). Checks that the degrees multiply to the group
        size and divide the heads."""
        group_size = world if group_size is None else group_size
        divisor_of(world, f"the world size {world}").require("group size", group_size, ParallelError)
        asked = {"windows": window_degree, "cfg": 2 if cfg_parallel else 1, "ring": ring_degree}
        asked["ulysses"] = ulysses_degree
        for axis in SHARING_AXES:
            if asked[axis.degree] is not None:
                POSITIVE_INT.or_none().require(axis.keyword, asked[axis.degree], ParallelError)
        degrees = _fill_the_rest(asked, group_size, world)
        layout = cls(**degrees, groups=world // group_size)
        if num_heads is not None:
            layout.check_heads(num_heads)
        return layout

    @classmethod
    def from_options(
        cls,
        world: int,
        *,
        cfg_parallel: bool | str = "auto",
        ulysses: int | None = None,
        ring: int = 1,
        group_size: int | None = None,
        batch: bool = False,
        guided: bool = True,
        windows: int | str = 1,
        windows_per_step: int = 1,
    ) -> ParallelLayout:
        """The layout a command line asks for: ``cfg_parallel`` "on" / "off" / "auto" (CFG halves on separate
        ranks when a window group has an even share of ranks for them, the run is ``guided`` and the Ulysses
        degree leaves room), ``ulysses`` (None: the ranks that are left), ``ring``, ``windows`` window groups
        ("auto": :func:`auto_window_degree` for a call of ``windows_per_step`` temporal windows) and
        ``group_size`` ranks per video (None: all of them, or for a ``batch`` of prompts just the ranks the
        degrees ask for)."""
        if isinstance(cfg_parallel, str):
            if cfg_parallel not in ("auto", "on", "off"):
                raise ParallelError(f"cfg_parallel must be 'auto', 'on' or 'off'; got {cfg_parallel!r}")
            on = cfg_parallel == "on"
        else:
            on = bool(cfg_parallel)
        if windows == "auto":
            fixed = (2 if on else 1) * (ulysses or 1) * ring  # what the window groups must still hold
            ranks = group_size if group_size is not None else (fixed if batch else world)
            windows = auto_window_degree(ranks, windows_per_step, fixed=fixed)
        elif isinstance(windows, str):
            raise ParallelError(f"windows must be a number of window groups or 'auto'; got {windows!r}")
        POSITIVE_INT.require("window_degree", windows, ParallelError)
        if group_size is None:
            group_size = windows * (2 if on else 1) * (ulysses or 1) * ring if batch else world
        if cfg_parallel == "auto":
            rest, odd = divmod(group_size // windows, 2 * ring)
            on = not odd and rest >= 1 and guided and ulysses in (None, rest)
        return cls.resolve(
            world,
            cfg_parallel=on,
            ulysses_degree=ulysses,
            ring_degree=ring,
            group_size=group_size,
            window_degree=windows,
        )


# Assumed speed of a window group's ranks sharing each call (CFG halves, Ulysses, ring): each doubling of its
# ranks runs a call this much faster than twice as fast (communication; CFG 2 measured about 1.9x on H100s).
INNER_EFFICIENCY = 0.9


def auto_window_degree(ranks: int, windows_per_step: int, *, fixed: int = 1) -> int:
    """The window groups for ``ranks`` ranks per video and a step of ``windows_per_step`` temporal windows: the
    degree ``d`` (a divisor of ``ranks``, at most the windows, leaving window groups whose size ``fixed``, the
    degrees given for inside a group, divides) with the shortest estimated step, ``ceil(windows / d)`` window
    calls one after another, each shared by ``ranks / d`` ranks at :data:`INNER_EFFICIENCY` per doubling;
    ties go to more window groups (they exchange once a step, the others in every block). 1 without windows."""
    POSITIVE_INT.require("ranks", ranks, ParallelError)
    POSITIVE_INT.require("windows_per_step", windows_per_step, ParallelError)

    def step(d: int) -> float:
        inner = ranks // d
        return -(-windows_per_step // d) / (inner * INNER_EFFICIENCY ** math.log2(inner))

    fits = [d for d in divisors(ranks) if d <= windows_per_step and (ranks // d) % fixed == 0]
    return min(fits, key=lambda d: (round(step(d), 9), -d)) if fits else 1


def _fill_the_rest(asked: dict[str, int | None], group_size: int, world: int) -> dict[str, int]:
    """The degrees of one generation: those asked for, and the one left None taking the ranks that are left."""
    open_ = [name for name, value in asked.items() if value is None]
    given = {name: value for name, value in asked.items() if value is not None}
    if len(open_) > 1:
        keywords = [a.keyword for a in SHARING_AXES if a.degree in open_]
        raise ParallelError(f"only one degree can take the ranks that are left (be None); got None for {keywords}")
    if open_:
        share, rest = divmod(group_size, math.prod(given.values()))
        if rest or share < 1:
            product = _spelled(given)
            raise ParallelError(
                f"{product} does not divide the {group_size} ranks of a group; "
                + ("turn cfg_parallel off or " if given.get("cfg", 1) > 1 else "")
                + "choose ring and window degrees whose product divides the group"
            )
        given[open_[0]] = share
    total = math.prod(given.values())
    if total != group_size:
        raise ParallelError(
            f"{_spelled(given)} = {total} ranks, but a group has {group_size} (world size {world}); the "
            "degrees must multiply to the group size (ulysses_degree=None takes the ranks that are left)"
        )
    return given


def _spelled(degrees: dict[str, int]) -> str:
    """E.g. ``windows 2 x cfg 2 x ulysses 4``: the degrees in name order, those of 1 left out (all 1: ``1``)."""
    named = sorted(SHARING_AXES, key=lambda a: a.name_order)
    return " x ".join(f"{a.degree} {degrees[a.degree]}" for a in named if degrees.get(a.degree, 1) > 1) or "1"


def shard_bounds(length: int, parts: int) -> list[tuple[int, int]]:
    """``length`` items cut into ``parts`` contiguous ranges ``[start, end)`` whose sizes differ by at most
    one (the first ``length % parts`` ranges take one more); ranges may be empty when ``parts > length``."""
    base, extra = divmod(length, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds
