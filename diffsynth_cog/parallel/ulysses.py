"""Ulysses sequence parallelism: trade a shard of the tokens for a share of the heads (all-to-all).

Before attention, each of the ``U`` ranks of a Ulysses group holds all heads of its own tokens
(``lengths[i]`` tokens on rank i; they need not be equal). One ``all_to_all_single`` with uneven
split sizes gives every rank all the group's tokens for ``H / U`` of the heads, so any attention
kernel or attention part (a mask, say) runs on whole sequences; a second all-to-all brings the
outputs back. No padding, so nothing is ever added to the softmax. Each direction costs one copy
into the send buffer and one out of the receive buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from diffsynth_cog.parallel.comm import all_to_all


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
