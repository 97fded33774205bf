"""Ring attention over shards of unequal length, on yunchang's ring communicator.

The ranks of a ring group hold consecutive shards of the token sequence (lengths ``lengths``, which
need not be equal). Each keeps its queries; keys and values travel around the ring: at step ``s``
rank ``r`` attends over the block of rank ``(r - s) mod R`` while the next block is in flight, and
merges the partial outputs by their log-sum-exp (yunchang's ``update_out_and_lse``, the numerically
stable form of ring-flash-attention). The point-to-point ring is yunchang's ``RingComm`` (NCCL or
gloo ``batch_isend_irecv``).

Why not yunchang's ring attention functions themselves: their receive buffers have the sender's
shape, so unequal shards must be padded, and their kernels cannot leave the padding out of the
softmax; their per-step kernel is one of yunchang's own (its ``AttnType.TORCH_CUDNN``/``TORCH_MATH``
return an all-zero log-sum-exp, so the merge is wrong with more than one rank, and the fused PyTorch
kernels it calls do not exist on the CPU), while ours must be the kernel the user chose. So blocks
are padded to the longest shard for the transfer and cut back to the sender's true length before
the kernel: padding never reaches the softmax, and the result is exact attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from diffsynth_cog.parallel.block_attention import BlockKernel
from diffsynth_cog.parallel.comm import collective
from diffsynth_cog.parallel.layout import ParallelError


def require_yunchang():  # noqa: ANN201
    """yunchang's ring communicator and merge; ParallelError saying what to install when it is missing."""
    try:
        from yunchang.ring.utils import RingComm, update_out_and_lse
    except ImportError as e:
        raise ParallelError(
            "ring attention needs the yunchang package (pip install yunchang, or the 'parallel' extra: "
            "pip install 'diffsynth-cog[parallel]'); Ulysses and CFG parallel need only torch"
        ) from e
    return RingComm, update_out_and_lse


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    lengths: Sequence[int],
    index: int,
    group: dist.ProcessGroup,
    kernel: BlockKernel,
    centre_keys: bool = False,
) -> torch.Tensor:
    """Exact attention of this rank's queries over the keys/values of every rank of ``group``.

    q, k, v: [B, lengths[index], H, D], this rank's shard (``index`` = its place in the ring, which is its
    rank in ``group``); returns [B, lengths[index], H, D]. ``centre_keys``: pass the mean of this rank's
    keys to the kernel as the offset to subtract from every block (fp8 kernels).
    """
    ring_comm, update_out_and_lse = require_yunchang()
    size = len(lengths)
    b, n, heads, dim = q.shape
    if n != lengths[index] or k.shape[1] != n:
        raise ParallelError(f"ring attention: shard {index} has {n} tokens, its plan {lengths[index]}")
    longest = max(lengths)
    kv = q.new_empty((2 * b, longest, heads, dim))  # [K; V], padded to the longest shard (padding never read)
    kv[:b, :n] = k
    kv[b:, :n] = v
    offset = k.float().mean(dim=1, keepdim=True) if centre_keys and n else None
    comm = ring_comm(group)
    out = lse = None
    for step in range(size):
        pending = step + 1 < size
        if pending:
            with collective(f"ring attention step {step + 1}/{size} (send keys/values)", group):
                incoming = comm.send_recv(kv)
                comm.commit()
        valid = lengths[(index - step) % size]  # the sender's true length: its padding is cut off
        if n and valid:
            block_out, block_lse = kernel(q, kv[:b, :valid], kv[b:, :valid], offset)
            out, lse = update_out_and_lse(out, lse, block_out, block_lse)
        if pending:
            with collective(f"ring attention step {step + 1}/{size} (receive keys/values)", group):
                comm.wait()
            kv = incoming
    if out is None:  # an empty shard (more ranks than tokens)
        return q.new_empty(q.shape)
    return out.to(q.dtype)
