"""Temporal windows: denoise a video of any length with DiT calls of a bounded length.

The temporal counterpart of spatial tiles (``diffsynth_cog.models.tiling``), FreeNoise-style: at every step
the latents are cut into overlapping windows of at most ``size`` latent frames (the length the model
was trained on, so memory and the model's positional range stay those of one trained clip), each
window is one DiT call with its own positions 0..size-1, and the windows' v-predictions are fused
frame by frame with weights that ramp linearly across each overlap (a frame deep inside a window
counts fully; one at a window's edge shared with a neighbour counts little). All windows run every
step, so they keep negotiating their overlaps until the end.

The windows of a step depend only on the step's latents, so they may run in several places at once: a
:class:`WindowShare` (the parallel layout's window groups, ``diffsynth_cog.parallel.windows``) names the windows
this process runs and joins the processes' weighted sums; the fusion is a weighted sum, so the joined sum over
the norm of the whole plan is the one-process result.

For the windows to agree from the start, the initial noise is *rescheduled* (FreeNoise): frames past
the first window reuse the noise of the frames one window earlier, shuffled within blocks of one
stride (:func:`reschedule_noise`), so every window starts from a permutation of the same noise
frames instead of unrelated noise.

Costs and limits: a step costs ``len(plan)`` calls of ``size`` frames (about T / stride of them), with
the memory of one call plus two float32 copies of the latents. The windows share only what their
overlaps carry: content that should persist longer than a window (a face that leaves and returns) is
not tied together. Every window starts at position 0, which the model trained as the clip's first
frame (a single image frame in the causal VAE), so window starts can show a slight "first frame" look.

All windows have the same length (the last one is moved back to end at the last frame), so compiled
blocks see one shape. With temporal patches (CogVideoX 1.5: ``patch_t`` = 2 latent frames a patch) windows are
planned in whole temporal patches: sizes, starts and strides are multiples of ``patch_t`` latent frames, so every
window is a whole number of the DiT's token rows in time.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from diffsynth_cog.validators import POSITIVE_INT, number

_OVERLAP = number(0, 1, high_open=True).described("a fraction in [0, 1)")


@dataclass(frozen=True)
class WindowSpec:
    """Windows as users give them: ``frames`` pixel frames per window (4k+1: 49 for the base model's
    trained length, 129 with the ExVideo LoRA) and ``overlap``, the fraction of a window shared with the
    next one (0 <= overlap < 1; more overlap = smoother joins, more windows per step)."""

    frames: int
    overlap: float = 0.25
    compression: int = 4  # pixel frames per latent frame (after the first)
    patch_t: int = 1  # latent frames per temporal patch of the DiT (the pipeline sets it from the model)

    def __post_init__(self) -> None:
        POSITIVE_INT.require("window frames", self.frames)
        if (self.frames - 1) % self.compression:
            raise ValueError(
                f"window frames must be {self.compression}k+1 pixel frames (e.g. 49, 129); got {self.frames}"
            )
        _OVERLAP.require("window overlap", self.overlap)
        POSITIVE_INT.require("window patch_t", self.patch_t)

    @property
    def latent_frames(self) -> int:
        """Latent frames of one window, rounded up to whole temporal patches (81 frames on 1.5: 21 -> 22)."""
        frames = (self.frames - 1) // self.compression + 1
        return -(-frames // self.patch_t) * self.patch_t

    def plan(self, latent_frames: int) -> WindowPlan:
        """The windows over ``latent_frames`` latent frames (a whole number of temporal patches)."""
        pt = self.patch_t
        if latent_frames % pt:
            raise ValueError(
                f"windows of temporal patches of {pt} latent frames need a whole number of patches; got "
                f"{latent_frames} latent frames"
            )
        size = self.latent_frames
        if latent_frames <= size:
            return WindowPlan(latent_frames, latent_frames, (0,), latent_frames)
        stride = max(1, int(size // pt * (1 - self.overlap))) * pt
        starts = list(range(0, latent_frames - size + 1, stride))
        if starts[-1] + size < latent_frames:
            starts.append(latent_frames - size)  # the last window ends at the last frame
        return WindowPlan(latent_frames, size, tuple(starts), stride)


@dataclass(frozen=True)
class WindowPlan:
    """``starts`` of windows of ``size`` latent frames over ``length`` frames; ``stride`` the planned step
    between starts (the last start may be closer to its neighbour)."""

    length: int
    size: int
    starts: tuple[int, ...]
    stride: int

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def single(self) -> bool:
        return len(self.starts) == 1 and self.size >= self.length

    def weights(self, index: int) -> torch.Tensor:
        """Fusion weights [size] (float32) of window ``index``: 1 inside; across an overlap of ``n`` frames
        with a neighbour, ``1/(n+1), 2/(n+1), ...`` rising away from that neighbour."""
        start = self.starts[index]
        end = start + self.size
        left = self.starts[index - 1] + self.size - start if index > 0 else 0
        right = end - self.starts[index + 1] if index + 1 < len(self.starts) else 0
        position = torch.arange(self.size, dtype=torch.float32)
        weight = torch.ones(self.size, dtype=torch.float32)
        if left > 0:
            weight = torch.minimum(weight, (position + 1) / (left + 1))
        if right > 0:
            weight = torch.minimum(weight, (self.size - position) / (right + 1))
        return weight


@runtime_checkable
class WindowJoin(Protocol):
    """What :func:`map_windows` asks of a share of a step's windows between processes: which windows this one
    runs, and the join of the sums (the denoiser's part is ``denoiser.WindowShare``, which adds its check)."""

    name: str

    def windows(self, plan: WindowPlan) -> range:
        """The indices of the windows of ``plan`` this process runs (never empty; the same on every process
        that shares its DiT calls)."""
        ...

    def join(self, total: torch.Tensor) -> torch.Tensor:
        """This process's weighted sum [B, C, T, H, W] (float32) -> the sum over every share of the step."""
        ...


def map_windows(
    x: torch.Tensor,
    plan: WindowPlan,
    run: Callable[[torch.Tensor, Hashable], torch.Tensor],
    share: WindowJoin | None = None,
) -> torch.Tensor:
    """``run(window, start)`` over the windows of x [B, C, T, H, W] (along T), fused with the plan's weights.

    One window covering everything is ``run(x, 0)`` itself. Otherwise the result is float32:
    ``sum_w weight_w(t) run_w(t) / sum_w weight_w(t)`` for every frame t. With a ``share`` this process runs
    only its windows; ``share.join`` adds up the weighted sums of all shares and the norm is the whole plan's.
    """
    if x.shape[2] != plan.length:
        raise ValueError(f"latents have {x.shape[2]} frames; the window plan covers {plan.length}")
    if plan.single and share is None:
        return run(x, 0)
    mine = range(len(plan)) if share is None else share.windows(plan)
    total: torch.Tensor | None = None
    norm = torch.zeros(plan.length, dtype=torch.float32, device=x.device)
    for i, start in enumerate(plan.starts):
        w = plan.weights(i).to(x.device)
        norm[start : start + plan.size] += w
        if i not in mine:
            continue
        out = run(x[:, :, start : start + plan.size], start)
        if total is None:
            total = torch.zeros((*out.shape[:2], plan.length, *out.shape[3:]), dtype=torch.float32, device=x.device)
        total[:, :, start : start + plan.size] += out.float() * w[:, None, None]
    if share is not None:
        total = share.join(total)
    return total / norm[:, None, None]


def reschedule_noise(noise: torch.Tensor, plan: WindowPlan, generator: torch.Generator | None) -> torch.Tensor:
    """FreeNoise's noise rescheduling for the windows of ``plan``: latents [B, C, T, H, W] -> a copy whose first
    window keeps its noise, and whose frames from ``size`` on come, block of ``stride`` frames by block, from
    the frames exactly one window earlier, in an order shuffled by ``generator`` (a CPU generator's draws do
    not depend on the device). A plan of one window changes nothing."""
    if noise.shape[2] != plan.length:
        raise ValueError(f"noise has {noise.shape[2]} frames; the window plan covers {plan.length}")
    if plan.single:
        return noise
    out = noise.clone()
    gen_device = generator.device if generator is not None else "cpu"
    for first in range(plan.size, plan.length, plan.stride):
        count = min(plan.stride, plan.length - first)
        order = torch.randperm(plan.stride, generator=generator, device=gen_device)[:count].to(noise.device)
        out[:, :, first : first + count] = out[:, :, first - plan.size + order]
    return out
