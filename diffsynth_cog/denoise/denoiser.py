"""The denoiser: one denoising step's v-prediction, composed of orthogonal parts.

A step asks the DiT for ``v(latents, timestep, text)``. How that call is carried out is decided by
independent parts, each with a default that is the plain, exact computation:

  * **attention** - what the blocks' attention layers compute: dense attention with a kernel
    (``models.attention``; chosen per call, per model or per process) or an :class:`AttentionPart`
    that builds its own (a sparse mask, say) for the call's token layout;
  * **split** - a :class:`TokenSplit` that hands this process its share of the work (batch rows,
    a slice of the token sequence) and joins the results; the default :class:`WholeCall` keeps all;
  * **step skipping** - a :class:`StepSkipper` that runs the blocks, or reuses earlier work when
    the step barely changes (``step_cache.StepCache``); default: run every block;
  * **tiles** - a :class:`~diffsynth_cog.models.tiling.TileSpec`: the DiT runs on overlapping spatial tiles
    stitched by the shared tile blender; each tile keeps its own step-skipping state;
  * **windows** - a :class:`~diffsynth_cog.denoise.windows.WindowSpec`: the same in time, overlapping windows
    of latent frames (each with its own positions), fused with weights (``diffsynth_cog.denoise.windows``);
    a :class:`~diffsynth_cog.denoise.windows.WindowShare` spreads a step's windows over processes;
  * **positions** - ``riflex`` = (k, N_k): RIFLEx's lowered temporal RoPE frequency
    (``diffsynth_cog.denoise.riflex``); default: the trained positions.

One DiT call is ``embed -> [attention part] -> split.scatter -> blocks (skipper) -> project ->
split.gather -> unpatchify``, run per window and tile. Every part sees only its own inputs, so parts combine
freely; a combination that means nothing is refused when the denoiser is built, naming both parts: every part
declares ``check_compatible(parts)`` and sees the transformer's config and the other parts
(:class:`DenoiserParts`), nothing else of the denoiser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.denoise.riflex import resolve_riflex
from diffsynth_cog.denoise.windows import WindowJoin, WindowSpec, map_windows
from diffsynth_cog.models.attention import Attend, check_backend, dense_attention
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.models.tiling import TileSpec, map_tiles
from diffsynth_cog.models.tokens import DiTState, TokenLayout


@runtime_checkable
class AttentionPart(Protocol):
    """Builds the attention of a DiT call from its token layout (e.g. a block-sparse mask)."""

    name: str

    def build(self, layout: TokenLayout, device: torch.device, kernel: Attend) -> Attend:
        """The attention of calls with ``layout`` on ``device``; ``kernel`` is the dense attention the call would
        use without this part (the kernel the DiT resolved), for parts that compute with it."""
        ...

    def check_compatible(self, parts: DenoiserParts) -> None:
        """Raises (naming both parts) when this part cannot work with the transformer or the other ``parts``;
        called once when the denoiser is built."""
        ...


@runtime_checkable
class TokenSplit(Protocol):
    """Shares a DiT call between processes: which rows / tokens this one computes, and the join."""

    name: str

    def scatter(self, state: DiTState) -> DiTState:
        """The embedded call -> this process's share (its blocks' inputs, rope and attention)."""
        ...

    def gather(self, patches: torch.Tensor, state: DiTState) -> torch.Tensor:
        """This process's output patches [b, l, C*p*p] -> those of the whole call [B, Lv, C*p*p]."""
        ...

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sums ``values`` over every process sharing the call, so that they all decide alike."""
        ...

    def check_compatible(self, parts: DenoiserParts) -> None:
        """As :meth:`AttentionPart.check_compatible`."""
        ...


@runtime_checkable
class StepSkipper(Protocol):
    """Runs a DiT call's blocks, skipping work on steps that barely differ from earlier ones."""

    name: str

    def start(self, num_steps: int) -> None:
        """A new generation of ``num_steps`` steps begins: forget everything."""
        ...

    def run(self, dit: CogDiT, state: DiTState, key: Hashable, reduce: TokenSplit) -> DiTState:
        """The state after all blocks, for the call ``key`` (one per tile) of the current step."""
        ...

    def end_step(self) -> None:
        """The current step's calls are done (called by the sampling loop once per step)."""
        ...

    def check_compatible(self, parts: DenoiserParts) -> None:
        """As :meth:`AttentionPart.check_compatible`."""
        ...


class WholeCall:
    """The default split: this process computes the whole call."""

    name = "whole"

    def scatter(self, state: DiTState) -> DiTState:
        return state

    def gather(self, patches: torch.Tensor, state: DiTState) -> torch.Tensor:
        return patches

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def check_compatible(self, parts: DenoiserParts) -> None:
        """The whole call goes with every part."""


WHOLE_CALL = WholeCall()


@runtime_checkable
class WindowShare(WindowJoin, Protocol):
    """Shares a step's windows between processes (``windows.WindowJoin``: which windows this one runs, the join of
    the sums), checked against the other parts like every part."""

    def check_compatible(self, parts: DenoiserParts) -> None:
        """As :meth:`AttentionPart.check_compatible`."""
        ...


@dataclass(frozen=True)
class DenoiserParts:
    """What each part checks itself against when a denoiser is built: the transformer's config and the parts.

    ``attention``: a kernel name, an :class:`AttentionPart`, or None (the kernel chosen per call, per model or per
    process, ``CogDiT.attention_kernel``)."""

    config: DiTConfig
    attention: str | AttentionPart | None = None
    split: TokenSplit = WHOLE_CALL
    step_skip: StepSkipper | None = None
    windows: WindowSpec | None = None
    window_share: WindowShare | None = None


def _members(protocol: type) -> list[str]:
    """The attributes a Protocol asks for (its annotations and methods), for refusals that name what is missing."""
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")}
    return sorted(names)


class Denoiser:
    """``denoiser(latents, timestep, context)`` -> v-prediction (float32), composed of parts.

    Args:
        dit: the transformer.
        attention: a kernel name (one of ``models.attention.BACKENDS``) or an :class:`AttentionPart`;
            None = the kernel chosen per call / per model / per process.
        split: how the call is shared between processes (default: not at all).
        step_skip: a :class:`StepSkipper` (default: every block at every step).
        tiles: run the DiT on overlapping spatial tiles (pixels; see ``tiling.TileSpec``).
        windows: run the DiT on overlapping windows of frames (see ``windows.WindowSpec``).
        window_share: which of a step's windows this process runs, and the join (default: all, here).
        riflex: (k, N_k) for RIFLEx's temporal RoPE frequency (RoPE models; ``riflex.resolve_riflex``).

    Call :meth:`start` before each generation (it resets the step-skipping state), then for every step
    call the denoiser (once, or once per ``call`` name when a step makes several DiT calls, e.g. the two
    guidance halves separately) and :meth:`end_step`.
    """

    def __init__(
        self,
        dit: CogDiT,
        *,
        attention: str | AttentionPart | None = None,
        split: TokenSplit | None = None,
        step_skip: StepSkipper | None = None,
        tiles: TileSpec | None = None,
        windows: WindowSpec | None = None,
        riflex: tuple[int, int] | None = None,
        window_share: WindowShare | None = None,
    ) -> None:
        self.dit = dit
        if isinstance(attention, str):
            attention = check_backend(attention)
        elif attention is not None and not isinstance(attention, AttentionPart):
            missing = [m for m in _members(AttentionPart) if not hasattr(attention, m)]
            raise TypeError(
                f"attention must be a backend name or an AttentionPart; {type(attention).__name__} lacks {missing}"
            )
        self.attention = attention
        self.split = split if split is not None else WHOLE_CALL
        self.step_skip = step_skip
        roles = (("split", self.split, TokenSplit), ("step_skip", step_skip, StepSkipper))
        for role, part, protocol in (*roles, ("window_share", window_share, WindowShare)):
            if part is not None and not isinstance(part, protocol):
                missing = [m for m in _members(protocol) if not hasattr(part, m)]
                raise TypeError(f"{role} must be a {protocol.__name__}; {type(part).__name__} lacks {missing}")
        self.tiles = tiles
        self.windows = windows
        self.window_share = window_share
        self.riflex = resolve_riflex(dit.config, riflex)
        parts = DenoiserParts(dit.config, self.attention, self.split, step_skip, windows, window_share)
        for part in (self.attention, self.split, step_skip, window_share):
            if part is not None and not isinstance(part, str):
                part.check_compatible(parts)

    def parts(self) -> dict[str, str]:
        """The parts in use, by name (for logs and benchmark records)."""
        attention = self.attention if isinstance(self.attention, str | None) else self.attention.name
        return {
            "attention": attention or self.dit.attention_kernel(),
            "split": self.split.name,
            "step_skip": self.step_skip.name if self.step_skip is not None else "none",
            "tiles": "none" if self.tiles is None else f"{self.tiles.size[0]}x{self.tiles.size[1]}px",
            "windows": "none" if self.windows is None else f"{self.windows.frames}f/{self.windows.overlap:g}",
            "window_share": "none" if self.window_share is None else self.window_share.name,
            "riflex": "none" if self.riflex is None else f"k={self.riflex[0]},N_k={self.riflex[1]}",
        }

    def start(self, num_steps: int) -> None:
        """A new generation of ``num_steps`` denoising steps begins."""
        if self.step_skip is not None:
            self.step_skip.start(num_steps)

    def end_step(self) -> None:
        """Every DiT call of the current step has been made."""
        if self.step_skip is not None:
            self.step_skip.end_step()

    def call_dit(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, key: Hashable = None):
        """One DiT call on latents [B, C_in, T, H, W] -> v-prediction [B, C_out, T, H, W] (the DiT's dtype).
        Dense attention: the kernel named here, or (None) the one the DiT resolves; a part builds its own."""
        kernel = dense_attention(self.attention) if isinstance(self.attention, str) else None
        state = self.dit.embed(latents, timestep, context, kernel, riflex=self.riflex)
        if isinstance(self.attention, AttentionPart):
            attend = self.attention.build(state.layout, latents.device, state.attend)
            state = dataclasses.replace(state, attend=attend)
        state = self.split.scatter(state)
        if self.step_skip is not None:
            state = self.step_skip.run(self.dit, state, key, self.split)
        else:
            state = self.dit.run_blocks(state)
        patches = self.split.gather(self.dit.project(state), state)
        return self.dit.unpatchify(patches, state.shape)

    def _tiled(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, key: Hashable) -> torch.Tensor:
        """The DiT on x [B, C, T, H, W], on spatial tiles when asked; ``key`` (this call's name and temporal
        window) is completed with each tile's start into the call's step-skipping key."""
        if self.tiles is None:
            return self.call_dit(x, t, context, key=(key, (0, 0)))
        p = self.dit.config.patch_size
        grid = self.tiles.grid(tuple(x.shape[-2:]), pixels_per_unit=self.dit.family.vae_spatial, multiple=p)
        run = lambda tile, start: self.call_dit(tile, t, context, key=(key, start)).float()  # noqa: E731
        return run(x, (0, 0)) if grid.single else map_tiles(x, grid, run)

    def __call__(
        self, latents: torch.Tensor, timestep: int, context: torch.Tensor, call: Hashable = None
    ) -> torch.Tensor:
        """latents [B, C_in, T, H, W] (any float dtype), timestep (one for the batch), context [B, L, D_text]
        -> v-prediction [B, C_out, T, H, W] in float32. ``call`` names this call within its step when a
        step makes several (each keeps its own step-skipping state)."""
        dtype = self.dit.proj_out.weight.dtype
        x = latents.to(dtype)
        t = torch.full((x.shape[0],), timestep, device=x.device, dtype=torch.long)
        context = context.to(dtype)
        if self.windows is None:
            v = self._tiled(x, t, context, key=(call, None))
        else:
            plan = self.windows.plan(x.shape[2])
            run = lambda window, start: self._tiled(window, t, context, key=(call, start))  # noqa: E731
            v = map_windows(x, plan, run, share=self.window_share)
        return v.float()
