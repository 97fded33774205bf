"""The denoiser's distributed :class:`~diffsynth_cog.denoise.denoiser.TokenSplit`: CFG halves x token shards.

``scatter`` hands this rank its share of an embedded DiT call: the batch rows of its CFG half (the
unconditional or conditional row; every row when the batch is smaller than the CFG degree, e.g.
without guidance) and one contiguous shard of the flattened ``[text, video]`` tokens (the shards of
``layout.shard_bounds``: any token count, any degree; a shard may hold text tokens, video tokens or
both). Its blocks attend through :class:`~diffsynth_cog.parallel.sequence.SequenceParallelAttention`
wrapped around the call's own attention. ``gather`` all-gathers every rank's output patches over the ranks
sharing the call (``mesh.call``: one window group, the whole generation without window groups), so each of
them holds the whole v-prediction. ``all_reduce`` sums over the ranks whose shares make up the call once (for
the step-skipping part's decision), within that window group: a window always runs in the same group, so its
decisions are agreed where it runs.
"""

from __future__ import annotations

import dataclasses

import torch

from diffsynth_cog.denoise.denoiser import DenoiserParts
from diffsynth_cog.models.attention import Attend
from diffsynth_cog.models.tokens import DiTState, TokenLayout
from diffsynth_cog.parallel.comm import all_gather, all_reduce
from diffsynth_cog.parallel.layout import shard_bounds
from diffsynth_cog.parallel.mesh import ProcessMesh
from diffsynth_cog.parallel.peer import PeerExchange
from diffsynth_cog.parallel.sequence import DEFAULT_HEAD_CHUNKS, SequenceParallelAttention, refuse_in_ring

MAX_CACHED_ATTENDS = 32


class ParallelSplit:
    """A DiT call shared by the ranks of one window group (see the module docstring)."""

    def __init__(
        self, mesh: ProcessMesh, ulysses_head_chunks: int | None = None, peer: PeerExchange | None = None
    ) -> None:
        self.mesh = mesh
        self.peer = peer
        self.head_chunks = DEFAULT_HEAD_CHUNKS if ulysses_head_chunks is None else ulysses_head_chunks
        self.layout = mesh.layout
        self.name = f"parallel:{self.layout.name()}"
        self._attends: dict[tuple[int, tuple[int, ...]], SequenceParallelAttention] = {}
        self._rows_split = True

    # -- who computes what ---------------------------------------------------------------------

    def rows(self, batch: int, half: int | None = None) -> range:
        """Batch rows of CFG half ``half`` (default: this rank's); every row when the batch is smaller than
        the CFG degree (each half then computes the whole call)."""
        half = self.mesh.coords.half if half is None else half
        cfg = self.layout.cfg
        if batch < cfg:
            return range(batch)
        start, end = shard_bounds(batch, cfg)[half]
        return range(start, end)

    def shards(self, n_tokens: int) -> list[tuple[int, int]]:
        """[start, end) of every token shard of the sequence, in shard order."""
        return shard_bounds(n_tokens, self.layout.sequence)

    def _attend(self, inner: Attend, shards: list[tuple[int, int]]) -> Attend:
        if self.layout.sequence == 1:
            return inner
        lengths = tuple(e - s for s, e in shards)
        key = (id(inner), lengths)  # the cached object holds `inner`, so its id stays unique while cached
        if key not in self._attends:  # one object per (attention, shard lengths): compiled blocks reuse it
            if len(self._attends) >= MAX_CACHED_ATTENDS:  # attention parts may build a new attend per call
                self._attends.pop(next(iter(self._attends))).release()
            c = self.mesh.coords
            self._attends[key] = SequenceParallelAttention(
                inner=inner,
                shards=lengths,
                ring=self.layout.ring,
                ulysses=self.layout.ulysses,
                ring_index=c.ring,
                ulysses_index=c.ulysses,
                ring_group=self.mesh.ring,
                ulysses_group=self.mesh.ulysses,
                head_chunks=self.head_chunks,
                peer=self.peer,
                split_name=self.name,
            )
        return self._attends[key]

    # -- the TokenSplit protocol -----------------------------------------------------------------

    def scatter(self, state: DiTState) -> DiTState:
        batch = state.shape[0]
        rows = self.rows(batch)
        self._rows_split = batch >= self.layout.cfg
        rows = slice(rows.start, rows.stop)
        shards = self.shards(state.layout.n_tokens)
        start, end = shards[self.mesh.sequence_index]
        n_text = state.layout.n_text
        text = state.text[rows, min(start, n_text) : min(end, n_text)]
        video = state.video[rows, max(start, n_text) - n_text : max(end, n_text) - n_text]
        rope = None if state.rope is None else tuple(t[start:end] for t in state.rope)
        return dataclasses.replace(
            state,
            video=video,
            text=text,
            cond=state.cond[rows],
            rope=rope,  # type: ignore[arg-type]
            attend=self._attend(state.attend, shards),
        )

    def gather(self, patches: torch.Tensor, state: DiTState) -> torch.Tensor:
        # patches [b, lv, C*p*p] of this rank -> [B, Lv, C*p*p] of the whole call, on every rank
        if self.mesh.call is None:
            return patches
        if torch.is_grad_enabled() and patches.requires_grad:
            return _GatherPatches.apply(patches, self, state.shape[0], state.layout)
        return self._gather(patches, state.shape[0], state.layout)

    def _video_shards(self, layout: TokenLayout) -> list[tuple[int, int]]:
        n_text = layout.n_text
        return [(max(s, n_text) - n_text, max(e, n_text) - n_text) for s, e in self.shards(layout.n_tokens)]

    def _halves(self, batch: int) -> range:
        """The CFG halves whose rows make up the output (one when every half computes every row)."""
        return range(self.layout.cfg) if batch >= self.layout.cfg else range(1)

    def _gather(self, patches: torch.Tensor, batch: int, layout: TokenLayout) -> torch.Tensor:
        video_shards = self._video_shards(layout)
        halves = self._halves(batch)
        most_rows = max(len(self.rows(batch, h)) for h in halves)
        most_tokens = max(e - s for s, e in video_shards)
        padded = patches.new_zeros((most_rows, most_tokens, patches.shape[-1]))
        padded[: patches.shape[0], : patches.shape[1]] = patches
        parts = all_gather(padded, self.mesh.call, "gathering the DiT's output patches")
        out = patches.new_empty((batch, layout.n_video, patches.shape[-1]))
        sequence = self.layout.sequence
        for half in halves:
            rows = self.rows(batch, half)
            for index, (s, e) in enumerate(video_shards):
                out[rows.start : rows.stop, s:e] = parts[half * sequence + index][: len(rows), : e - s]
        return out

    def gather_adjoint(self, grad: torch.Tensor, batch: int, layout: TokenLayout) -> torch.Tensor:
        """The gradient of this rank's patches from ``grad`` [B, Lv, C*p*p], the gradient of the gathered
        output on this rank: the adjoint of the all-gather (a reduce-scatter, as all-reduce + own slice), the
        sum over the call's ranks of the gradient at this rank's rows and tokens."""
        total = all_reduce(grad.contiguous(), self.mesh.call, "summing the gradients of the output patches")
        half = self.mesh.coords.half
        s, e = self._video_shards(layout)[self.mesh.sequence_index]
        rows = self.rows(batch)
        if half not in self._halves(batch):  # this half's rows were not taken into the output
            return grad.new_zeros((len(rows), e - s, grad.shape[-1]))
        return total[rows.start : rows.stop, s:e]

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        group = self.mesh.call if self._rows_split else self.mesh.sequence
        if group is None:
            return values
        return all_reduce(values, group, "summing the step-skipping signal")

    def check_compatible(self, parts: DenoiserParts) -> None:
        """Refuses what cannot be split: heads Ulysses cannot divide, attention parts inside a ring."""
        self.layout.check_heads(parts.config.num_attention_heads)
        refuse_in_ring(parts.attention, self.layout.ring, self.name)


class _GatherPatches(torch.autograd.Function):
    """:meth:`ParallelSplit.gather` with autograd (backward: :meth:`ParallelSplit.gather_adjoint`)."""

    @staticmethod
    def forward(ctx, patches, split, batch, layout):  # noqa: ANN001, ANN205
        ctx.split, ctx.batch, ctx.layout = split, batch, layout
        return split._gather(patches, batch, layout)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return ctx.split.gather_adjoint(grad, ctx.batch, ctx.layout), None, None, None
