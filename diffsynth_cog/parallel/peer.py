"""The Ulysses exchange through PyTorch's symmetric memory: copy engines write every chunk where it is read.

With NCCL (``parallel.ulysses``) the exchange costs SM work beyond the transfer itself: q, k and v are packed
token-major so that the received rows are attention inputs, the outputs are transposed back into that layout
before the return trip, and NCCL's own kernels move the bytes (and compete with attention for SMs when they
overlap). Within one host whose GPUs reach each other's memory (NVLink), PyTorch's symmetric memory
(``torch.distributed._symmetric_memory``, the engine of PyTorch's async tensor parallelism) maps every rank's
buffer into the others' address space; then a plain ``Tensor.copy_`` into a peer's buffer is a DMA by the GPU's
copy engines: no SM time, and the chunks land at their final place:

  1. each rank's q, k and v leave the DiT block as ``[U, B, n, hc, D]`` (rank u's heads first: every
     (rank, batch row) chunk is one contiguous ``[n, hc, D]`` block, laid out by the block's own fused kernel);
  2. every chunk is copied into its rank's receive buffer ``[3, B, T, hc, D]`` at the sender's token offset,
     so q, k and v arrive as contiguous ``[B, T, hc, D]`` attention inputs (T: the whole sequence);
  3. the attention output rows of each rank's tokens, contiguous in ``[B, T, hc, D]``, are copied into that
     rank's ``[U, B, n, hc, D]`` buffer, which the block unpermutes into ``[B, n, H, D]`` (one fused copy).

Symmetric memory's barrier (a kernel on the copy's stream) orders the copies: after it, every rank has written
what this rank reads. It waits at most the Ulysses group's timeout (the launch's, or ``enable_parallel``'s); a rank
that stops answering then ends the others with a CUDA error from the barrier (PyTorch's behaviour; not provoked in
our tests, which cover the NCCL transport's timeout on the CPU). With batch rows > 1 (a CFG batch), rows are
pipelined: row b+1's inputs travel while row b's attention computes, and row b's outputs travel while row b+1's
computes; the copies and barriers run on a side stream, the attention on the caller's.

:func:`copy_inputs` / :func:`copy_outputs` say which chunk goes where (plain tensor copies, checked on the CPU by
simulating the ranks in one process); :class:`PeerExchange` runs them on the GPUs; :func:`peer_transport_available`
decides, on every rank alike, whether this host can use it (``enable_parallel(ulysses_transport="auto")``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import socket
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from diffsynth_cog.models.attention import Attend
from diffsynth_cog.parallel.comm import all_gather, all_reduce
from diffsynth_cog.parallel.layout import ParallelError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=10)


def token_offsets(lengths: Sequence[int]) -> list[int]:
    """Where each rank's tokens start in the whole sequence."""
    return list(itertools.accumulate(lengths, initial=0))[:-1]


def to_peer_layout(t: torch.Tensor, ranks: int) -> torch.Tensor:
    """q, k or v [B, n, H, D] -> [U, B, n, H/U, D], rank u's heads first: each (rank, row) chunk is contiguous.
    Pure tensor ops: in a compiled block the copy fuses with the ops producing ``t`` (norms, RoPE)."""
    return t.unflatten(2, (ranks, t.shape[2] // ranks)).permute(2, 0, 1, 3, 4).contiguous()


def from_peer_layout(back: torch.Tensor) -> torch.Tensor:
    """The exchange's result [U, B, n, hc, D] (heads of rank u's share first) -> [B, n, U * hc, D]."""
    u, b, n, hc, dim = back.shape
    return back.permute(1, 2, 0, 3, 4).reshape(b, n, u * hc, dim)


def copy_inputs(
    recv: Sequence[torch.Tensor], sends: Sequence[torch.Tensor], lengths: Sequence[int], rank: int, row: int
) -> None:
    """Rank ``rank``'s share of the inputs of batch row ``row``: from each of its ``sends`` (q, k, v as
    ``[U, B, n, hc, D]``) the chunk of rank u's heads goes to token ``offset(rank)`` of rank u's receive buffer
    ``recv[u]`` ``[3, B, T, hc, D]``, which then holds q, k and v of the whole sequence for u's heads."""
    start, n = token_offsets(lengths)[rank], lengths[rank]
    for dst, buffer in enumerate(recv):
        for s, send in enumerate(sends):
            buffer[s, row, start : start + n].copy_(send[dst, row])


def copy_outputs(back: Sequence[torch.Tensor], out: torch.Tensor, lengths: Sequence[int], rank: int, row: int) -> None:
    """Rank ``rank``'s share of the outputs of batch row ``row``: the rows of rank u's tokens of its attention
    output ``out`` ``[T, hc, D]`` go to ``[rank, row]`` of rank u's buffer ``back[u]`` ``[U, B, n_u, hc, D]``."""
    for dst, (start, n) in enumerate(zip(token_offsets(lengths), lengths, strict=True)):
        back[dst][rank, row].copy_(out[start : start + n])


def _symm():  # noqa: ANN202
    import torch.distributed._symmetric_memory as symm

    return symm


def peer_transport_available(group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether the ranks of ``group`` can exchange through symmetric memory: CUDA with NCCL, one host, a trial
    buffer that maps. Collective over the WORLD (every rank calls it, each with its own group or None); every
    rank gets the same answer (False if any group cannot)."""
    if device.type != "cuda" or dist.get_backend() != "nccl":
        raise ValueError(
            f"the symmetric-memory exchange needs CUDA devices and NCCL; got {device}, {dist.get_backend()}"
        )
    with torch.cuda.device(device):  # the rank's own GPU, whether or not the caller made it current
        return agree_on_peer_transport(group, device, lambda: _rendezvous(1, torch.float32, device, group))


def agree_on_peer_transport(group: dist.ProcessGroup | None, device: torch.device, trial: Callable[[], object]) -> bool:
    """True on every rank if each rank's ``group`` lies on one host and ``trial()`` (collective within the group)
    succeeded on all of them; False on every rank otherwise. Collective over the WORLD."""
    host = hashlib.blake2b(socket.gethostname().encode(), digest_size=8).digest()
    mine = torch.tensor([int.from_bytes(host, "little", signed=True)], device=device)
    hosts = [int(h) for h in all_gather(mine, dist.group.WORLD, "comparing the ranks' hosts")]
    ok = group is None or len({hosts[r] for r in dist.get_process_group_ranks(group)}) == 1
    if group is not None and ok:
        try:  # its ranks took the same path so far
            trial()
        except Exception as e:  # noqa: BLE001 - any failure means "use NCCL"; say why
            logger.warning("symmetric memory is not usable here (%s: %s); Ulysses uses NCCL", type(e).__name__, e)
            ok = False
    failed = all_reduce(
        torch.tensor([0 if ok else 1], device=device), dist.group.WORLD, "agreeing on Ulysses' transport"
    )
    return int(failed.item()) == 0


def group_timeout(group: dist.ProcessGroup, device: torch.device) -> timedelta:
    """The timeout of ``group``'s collectives (``init_process_group(timeout=...)``; the CLI's ``--dist-timeout``),
    or 10 minutes where the backend does not say."""
    try:
        return group._get_backend(device).options._timeout  # no public accessor in torch 2.11
    except (AttributeError, RuntimeError, TypeError, ValueError):  # a backend without options: the default
        return DEFAULT_TIMEOUT


def _rendezvous(elements: int, dtype: torch.dtype, device: torch.device, group: dist.ProcessGroup):  # noqa: ANN202
    """A symmetric buffer of ``elements`` on every rank of ``group`` (collective; the same size everywhere), and
    the handle that maps the other ranks' buffers."""
    symm = _symm()
    enable = getattr(symm, "enable_symm_mem_for_group", None)
    if enable is not None and not symm.is_symm_mem_enabled_for_group(group.group_name):
        with warnings.catch_warnings():  # older torch needs the call; newer enables every group and warns
            warnings.simplefilter("ignore", FutureWarning)
            enable(group.group_name)
    buffer = symm.empty(elements, dtype=dtype, device=device)
    return buffer, symm.rendezvous(buffer, group.group_name)


class PeerExchange:
    """Symmetric buffers of one Ulysses group and the exchange around an attention call (module docstring)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, timeout: timedelta | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device = device
        # a barrier waits this long for the other ranks, then fails (as the group's collectives would)
        self.timeout_ms = int((timeout or group_timeout(group, device)).total_seconds() * 1000)
        self.pipeline_rows = True  # row b+1's copies run while row b attends (False: one stage, for comparison)
        self._buffer: torch.Tensor | None = None
        self._handle = None
        self._stream: torch.cuda.Stream | None = None

    def _ensure(self, elements: int, dtype: torch.dtype) -> None:
        """Grows the symmetric buffer (collective in the group: every rank needs the same size at the same call)."""
        if self._buffer is not None and self._buffer.dtype == dtype and self._buffer.numel() >= elements:
            return
        self._buffer = self._handle = None
        with torch.cuda.device(self.device):
            self._buffer, self._handle = _rendezvous(elements, dtype, self.device, self.group)

    def _views(self, rank: int, shape: tuple[int, ...], offset: int) -> torch.Tensor:
        return self._handle.get_buffer(rank, shape, self._buffer.dtype, offset)

    def _barrier(self) -> None:
        self._handle.barrier(channel=0, timeout_ms=self.timeout_ms)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Attend, lengths: Sequence[int]
    ) -> torch.Tensor:
        """q, k, v [U, B, n, hc, D] (this rank's n tokens, rank u's heads first) -> the attention outputs of this
        rank's tokens [U, B, n, hc, D] (rank u's heads first), a new tensor."""
        with torch.cuda.device(self.device):  # the barriers run on the current device's streams
            return self._exchange(q, k, v, attend, lengths)

    def _exchange(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Attend, lengths: Sequence[int]
    ) -> torch.Tensor:
        u, b, n, hc, dim = q.shape
        if u != self.size or len(lengths) != u or lengths[self.rank] != n:
            raise ParallelError(f"peer exchange: inputs {tuple(q.shape)} do not match shards {tuple(lengths)}")
        total, longest = sum(lengths), max(lengths)
        inputs_size = 3 * b * total * hc * dim
        self._ensure(inputs_size + u * b * longest * hc * dim, q.dtype)
        recv = [self._views(r, (3, b, total, hc, dim), 0) for r in range(u)]  # inputs, of every rank
        back = [self._views(r, (u, b, lengths[r], hc, dim), inputs_size) for r in range(u)]  # outputs
        sends = [t.contiguous() for t in (q, k, v)]
        main = torch.cuda.current_stream(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        pipelined = self.pipeline_rows and b > 1
        side = self._stream if pipelined else main
        stages = [range(row, row + 1) for row in range(b)] if pipelined else [range(b)]
        arrived = []
        side.wait_stream(main)
        with torch.cuda.stream(side):  # every stage's inputs, in order: the side stream runs ahead of the attention
            for rows in stages:
                for row in rows:
                    copy_inputs(recv, sends, lengths, self.rank, row)
                self._barrier()  # after it every rank's chunks of these rows are here
                arrived.append(torch.cuda.Event())
                arrived[-1].record(side)
        mine, outs = recv[self.rank], []  # outs: alive until main has waited for the side stream's copies
        for rows, event in zip(stages, arrived, strict=True):
            main.wait_event(event)
            outs.append(attend(*(mine[s, rows.start : rows.stop] for s in range(3))))  # [rows, T, hc, D]
            side.wait_stream(main)
            with torch.cuda.stream(side):  # these rows' outputs travel while the next rows attend
                for i, row in enumerate(rows):
                    copy_outputs(back, outs[-1][i], lengths, self.rank, row)
        with torch.cuda.stream(side):
            self._barrier()
        main.wait_stream(side)
        # A copy, not the buffer itself: a compiled block may reuse a custom op's output for its own later
        # tensors (the block's output, say), which the next block's exchange would then overwrite.
        return back[self.rank].clone()
