"""The process groups of a :class:`~diffsynth_cog.parallel.layout.ParallelLayout`, built once per run.

``torch.distributed.new_group`` is collective over the whole world (every rank creates every group,
in the same order), so :func:`build_mesh` must be called by all ranks together; each keeps the
groups it belongs to. Groups of one rank are left out (None): nothing to exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from diffsynth_cog.parallel.layout import (
    CALL_COORDS,
    SEQUENCE_COORDS,
    SHARING_AXES,
    ParallelError,
    ParallelLayout,
    RankCoords,
)

# The process groups a rank may belong to, by the coordinates their ranks differ in.
GROUP_KINDS: dict[str, tuple[str, ...]] = {
    "generation": tuple(axis.coord for axis in SHARING_AXES),
    "sequence": SEQUENCE_COORDS,
    "ulysses": ("ulysses",),
    "ring": ("ring",),
    "call": CALL_COORDS,
    "windows": ("window",),
}
# Kinds that take the group of an earlier kind with the same ranks (no second communicator): without window
# groups the call group is the generation group.
REUSING_KINDS = ("call", "windows")


@dataclass(frozen=True, eq=False)
class ProcessMesh:
    """This rank's place in the layout and its process groups.

    generation: the ranks sharing one generation (window groups x CFG halves x sequence shards), in rank order;
    sequence: the ranks sharing the tokens of one CFG half; ulysses / ring: the sub-groups of ``sequence``;
    call: the ranks sharing one DiT call (CFG halves x sequence shards: one window group); windows: the ranks in
    the same place of every window group (they join the groups' window sums). Without window groups ``call``
    is the ``generation`` group itself.
    """

    layout: ParallelLayout
    rank: int
    coords: RankCoords
    generation_ranks: tuple[int, ...]
    generation: dist.ProcessGroup | None
    sequence: dist.ProcessGroup | None
    ulysses: dist.ProcessGroup | None
    ring: dist.ProcessGroup | None
    call: dist.ProcessGroup | None = None
    windows: dist.ProcessGroup | None = None

    @property
    def sequence_index(self) -> int:
        """This rank's token shard: ring-major, then Ulysses."""
        return self.coords.ring * self.layout.ulysses + self.coords.ulysses

    @property
    def leader(self) -> int:
        """The generation's first rank: it returns the results and writes the files."""
        return self.generation_ranks[0]

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader


def _group_sets(layout: ParallelLayout, vary: tuple[str, ...]) -> list[tuple[int, ...]]:
    """Every distinct set of ranks differing only in ``vary`` (in a fixed order, the same on all ranks)."""
    seen: dict[tuple[int, ...], None] = {}
    for rank in range(layout.world):
        seen.setdefault(tuple(layout.ranks(rank, vary=vary)), None)
    return list(seen)


def build_mesh(layout: ParallelLayout, timeout: object | None = None) -> ProcessMesh:
    """Creates the layout's process groups (collective: call on every rank, with the same layout)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError(
            "parallel generation needs an initialised torch.distributed process group: launch with "
            "torchrun (e.g. torchrun --nproc_per_node 2 script.py) and call "
            "torch.distributed.init_process_group() (backend 'nccl' on GPUs, 'gloo' on CPUs) first"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != layout.world:
        raise ParallelError(f"the layout {layout.name()} needs {layout.world} ranks; the process group has {world}")
    mine: dict[str, dist.ProcessGroup | None] = {}
    made: dict[tuple[int, ...], dist.ProcessGroup] = {}
    for kind, vary in GROUP_KINDS.items():
        mine[kind] = None
        for ranks in _group_sets(layout, vary):
            if len(ranks) == 1:
                continue
            group = made.get(ranks) if kind in REUSING_KINDS else None
            if group is None:
                kwargs = {} if timeout is None else {"timeout": timeout}
                group = dist.new_group(list(ranks), **kwargs)
                made.setdefault(ranks, group)
            if rank in ranks:
                mine[kind] = group
    return ProcessMesh(
        layout=layout,
        rank=rank,
        coords=layout.coords(rank),
        generation_ranks=tuple(layout.ranks(rank, vary=GROUP_KINDS["generation"])),
        **mine,
    )
