"""How the ranks of a distributed run share the work: the layout and its process groups.

A run of ``world`` ranks is cut into ``groups`` independent groups (each generates its own
videos, e.g. different prompts of a batch); inside a group the ranks share every DiT call:

  * ``cfg``: the guidance halves (unconditional / conditional batch rows) on separate ranks;
  * ``ring`` x ``ulysses``: the flattened ``[text, video]`` token sequence, cut into
    ``ring * ulysses`` contiguous shards. Ulysses ranks exchange heads for tokens (all-to-all), so
    each attends over a whole ring shard with ``heads / ulysses`` heads; ring ranks pass keys and
    values around (ring attention).

Ranks are numbered group-major, then CFG half, then ring, then Ulysses (innermost), so the ranks of
a Ulysses group, which exchange the most data, are neighbours (the same host, NVLink):
``rank = ((group * cfg + half) * ring + ring_rank) * ulysses + ulysses_rank``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from diffsynth_cog.errors import DiffSynthCogError


class ParallelError(DiffSynthCogError, ValueError):
    """A distributed run cannot go on: a bad layout, ranks that disagree, or a rank that is gone."""


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits in a :class:`ParallelLayout`."""

    group: int
    half: int  # CFG half
    ring: int
    ulysses: int


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of a distributed run: ``groups x cfg x ring x ulysses`` ranks (see the module docstring)."""

    cfg: int = 1
    ring: int = 1
    ulysses: int = 1
    groups: int = 1

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParallelError(f"parallel degree {field.name} must be an integer >= 1; got {value!r}")

    @property
    def sequence(self) -> int:
        """Ranks sharing the token sequence of one call (ring x Ulysses)."""
        return self.ring * self.ulysses

    @property
    def group_size(self) -> int:
        """Ranks sharing one generation."""
        return self.cfg * self.sequence

    @property
    def world(self) -> int:
        return self.groups * self.group_size

    def name(self) -> str:
        """E.g. ``cfg2xulysses2``, ``ring2``, ``single``; with groups, ``2 groups of cfg2``."""
        parts = [f"{k}{v}" for k, v in (("cfg", self.cfg), ("ulysses", self.ulysses), ("ring", self.ring)) if v > 1]
        inner = "x".join(parts) or "single"
        return inner if self.groups == 1 else f"{self.groups} groups of {inner}"

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world:
            raise ParallelError(f"rank {rank} is outside this layout's {self.world} ranks")
        rank, ulysses = divmod(rank, self.ulysses)
        rank, ring = divmod(rank, self.ring)
        group, half = divmod(rank, self.cfg)
        return RankCoords(group=group, half=half, ring=ring, ulysses=ulysses)

    def rank(self, coords: RankCoords) -> int:
        return ((coords.group * self.cfg + coords.half) * self.ring + coords.ring) * self.ulysses + coords.ulysses

    def ranks(self, rank: int, *, vary: tuple[str, ...]) -> list[int]:
        """The ranks that differ from ``rank`` only in the coordinates named in ``vary`` (sorted)."""
        here = self.coords(rank)
        sizes = {"group": self.groups, "half": self.cfg, "ring": self.ring, "ulysses": self.ulysses}
        out = [here]
        for name in vary:
            out = [dataclasses.replace(c, **{name: i}) for c in out for i in range(sizes[name])]
        return sorted(self.rank(c) for c in out)

    def check_heads(self, num_heads: int) -> None:
        """Ulysses gives each rank ``num_heads / ulysses`` whole heads."""
        if num_heads % self.ulysses:
            valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ParallelError(
                f"ulysses degree {self.ulysses} does not divide the DiT's {num_heads} attention heads; "
                f"valid Ulysses degrees: {valid} (use ring attention for the rest, e.g. ulysses x ring)"
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
    ) -> ParallelLayout:
        """The layout for ``world`` ranks: groups of ``group_size`` ranks (None: one group of all),
        each with CFG 2 if ``cfg_parallel``, ``ring_degree`` and ``ulysses_degree`` (None: the ranks
        that are left). Checks that the degrees multiply to the group size and divide the heads."""
        group_size = world if group_size is None else group_size
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or world % group_size:
            raise ParallelError(
                f"group size {group_size!r} must be a positive divisor of the world size {world} "
                f"(valid: {[d for d in range(1, world + 1) if world % d == 0]})"
            )
        cfg = 2 if cfg_parallel else 1
        for name, value in (("ring_degree", ring_degree), ("ulysses_degree", ulysses_degree)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ParallelError(f"{name} must be an integer >= 1 or None; got {value!r}")
        if ulysses_degree is None:
            ulysses_degree, rest = divmod(group_size, cfg * ring_degree)
            if rest or ulysses_degree < 1:
                raise ParallelError(
                    f"cfg {cfg} x ring {ring_degree} does not divide the {group_size} ranks of a group; "
                    + ("turn cfg_parallel off or " if cfg > 1 else "")
                    + "choose a ring degree that divides the group"
                )
        if cfg * ring_degree * ulysses_degree != group_size:
            raise ParallelError(
                f"cfg {cfg} x ulysses {ulysses_degree} x ring {ring_degree} = {cfg * ring_degree * ulysses_degree} "
                f"ranks, but a group has {group_size} (world size {world}); the degrees must multiply to the "
                "group size (ulysses_degree=None takes the ranks that are left)"
            )
        layout = cls(cfg=cfg, ring=ring_degree, ulysses=ulysses_degree, groups=world // group_size)
        if num_heads is not None:
            layout.check_heads(num_heads)
        return layout


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
