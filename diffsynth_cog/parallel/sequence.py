"""Sequence-parallel attention: the attention a DiT block calls when its tokens are sharded.

Each rank of a sequence group holds one contiguous shard of the ``[text, video]`` tokens (``shards``
gives every shard's length; shard ``ring_rank * U + ulysses_rank`` is this rank's). Attention over
the whole sequence is then, as in USP (yunchang's ``LongContextAttention``):

  1. Ulysses (``U`` > 1): all-to-all inside the Ulysses group, so this rank holds every token of its
     ring shard (the ``U`` shards of its Ulysses group) for ``H / U`` heads;
  2. ring (``R`` > 1): ring attention over the ``R`` ring shards (``parallel.ring``), or with ``R`` = 1
     the call's own attention (``inner``: a dense kernel or an attention part such as a mask) on the
     whole sequence;
  3. Ulysses back: outputs return to their tokens, all heads.

Inference: the exchange runs inside a custom op, so ``torch.compile`` keeps each block in one graph around an
opaque call instead of tracing collectives. With Ulysses alone and all heads at once (the default) the op is
``diffsynth_cog::ulysses_exchange``: q, k and v are packed into the send buffer and the outputs unpacked in the
caller's graph (``ulysses.pack_heads`` / ``unpack_heads``, fused there with the norms, RoPE and the copies
around), the op holds the two all-to-alls and the attention. Otherwise (ring attention, or ``head_chunks``
groups of heads pipelined through the exchange by ``ulysses.ulysses_attention``) the whole exchange is one op,
``diffsynth_cog::sequence_parallel_attention``.
Within one host whose GPUs map each other's memory, Ulysses alone can instead exchange through symmetric memory
(``parallel.peer``, op ``diffsynth_cog::ulysses_peer_exchange``): copy engines write every chunk where the
attention reads it, no packing kernels and no SM time for the transfer; ``enable_parallel(ulysses_transport=...)``
chooses (default: this one where it works).
Training (a call whose q, k or v need gradients): the same steps run eagerly, outside the op, through
the differentiable all-to-all of ``parallel.comm`` (its backward is the reverse exchange), so the
gradients of every token reach the rank that holds it. Ring attention has no backward: refused there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from diffsynth_cog.models.attention import Attend, DenseAttention
from diffsynth_cog.parallel.block_attention import BlockKernel, block_kernel
from diffsynth_cog.parallel.layout import ParallelError
from diffsynth_cog.parallel.peer import PeerExchange, from_peer_layout, to_peer_layout
from diffsynth_cog.parallel.ring import ring_attention
from diffsynth_cog.parallel.ulysses import (
    attend_and_return,
    heads_to_tokens,
    pack_heads,
    start_exchange,
    tokens_to_heads,
    ulysses_attention,
    unpack_heads,
)

_PLANS: dict[int, SequenceParallelAttention] = {}
# Ulysses alone, at inference: head groups pipelined through the all-to-all (``ulysses.ulysses_attention``).
# 1 (no pipelining) measured fastest on 2 H200s over NVLink (BENCHMARKS.md, issue 10 second reading)
DEFAULT_HEAD_CHUNKS = 1
_IDS = itertools.count()


def refuse_in_ring(attention: object, ring: int, split_name: str) -> None:
    """Ring attention (``ring`` > 1) splits the keys into blocks and merges the blocks' softmaxes through their
    log-sum-exp: only dense attention with a kernel that returns it can run inside. ``attention``: a kernel name,
    None (the kernel chosen per call), a built :class:`DenseAttention`, or an attention part (a mask). The one home
    of this refusal: the split calls it when the denoiser is built, the sequence-parallel attention when made."""
    if ring <= 1:
        return
    kernel = attention.backend if isinstance(attention, DenseAttention) else attention
    if kernel == "sage":
        raise ParallelError(
            f"the attention backend 'sage' cannot combine with the split {split_name!r}: ring attention needs "
            "each block's log-sum-exp, which the sage kernel does not return here; use Ulysses alone"
        )
    if kernel is not None and not isinstance(kernel, str):
        raise ParallelError(
            f"the attention part {getattr(attention, 'name', attention)!r} cannot combine with the split "
            f"{split_name!r}: ring attention splits the keys into blocks and merges per-block softmaxes, which "
            "only dense attention allows; use Ulysses alone (ring_degree=1) with attention parts such as masks"
        )


@dataclass(eq=False)
class SequenceParallelAttention:
    """The ``attend`` of a rank holding one token shard (see the module docstring)."""

    inner: Attend
    shards: tuple[int, ...]
    ring: int
    ulysses: int
    ring_index: int
    ulysses_index: int
    ring_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    head_chunks: int = DEFAULT_HEAD_CHUNKS
    peer: PeerExchange | None = None  # Ulysses alone over symmetric memory (``parallel.peer``), else NCCL
    split_name: str = "sequence split"  # the split this attention serves (named by refusals)
    plan: int = field(init=False)
    _kernels: dict[tuple[torch.device, torch.dtype], tuple[str, BlockKernel]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.shards) != self.ring * self.ulysses:
            raise ParallelError(f"{len(self.shards)} shards for ring {self.ring} x ulysses {self.ulysses}")
        refuse_in_ring(self.inner, self.ring, self.split_name)
        self.plan = next(_IDS)
        _PLANS[self.plan] = self

    @property
    def ulysses_lengths(self) -> tuple[int, ...]:
        """Token counts of the shards of this rank's Ulysses group."""
        u = self.ulysses
        return self.shards[self.ring_index * u : (self.ring_index + 1) * u]

    @property
    def ring_lengths(self) -> tuple[int, ...]:
        """Token counts of the ring shards (each the union of one Ulysses group's shards)."""
        u = self.ulysses
        return tuple(sum(self.shards[i * u : (i + 1) * u]) for i in range(self.ring))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q, k, v [B, l, H, D] of this rank's shard -> attention output [B, l, H, D]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            self.check_trainable()
            return self.compute(q, k, v)  # eager, through the differentiable all-to-all
        if self.ulysses > 1 and self.ring == 1 and self.peer is not None:
            # q, k, v leave the block as [U, B, n, hc, D] (rank u's heads first; the permute fuses with RoPE):
            # every chunk a copy engine moves is contiguous; the outputs come back in the same layout
            sends = [to_peer_layout(t, self.ulysses) for t in (q, k, v)]
            return from_peer_layout(torch.ops.diffsynth_cog.ulysses_peer_exchange(*sends, self.plan))
        if self.ulysses > 1 and self.ring == 1 and self.head_chunks == 1:
            # the packing and unpacking stay in the caller's graph (a compiled block fuses them with the ops
            # around), only the exchange and the attention are opaque
            u, (b, _, _, dim) = self.ulysses, q.shape
            back = torch.ops.diffsynth_cog.ulysses_exchange(pack_heads(q, k, v, u), self.plan, b, dim)
            return unpack_heads(back, u, b, dim).reshape(q.shape)
        return torch.ops.diffsynth_cog.sequence_parallel_attention(q, k, v, self.plan)

    def exchange(self, send: torch.Tensor, batch: int, head_dim: int) -> torch.Tensor:
        """Ulysses alone, all heads at once: ``ulysses.pack_heads``' buffer -> ``ulysses.unpack_heads``' input."""
        lengths, group = self.ulysses_lengths, self.ulysses_group
        n = send.shape[0] // self.ulysses
        recv = start_exchange(send, lengths, group).wait()
        return attend_and_return(recv, self.inner, lengths, n, batch, head_dim, group).wait()

    def check_trainable(self) -> None:
        """Training runs Ulysses alone: ring attention's exchange has no backward pass."""
        if self.ring > 1:
            raise ParallelError(
                f"ring attention (ring degree {self.ring}) is for inference only: it has no backward pass; "
                "train with Ulysses alone (sequence_parallel = the Ulysses degree, ring degree 1)"
            )

    def release(self) -> None:
        """Forgets this plan (the custom op can no longer run it)."""
        _PLANS.pop(self.plan, None)

    def kernel(self, q: torch.Tensor) -> tuple[str, BlockKernel]:
        key = (q.device, q.dtype)
        if key not in self._kernels:
            backend = self.inner.backend  # type: ignore[attr-defined]
            self._kernels[key] = block_kernel(backend, q.device, q.dtype)
        return self._kernels[key]

    def compute(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        trains = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if self.ulysses > 1 and self.ring == 1 and not trains:
            return ulysses_attention(
                q, k, v, self.inner, self.ulysses_lengths, self.ulysses_index, self.ulysses_group, self.head_chunks
            )
        if self.ulysses > 1:
            lengths = self.ulysses_lengths
            q, k, v = tokens_to_heads((q, k, v), lengths, self.ulysses_group)
        if self.ring > 1:
            name, kernel = self.kernel(q)
            out = ring_attention(
                q,
                k,
                v,
                lengths=self.ring_lengths,
                index=self.ring_index,
                group=self.ring_group,
                kernel=kernel,
                centre_keys=name == "fa3-fp8",
            )
        else:
            out = self.inner(q, k, v)
        if self.ulysses > 1:
            out = heads_to_tokens(out, self.ulysses_lengths, self.ulysses_index, self.ulysses_group)
        return out


@torch.library.custom_op("diffsynth_cog::sequence_parallel_attention", mutates_args=())
def _sequence_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: int) -> torch.Tensor:
    return _PLANS[plan].compute(q, k, v)


@_sequence_parallel_attention.register_fake
def _(q, k, v, plan):  # noqa: ANN001, ANN202
    return torch.empty_like(q)


@torch.library.custom_op("diffsynth_cog::ulysses_exchange", mutates_args=())
def _ulysses_exchange(send: torch.Tensor, plan: int, batch: int, head_dim: int) -> torch.Tensor:
    return _PLANS[plan].exchange(send, batch, head_dim)


@_ulysses_exchange.register_fake
def _(send, plan, batch, head_dim):  # noqa: ANN001, ANN202
    return send.new_empty((send.shape[0], send.shape[1] // 3))  # U * n rows of B * hc * D


@torch.library.custom_op("diffsynth_cog::ulysses_peer_exchange", mutates_args=())
def _ulysses_peer_exchange(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: int) -> torch.Tensor:
    attention = _PLANS[plan]
    return attention.peer(q, k, v, attention.inner, attention.ulysses_lengths)  # type: ignore[misc]


@_ulysses_peer_exchange.register_fake
def _(q, k, v, plan):  # noqa: ANN001, ANN202
    return torch.empty_like(q)  # [U, B, n, hc, D]
