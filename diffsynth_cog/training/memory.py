"""Memory switches of single-GPU LoRA training: checkpointed activations in pinned CPU memory, and the
optimizer that holds the LoRA's states.

Where a 129-frame ExVideo step (rank 64 on all eight Linear layers of the 5B) spends its memory: the
frozen bf16 base (10.4 GiB), the block inputs kept by gradient checkpointing (42 x [44,776 x 3072]
bf16 = 10.8 GiB), one block's recomputed activations during its backward, and the LoRA's weights,
gradients and AdamW moments (0.93 GiB each, the moments twice). The switches, each opt-in in the
job file:

* ``base_quantization`` (fp8 / int8 frozen base): ``diffsynth_cog.quantization`` (halves the base);
* ``activation_offload``: the checkpointed block inputs wait in pinned CPU memory between forward
  and backward (:func:`activation_offload`, this module);
* ``optimizer: "adamw8bit"``: bitsandbytes' 8-bit AdamW (a quarter of the moments' memory), or
  DeepSpeed's ZeRO-Offload (``offload_optimizer``, moments and the step on the CPU).

Activation offload modes:

* ``"stream"`` (:class:`StreamOffload`): saved-tensor hooks that copy each large saved tensor to
  pinned memory on a side CUDA stream while the next blocks compute, and in the backward bring the
  previous block's inputs back on that stream while the current block recomputes (prefetch). The
  compute stream waits only for a copy that is not done yet.
* ``"save_on_cpu"``: PyTorch's ``torch.autograd.graph.save_on_cpu(pin_memory=True)``: the same
  placement, with every copy on the compute stream (device-to-host copies queue behind the forward's
  kernels and the backward waits for each host-to-device copy). Kept to measure against.

With gradient checkpointing (non-reentrant), the only tensors a block leaves saved are its inputs
(the checkpoint saves them through ``save_for_backward``, so the hooks see them); the recomputed
activations inside a block go through the checkpoint's own hooks and stay on the GPU. Without
checkpointing every saved activation is offloaded (much slower). Parameters and tensors smaller than
:data:`OFFLOAD_MIN_BYTES` are left where they are.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Saved tensors below this size stay where they are (the text stream's 226 x 3072 block inputs are
# 1.4 MB; the video stream's at 129 frames 275 MB).
OFFLOAD_MIN_BYTES = 1 << 20


# --------------------------------------------------------------------------------------------- activations
@dataclass
class _Offloaded:
    """One saved tensor parked in CPU memory, in the order the forward saved it."""

    index: int
    device: torch.device
    host: torch.Tensor  # the CPU copy (pinned when it came from a GPU)
    fetched: torch.Tensor | None = None  # its way back to the device, started by a prefetch
    ready: Any = None  # the event after which `fetched` holds the data (CUDA only)
    used: bool = False  # handed to the backward once (a prefetch skips it then)


class StreamOffload:
    """Saved-tensor hooks that keep large saved tensors in pinned CPU memory, copying on a side stream.

    Use one instance per forward pass, around the forward (``with StreamOffload(): loss = ...``); the
    backward may run after the ``with`` block. ``prefetch``: how many earlier-saved tensors to start
    bringing back when one is needed (1: the previous block's input while this block recomputes).

    On a CPU device the "offload" is a copy into another CPU tensor: no memory is saved, but the same
    bookkeeping runs, which is what the CPU tests check (gradients bitwise equal to the plain path).
    """

    def __init__(self, *, prefetch: int = 1, min_bytes: int | None = None) -> None:
        self.prefetch = prefetch
        self.min_bytes = OFFLOAD_MIN_BYTES if min_bytes is None else min_bytes
        self.saved: list[_Offloaded] = []
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def __enter__(self) -> StreamOffload:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        # No reference cycle (self -> hooks -> bound methods -> self): the autograd graph alone keeps
        # this object, and so the pinned copies, alive until its backward is done.
        self._hooks = None

    @property
    def offloaded_bytes(self) -> int:
        return sum(e.host.numel() * e.host.element_size() for e in self.saved)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | _Offloaded:
        size = tensor.numel() * tensor.element_size()
        if isinstance(tensor, torch.nn.Parameter) or size < self.min_bytes or tensor.layout != torch.strided:
            return tensor
        if tensor.device.type != "cuda":
            host = tensor.detach().clone()  # CPU: the bookkeeping without a device
        else:
            compute, side = torch.cuda.current_stream(tensor.device), self._stream(tensor.device)
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            side.wait_stream(compute)  # the tensor is complete
            with torch.cuda.stream(side):
                host.copy_(tensor, non_blocking=True)
            # The caching allocator keeps the tensor's memory until the side stream's copy is done,
            # even though nothing references it once the forward moves on.
            tensor.record_stream(side)
        entry = _Offloaded(index=len(self.saved), device=tensor.device, host=host)
        self.saved.append(entry)
        return entry

    def _fetch(self, entry: _Offloaded) -> None:
        """Starts copying ``entry`` back to its device (once)."""
        if entry.fetched is not None:
            return
        if entry.device.type != "cuda":
            entry.fetched = entry.host
            return
        compute, side = torch.cuda.current_stream(entry.device), self._stream(entry.device)
        # Allocated on the compute stream, which uses it; the side stream first waits for the memory's
        # earlier users on the compute stream, and record_stream keeps it alive until the copy is done.
        fetched = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=entry.device)
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            fetched.copy_(entry.host, non_blocking=True)
            entry.ready = side.record_event()
        fetched.record_stream(side)
        entry.fetched = fetched

    def _unpack(self, packed: torch.Tensor | _Offloaded) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        self._fetch(packed)
        for earlier in self.saved[max(0, packed.index - self.prefetch) : packed.index][::-1]:
            if not earlier.used:
                self._fetch(earlier)
        if packed.ready is not None:
            torch.cuda.current_stream(packed.device).wait_event(packed.ready)
        tensor = packed.fetched
        # The backward owns it now: memory is freed as soon as the backward is done with it. A second
        # unpack (retain_graph) fetches again from the CPU copy.
        packed.fetched, packed.ready, packed.used = None, None, True
        return tensor


@contextlib.contextmanager
def activation_offload(mode: str) -> Iterator[StreamOffload | None]:
    """The activation-offload context of one forward pass: ``"none"``, ``"stream"`` or ``"save_on_cpu"``."""
    if mode == "none":
        yield None
    elif mode == "stream":
        with StreamOffload() as offload:
            yield offload
    elif mode == "save_on_cpu":
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            yield None
    else:
        raise ValueError(f"activation_offload: expected 'none', 'stream' or 'save_on_cpu', got {mode!r}")


# --------------------------------------------------------------------------------------------- optimizer
def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str,
    *,
    lr: float,
    weight_decay: float,
    deepspeed_offload: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer of the LoRA parameters.

    ``"adamw"``: torch's AdamW (fp32 moments on the parameters' device), or with ``deepspeed_offload``
    DeepSpeed's CPU Adam (ZeRO-Offload; DeepSpeed refuses torch's optimizers there). ``"adamw8bit"``:
    bitsandbytes' AdamW8bit (block-wise 8-bit moments, same update rule); every LoRA matrix gets 8-bit
    moments (bitsandbytes keeps tensors under 4096 values in fp32 by default; all LoRA matrices of the
    5B have >= 196,608, so this matters only for tiny test models).
    """
    params = list(params)
    if name == "adamw8bit":
        if deepspeed_offload:
            raise ValueError("optimizer 'adamw8bit' cannot be combined with DeepSpeed's offload_optimizer")
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError(
                "optimizer 'adamw8bit' needs the bitsandbytes package (pip install bitsandbytes, or "
                "pip install 'diffsynth-cog[train]')"
            ) from error
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, min_8bit_size=0)
    if name != "adamw":
        raise ValueError(f"optimizer: expected 'adamw' or 'adamw8bit', got {name!r}")
    if deepspeed_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, 8-bit codes and their scales)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
