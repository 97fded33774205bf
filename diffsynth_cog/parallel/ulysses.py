"""Ulysses sequence parallelism: trade a shard of the tokens for a share of the heads (all-to-all).

Before attention, each of the ``U`` ranks of a Ulysses group holds all heads of its own tokens
(``lengths[i]`` tokens on rank i; they need not be equal). One ``all_to_all_single`` with uneven
split sizes gives every rank all the group's tokens for ``H / U`` of the heads, so any attention
kernel or attention part (a mask, say) runs on whole sequences; a second all-to-all brings the
outputs back. No padding, so nothing is ever added to the softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from diffsynth_cog.parallel.comm import all_to_all


def tokens_to_heads(x: torch.Tensor, lengths: Sequence[int], index: int, group: dist.ProcessGroup) -> torch.Tensor:
    """x [S, B, lengths[index], H, D] (S stacked tensors, e.g. q, k, v) -> [S, B, sum(lengths), H/U, D]:
    every rank's tokens, for this rank's share of the heads (heads ``index*H/U .. (index+1)*H/U - 1``)."""
    u = len(lengths)
    s, b, n, heads, dim = x.shape
    h = heads // u
    send = x.view(s, b, n, u, h, dim).permute(3, 0, 1, 2, 4, 5)  # [U, S, B, n, h, D]: block i goes to rank i
    recv = all_to_all(
        send.reshape(u * s * b * n, h, dim),
        [s * b * n] * u,
        [s * b * length for length in lengths],
        group,
        "Ulysses all-to-all (tokens -> heads)",
    )
    blocks = recv.split([s * b * length for length in lengths])
    return torch.cat([blk.view(s, b, length, h, dim) for blk, length in zip(blocks, lengths, strict=True)], dim=2)


def heads_to_tokens(x: torch.Tensor, lengths: Sequence[int], index: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse: x [B, sum(lengths), H/U, D] -> [B, lengths[index], H, D]."""
    u = len(lengths)
    b, _, h, dim = x.shape
    n = lengths[index]
    send = torch.cat([part.reshape(-1, h, dim) for part in x.split(list(lengths), dim=1)])
    recv = all_to_all(
        send, [b * length for length in lengths], [b * n] * u, group, "Ulysses all-to-all (heads -> tokens)"
    )
    return recv.view(u, b, n, h, dim).permute(1, 2, 0, 3, 4).reshape(b, n, u * h, dim)
