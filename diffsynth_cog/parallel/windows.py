"""A step's temporal windows spread over the layout's window groups: the denoiser's WindowShare.

With ``windows`` window groups (``ParallelLayout.windows``), every group takes a contiguous share of the
windows of each step (``shard_bounds``: all windows have one size, so shares of equal cost whose counts differ by
at most one, also when the count does not divide) and runs them with its own ranks (CFG halves x sequence shards
share each call, ``parallel.split``). The fusion is a weighted sum, so each rank accumulates the weighted sum of
its group's windows and one all-reduce (sum) over the ranks in the same place of every group (``mesh.windows``)
joins them; the norm comes from the whole plan, so every rank steps the one-process result.

A window always runs in the same group, so the step-skipping state kept per window (its key) lives where the
window runs, and the decisions are agreed within that group (``ParallelSplit.all_reduce`` sums over the call's
ranks). Window groups and no windows in the call, or fewer windows than groups, are refused on every rank
before any work (:func:`check_window_call`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.denoise.windows import WindowPlan, WindowSpec
from diffsynth_cog.parallel.comm import all_reduce
from diffsynth_cog.parallel.layout import ParallelError, ParallelLayout, shard_bounds
from diffsynth_cog.parallel.mesh import ProcessMesh

if TYPE_CHECKING:
    from diffsynth_cog.denoise.denoiser import DenoiserParts


def _no_windows(layout: ParallelLayout) -> ParallelError:
    return ParallelError(
        f"the layout {layout.name()} spreads temporal windows over {layout.windows} window groups, but this call "
        "has no windows: pass windows=WindowSpec(...) (the command line's --window-frames F), or "
        "enable_parallel(window_degree=1) to share every call instead"
    )


def _too_few(layout: ParallelLayout, count: int, plan_text: str) -> ParallelError:
    return ParallelError(
        f"the layout {layout.name()} has {layout.windows} window groups, but a step of this call has {count} "
        f"window(s) ({plan_text}): use window_degree <= {count} (the rest of the ranks can share each call: CFG, "
        "Ulysses), shorter windows or more overlap"
    )


def check_window_call(layout: ParallelLayout, windows: WindowSpec | None, latent_frames: int) -> None:
    """Refuses a call the window groups cannot share: no windows, or fewer windows per step than groups.
    Pure (every rank decides alike from the same, checked, call)."""
    if layout.windows == 1:
        return
    if windows is None:
        raise _no_windows(layout)
    plan = windows.plan(latent_frames)
    if len(plan) < layout.windows:
        text = f"{latent_frames} latent frames in windows of {windows.frames} frames, overlap {windows.overlap:g}"
        raise _too_few(layout, len(plan), text)


def windows_per_step(config: DiTConfig, num_frames: int, window_frames: int | None, overlap: float) -> int:
    """The windows of one step of a ``num_frames`` video in windows of ``window_frames`` frames (None: no windows,
    1) for this transformer (latent frames padded to whole temporal patches, as the pipeline runs them): what
    ``ParallelLayout.from_options(windows="auto")`` needs."""
    if not window_frames:
        return 1
    family = config.family
    frames = family.padded_latent_frames(family.latent_frames(num_frames))
    return len(WindowSpec(window_frames, overlap, patch_t=config.temporal_patch).plan(frames))


class WindowGroups:
    """The :class:`~diffsynth_cog.denoise.windows.WindowShare` of one rank (see the module docstring)."""

    def __init__(self, mesh: ProcessMesh) -> None:
        self.mesh = mesh
        self.layout = mesh.layout
        self.name = f"window-groups:{self.layout.windows}"

    def shares(self, count: int) -> list[range]:
        """The windows of every group for a step of ``count`` windows: contiguous, counts differing by <= 1."""
        return [range(s, e) for s, e in shard_bounds(count, self.layout.windows)]

    def windows(self, plan: WindowPlan) -> range:
        if len(plan) < self.layout.windows:
            raise _too_few(self.layout, len(plan), f"{plan.length} latent frames in windows of {plan.size}")
        return self.shares(len(plan))[self.mesh.coords.window]

    def join(self, total: torch.Tensor) -> torch.Tensor:
        if self.mesh.windows is None:
            return total
        return all_reduce(total.contiguous(), self.mesh.windows, "joining the window groups' weighted sums")

    def check_compatible(self, parts: DenoiserParts) -> None:
        """Needs windows in the call, and a split that shares each call within one window group of this layout
        (the context's), so that the ranks of a group run the same windows and decide alike."""
        if parts.windows is None:
            raise _no_windows(self.layout)
        split_mesh = getattr(parts.split, "mesh", None)
        if self.layout.call_size > 1 and split_mesh is not self.mesh:
            raise ParallelError(
                f"the window share '{self.name}' needs the split of the same parallel context (each window group's "
                f"{self.layout.call_size} ranks share its calls); got the split '{parts.split.name}'"
            )
