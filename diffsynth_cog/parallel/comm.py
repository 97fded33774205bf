"""The collectives of the parallel parts, each named, so that a failure says what was going on.

Every collective here is a plain ``torch.distributed`` call on a process group. When one fails
(another rank died, hung past the process group's timeout, or took another code path) the error
becomes a :class:`ParallelError` naming the operation, this rank and the group, instead of a bare
transport message; the run stops on every rank rather than waiting forever. The time bound is the
process group's timeout (``init_process_group(timeout=...)``; the CLI's ``--dist-timeout``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from diffsynth_cog.parallel.layout import ParallelError

# torch >= 2.12 names it all_gather_single (all_gather_into_tensor: deprecated alias)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@contextlib.contextmanager
def collective(what: str, group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Turns a failure of the collectives inside into a :class:`ParallelError` that says ``what`` failed."""
    try:
        yield
    except RuntimeError as e:  # DistBackendError, DistNetworkError, gloo/NCCL transport errors
        if isinstance(e, ParallelError):
            raise
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        raise ParallelError(
            f"rank {dist.get_rank()}: {what} among ranks {ranks} failed: {type(e).__name__}: {str(e).strip()[:400]}. "
            "Another rank stopped (it died, hung past the process group's timeout, or was called differently): "
            "its own log says why."
        ) from e


def _all_to_all(
    send: torch.Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int], group: dist.ProcessGroup, what: str
) -> torch.Tensor:
    recv = send.new_empty((sum(recv_sizes), *send.shape[1:]))
    with collective(what, group):
        dist.all_to_all_single(recv, send.contiguous(), list(recv_sizes), list(send_sizes), group=group)
    return recv


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with autograd: its adjoint is the reverse exchange (send and receive sizes swapped),
    which hands every rank the gradients of the rows it sent."""

    @staticmethod
    def forward(ctx, send, send_sizes, recv_sizes, group, what):  # noqa: ANN001, ANN205
        ctx.sizes, ctx.group, ctx.what = (tuple(send_sizes), tuple(recv_sizes)), group, what
        return _all_to_all(send, send_sizes, recv_sizes, group, what)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        send_sizes, recv_sizes = ctx.sizes
        back = _all_to_all(grad, recv_sizes, send_sizes, ctx.group, f"{ctx.what}, backward")
        return back, None, None, None, None


def all_to_all(
    send: torch.Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int], group: dist.ProcessGroup, what: str
) -> torch.Tensor:
    """``send`` [sum(send_sizes), ...]: block i goes to the group's i-th rank; returns the received blocks
    [sum(recv_sizes), ...] in rank order. Sizes may differ between ranks (no padding). Differentiable: the
    backward pass runs the reverse exchange (every rank of the group must run it, as for the forward)."""
    if torch.is_grad_enabled() and send.requires_grad:
        return _AllToAll.apply(send, send_sizes, recv_sizes, group, what)
    return _all_to_all(send, send_sizes, recv_sizes, group, what)


class PendingExchange:
    """An all-to-all in flight (:func:`start_all_to_all`): :meth:`wait` makes the current stream wait for it
    and returns the received blocks. The send buffer is kept alive until then."""

    def __init__(self, work: dist.Work, send: torch.Tensor, recv: torch.Tensor, group, what: str) -> None:  # noqa: ANN001
        self._work, self._send, self.recv, self._group, self._what = work, send, recv, group, what

    def wait(self) -> torch.Tensor:
        with collective(self._what, self._group):
            self._work.wait()
        self._send = None
        return self.recv


def start_all_to_all(
    send: torch.Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int], group: dist.ProcessGroup, what: str
) -> PendingExchange:
    """:func:`all_to_all` without waiting (inference only: no autograd): the exchange runs on the backend's
    own stream (NCCL) or thread (gloo) while the caller goes on; ``.wait()`` on the result before using it.
    ``send`` must be contiguous and must not change until then."""
    recv = send.new_empty((sum(recv_sizes), *send.shape[1:]))
    with collective(what, group):
        work = dist.all_to_all_single(recv, send, list(recv_sizes), list(send_sizes), group=group, async_op=True)
    return PendingExchange(work, send, recv, group, what)


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup, what: str) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape everywhere), in the group's rank order."""
    size = dist.get_world_size(group)
    flat = tensor.reshape(1, -1).contiguous()
    out = flat.new_empty((size, flat.shape[1]))  # concatenated along dim 0, as every backend accepts
    with collective(what, group):
        _all_gather_single(out, flat, group=group)
    return [part.view(tensor.shape) for part in out.unbind(0)]


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup, what: str) -> torch.Tensor:
    """The sum over the group (a new tensor)."""
    out = tensor.clone()
    with collective(what, group):
        dist.all_reduce(out, group=group)
    return out


def broadcast(tensor: torch.Tensor, src: int, group: dist.ProcessGroup, what: str) -> torch.Tensor:
    """``tensor`` of global rank ``src``, in place on every rank of the group."""
    with collective(what, group):
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def broadcast_object(obj: Any, src: int, group: dist.ProcessGroup | None, what: str, device: torch.device) -> Any:
    """A small picklable object of global rank ``src`` on every rank of the group."""
    box = [obj]
    with collective(what, group):
        dist.broadcast_object_list(box, src=src, group=group, device=device)
    return box[0]


def barrier(group: dist.ProcessGroup | None, what: str, device: torch.device) -> None:
    """Waits for every rank of the group (an all-reduce, so it also works where barrier() needs a device)."""
    all_reduce(torch.zeros(1, device=device), group, what)
