"""Ulysses sequence parallelism: trade a shard of the tokens for a share of the heads (all-to-all).

Before attention, each of the ``U`` ranks of a Ulysses group holds all heads of its own tokens
(``lengths[i]`` tokens on rank i; they need not be equal). One ``all_to_all_single`` with uneven
split sizes gives every rank all the group's tokens for ``H / U`` of the heads, so any attention
kernel or attention part (a mask, say) runs on whole sequences; a second all-to-all brings the
outputs back. No padding, so nothing is ever added to the softmax.

Two forms of the same exchange:

* :func:`tokens_to_heads` / :func:`heads_to_tokens`: differentiable (training); each direction costs one
  copy into the send buffer and one out of the receive buffer.
* :func:`ulysses_attention` (inference): the whole round trip around an attention call, pipelined over
  groups of heads so that the exchange of one group runs while another group's attention computes
  (``dist.all_to_all_single(async_op=True)``: NCCL's own stream); the send buffer is laid out token-major
  so that the received q, k and v are attention inputs as they arrive (strided views, no unpacking copy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from diffsynth_cog.models.attention import Attend
from diffsynth_cog.parallel.comm import PendingExchange, all_to_all, start_all_to_all
from diffsynth_cog.parallel.layout import shard_bounds


def tokens_to_heads(
    tensors: Sequence[torch.Tensor], lengths: Sequence[int], group: dist.ProcessGroup
) -> list[torch.Tensor]:
    """Each of ``tensors`` (e.g. q, k, v) [B, n, H, D], this rank's n tokens -> [B, sum(lengths), H/U, D]:
    every rank's tokens, for this rank's share of the heads (rank i of the group gets heads
    ``i*H/U .. (i+1)*H/U - 1``). ``lengths``: the token count of every rank of the group."""
    u, s = len(lengths), len(tensors)
    b, n, heads, dim = tensors[0].shape
    h = heads // u
    send = tensors[0].new_empty((u, s, b, n, h, dim))  # block i goes to rank i
    for i, t in enumerate(tensors):
        send[:, i].copy_(t.unflatten(2, (u, h)).permute(2, 0, 1, 3, 4))
    recv = all_to_all(
        send.view(u * s * b * n, h, dim),
        [s * b * n] * u,
        [s * b * length for length in lengths],
        group,
        "Ulysses all-to-all (tokens -> heads)",
    )
    out = recv.new_empty((s, b, sum(lengths), h, dim))
    row = token = 0
    for length in lengths:  # rank j's block [S, B, lengths[j], h, D] -> its place in the sequence
        out[:, :, token : token + length].copy_(recv[row : row + s * b * length].view(s, b, length, h, dim))
        row, token = row + s * b * length, token + length
    return list(out.unbind(0))


def heads_to_tokens(x: torch.Tensor, lengths: Sequence[int], index: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse for one tensor: x [B, sum(lengths), H/U, D] -> [B, lengths[index], H, D]."""
    u = len(lengths)
    b, _, h, dim = x.shape
    n = lengths[index]
    send = x.new_empty((b * sum(lengths), h, dim))  # rank j's tokens, [B, lengths[j], h, D] each
    row = token = 0
    for length in lengths:
        send[row : row + b * length].view(b, length, h, dim).copy_(x[:, token : token + length])
        row, token = row + b * length, token + length
    recv = all_to_all(
        send, [b * length for length in lengths], [b * n] * u, group, "Ulysses all-to-all (heads -> tokens)"
    )
    return recv.view(u, b, n, h, dim).permute(1, 2, 0, 3, 4).reshape(b, n, u * h, dim)


def pack_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: int, a: int = 0, e: int | None = None
) -> torch.Tensor:
    """The send buffer of the inference exchange: q, k, v [B, n, H, D] -> [U * n, 3 * B * hc * D] for heads
    ``a .. e - 1`` of each rank's share (default: all ``H / U``), token-major, so that what rank i receives,
    [sum(lengths), 3, B, hc, D], holds the attention's inputs as strided views. Pure tensor ops: inside a compiled
    block the copy fuses with the ops that produce q, k and v (their norms and RoPE)."""
    b, n, heads, dim = q.shape
    h = heads // u
    e = h if e is None else e
    parts = [t.unflatten(2, (u, h))[:, :, :, a:e].permute(2, 1, 0, 3, 4) for t in (q, k, v)]  # [U, n, B, hc, D]
    return torch.stack(parts, dim=2).reshape(u * n, 3 * b * (e - a) * dim)


def unpack_heads(back: torch.Tensor, u: int, b: int, dim: int) -> torch.Tensor:
    """The received outputs [U * n, B * hc * D] (rank i's rows: heads of its share) -> [B, n, U, hc, D], a view."""
    n = back.shape[0] // u
    return back.view(u, n, b, -1, dim).permute(2, 1, 0, 3, 4)


def start_exchange(send: torch.Tensor, lengths: Sequence[int], group: dist.ProcessGroup) -> PendingExchange:
    """Sends ``pack_heads``' buffer: this rank's n rows go to every rank of the group."""
    n = send.shape[0] // len(lengths)
    return start_all_to_all(send, [n] * len(lengths), list(lengths), group, "Ulysses all-to-all (tokens -> heads)")


def attend_and_return(
    recv: torch.Tensor, attend: Attend, lengths: Sequence[int], n: int, b: int, dim: int, group: dist.ProcessGroup
) -> PendingExchange:
    """Attention over the received [sum(lengths), 3 * B * hc * D] inputs, whose outputs start back to their
    tokens' ranks (``n`` rows from each): the returned exchange yields ``unpack_heads``' input."""
    total = sum(lengths)
    qkv = recv.view(total, 3, b, -1, dim)
    out = attend(*(qkv[:, i].transpose(0, 1) for i in range(3)))  # [B, total, hc, D]
    send = out.transpose(0, 1).contiguous()  # [total, B, hc, D]: rank j's tokens are rows of lengths[j]
    return start_all_to_all(
        send.view(total, -1), list(lengths), [n] * len(lengths), group, "Ulysses all-to-all (heads -> tokens)"
    )


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attend: Attend,
    lengths: Sequence[int],
    index: int,
    group: dist.ProcessGroup,
    head_chunks: int = 1,
) -> torch.Tensor:
    """Attention over the whole sequence of a Ulysses group, for this rank's tokens (inference, no autograd).

    q, k, v [B, n, H, D] (this rank's ``lengths[index]`` = n tokens, all heads) -> [B, n, H, D]: the same as
    ``heads_to_tokens(attend(*tokens_to_heads((q, k, v), ...)), ...)``. The ``H / U`` heads each rank
    attends over are cut into ``head_chunks`` groups (at most one head each); group j+1's exchange is
    started before group j's attention runs, and each group's outputs go back while the next one computes.
    """
    u = len(lengths)
    b, n, heads, dim = q.shape
    h = heads // u
    chunks = shard_bounds(h, max(1, min(head_chunks, h)))
    returning: list[tuple[int, int, PendingExchange]] = []
    pending = start_exchange(pack_heads(q, k, v, u, *chunks[0]), lengths, group)
    for j, (a, e) in enumerate(chunks):
        recv = pending.wait()
        if j + 1 < len(chunks):
            pending = start_exchange(pack_heads(q, k, v, u, *chunks[j + 1]), lengths, group)
        returning.append((a, e, attend_and_return(recv, attend, lengths, n, b, dim, group)))
    result = q.new_empty((b, n, u, h, dim))
    for a, e, exchange in returning:  # from rank i: [n, B, hc, D] of heads i*h + a .. i*h + e - 1
        result[:, :, :, a:e].copy_(unpack_heads(exchange.wait(), u, b, dim))
    return result.view(b, n, heads, dim)
