"""Moving models between the CPU and the device to fit smaller GPUs.

Modes:
  * ``"none"``: every model stays on the device.
  * ``"model"``: models live on the CPU; ``using(name)`` brings one to the device for the
    duration of a ``with`` block (text encoder, then DiT, then VAE: one at a time on the GPU).
  * ``"sequential"``: like ``"model"`` for the VAE, but inside ``using`` the DiT and the text
    encoder stream their layers: each module that owns weights is brought to the device just before
    its forward and sent home right after (peak = one layer's weights + activations; every step
    pays the transfer of all weights). The root module's own tensors (the DiT's learned position
    table, read by ``CogDiT.embed``, which is called without the root's forward) stay on the device
    for the whole block.

Outside ``using`` (in ``"model"`` and ``"sequential"`` mode) every tensor of a registered model is
in its *home*: one persistent CPU copy, pinned when the device is CUDA, so bringing a model in is
one fast host-to-device copy and sending it out only drops the device copy.

Ownership: who holds a home copy
--------------------------------
The home belongs to the parameter or buffer object itself: a small record stored on the tensor
(attribute ``_diffsynth_offload_home``) holds the CPU copy and, while the tensor is on the device,
the signature (device, address, dtype, shape, strides) of the device copy the offloader put there.
Nothing is keyed by ``id()`` and the offloader keeps no list of tensors. The tensors are found by
walking the registered models (``Module.parameters()`` / ``buffers()``) at every transition
(``set_mode``, entering and leaving ``using``, each streamed layer's forward). So:

* a layer replaced by ``quantize_dit`` or ``inject_lora`` takes its tensors, and their homes, with
  it when it is freed: a home can never be handed to another tensor;
* layers added at any time are found at the next transition; streaming hooks are installed when a
  ``using`` block is entered, so layers added between blocks are streamed too;
* a tensor without a record (a new layer, a reassigned ``layer.weight = ...``, a buffer replaced by
  ``module.to``), or whose data is no longer what the offloader put there (someone assigned
  ``tensor.data``), is taken as it is now: its current data becomes its home;
* tied tensors (one Parameter under two names, like T5's shared embedding) share one record.

Edits to weights (``merge_lora``, ``restore_base_weights``, ``load_lora_state_dict``):

* outside ``using`` a tensor's data *is* its home, so an in-place edit changes the home directly;
* inside ``using`` it changes the device copy; leaving the block copies the tensor back to its home
  when its version counter moved (an in-place edit through the tensor; edits through ``.data``
  are invisible to the counter and are lost).

The device copy is a real copy even when the device is the CPU: the CPU runs the same bookkeeping
as a GPU (and the tests can tell the home from the device copy).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

MODES = ("none", "model", "sequential")
_STREAMED = ("dit", "text_encoder")  # models large enough to stream layer by layer
_RECORD_ATTR = "_diffsynth_offload_home"

_Signature = tuple[torch.device, int, torch.dtype, torch.Size, tuple[int, ...]]


def _signature(t: torch.Tensor) -> _Signature:
    """What a tensor's data is: two tensors with the same signature view the same memory the same way."""
    return (t.device, t.data_ptr(), t.dtype, t.shape, t.stride())


def _version(t: torch.Tensor) -> int:
    """The tensor's in-place edit counter (tensors made under ``torch.inference_mode`` have none)."""
    try:
        return t._version
    except RuntimeError:
        return -1


@dataclass(eq=False)
class _Home:
    """Stored on a parameter or buffer: its CPU home and, while on the device, what was put there."""

    cpu: torch.Tensor
    on_device: _Signature | None = None  # signature of the device copy we placed; None: at home
    version: int = 0  # the tensor's version counter when the device copy was placed

    def expected(self) -> _Signature:
        return self.on_device if self.on_device is not None else _signature(self.cpu)


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))


def _all_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of the model, each once (tied tensors included once)."""
    return list(model.parameters()) + list(model.buffers())


class ModelOffloader:
    """Places the registered models' weights according to the mode; see the module docstring.

    ``register(models)`` takes name -> module (``"dit"`` and ``"text_encoder"`` are streamed in
    ``"sequential"`` mode); ``set_mode(mode)`` moves them; ``with using(name):`` makes one usable
    on the device. Layers may be replaced, added, merged into or restored at any time outside a
    ``using`` block (and in place inside one).
    """

    def __init__(self, device: torch.device, mode: str = "none", pin_memory: bool = True) -> None:
        _check_mode(mode)
        self.device = torch.device(device)
        self.mode = mode
        self.pin_memory = pin_memory and self.device.type == "cuda"
        self.models: dict[str, nn.Module] = {}
        self._active: dict[str, int] = {}  # name -> depth of the open ``using`` blocks

    def register(self, models: dict[str, nn.Module]) -> None:
        self._refuse_inside_using("register")
        self.models = dict(models)
        self.set_mode(self.mode)

    def home_of(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The CPU home of a parameter or buffer, or None if it has none (mode ``"none"``, a tensor
        not seen since it was created, or one whose data was replaced since)."""
        record = getattr(tensor, _RECORD_ATTR, None)
        if record is None or _signature(tensor) != record.expected():
            return None
        return record.cpu

    # -- one tensor ----------------------------------------------------------------------------

    def _record(self, t: torch.Tensor) -> _Home:
        """t's home record; a new one from t's current data if t has none or its data was replaced."""
        record = getattr(t, _RECORD_ATTR, None)
        if record is None or _signature(t) != record.expected():
            record = _Home(self._cpu_copy(t.data))
            setattr(t, _RECORD_ATTR, record)
            t.data = record.cpu
        return record

    def _cpu_copy(self, data: torch.Tensor) -> torch.Tensor:
        """The data itself when it can serve as a home (on the CPU, pinned if wanted), else a CPU copy."""
        if data.device.type == "cpu" and (not self.pin_memory or data.is_pinned()):
            return data
        cpu = data.to("cpu")
        if self.pin_memory:
            try:
                cpu = cpu.pin_memory()
            except RuntimeError as e:  # not enough page-locked memory: pageable still works, slower
                logger.warning("could not pin %s bytes of host memory (%s); offloading unpinned", cpu.nbytes, e)
                self.pin_memory = False
        return cpu

    def _to_device(self, t: torch.Tensor) -> None:
        record = self._record(t)
        if record.on_device is None:
            t.data = record.cpu.to(self.device, non_blocking=self.pin_memory, copy=True)
            record.on_device, record.version = _signature(t), _version(t)

    def _to_home(self, t: torch.Tensor) -> None:
        record = self._record(t)
        if record.on_device is not None:
            if _version(t) != record.version:  # edited in place on the device: keep the edit
                record.cpu.copy_(t.data)
            record.on_device = None
            t.data = record.cpu

    def _to_device_for_good(self, t: torch.Tensor) -> None:
        """Mode ``"none"``: the tensor's current data moves to the device and its record is dropped."""
        t.data = t.data.to(self.device)
        if getattr(t, _RECORD_ATTR, None) is not None:
            delattr(t, _RECORD_ATTR)

    # -- streaming hooks (sequential mode) -----------------------------------------------------

    def _bring_in(self, module: nn.Module, args: Any) -> None:
        for t in _own_tensors(module):
            self._to_device(t)

    def _send_home(self, module: nn.Module, args: Any, output: Any) -> None:
        for t in _own_tensors(module):
            self._to_home(t)

    def _stream(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Homes every tensor (new layers included), puts the root's own on the device and hooks
        every other module that owns tensors."""
        for t in _all_tensors(model):
            self._to_home(t)
        for t in _own_tensors(model):
            self._to_device(t)
        hooks = []
        for module in model.modules():
            if module is not model and _own_tensors(module):
                hooks.append(module.register_forward_pre_hook(self._bring_in))
                hooks.append(module.register_forward_hook(self._send_home))
        return hooks

    # -- modes ---------------------------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        _check_mode(mode)
        self._refuse_inside_using(f"set_mode({mode!r})")
        self.mode = mode
        for model in self.models.values():
            for t in _all_tensors(model):
                if mode == "none":
                    self._to_device_for_good(t)
                else:
                    self._to_home(t)
        self._empty_cache()
        logger.info("offload mode: %s", mode)

    def _refuse_inside_using(self, what: str) -> None:
        if self._active:
            raise RuntimeError(
                f"{what} inside `with offloader.using(...)` for {sorted(self._active)}: leave the block first"
            )

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextmanager
    def using(self, name: str) -> Iterator[None]:
        """The named model is usable on the device inside the block.

        On leaving, every tensor of the model goes home, including tensors of layers created inside
        the block. Blocks for the same name may nest (only the outermost one moves weights).
        """
        model = self.models.get(name)
        if model is None or self.mode == "none" or self._active.get(name):
            self._active[name] = self._active.get(name, 0) + 1
            try:
                yield
            finally:
                self._leave(name)
            return
        self._active[name] = 1
        hooks: list[torch.utils.hooks.RemovableHandle] = []
        try:
            if self.mode == "sequential" and name in _STREAMED:
                hooks = self._stream(model)
            else:
                for t in _all_tensors(model):
                    self._to_device(t)
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for t in _all_tensors(model):
                self._to_home(t)
            self._leave(name)
            self._empty_cache()

    def _leave(self, name: str) -> None:
        self._active[name] -= 1
        if not self._active[name]:
            del self._active[name]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown offload mode {mode!r}; valid: {MODES}")


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``t``. From a CUDA device it lands in pinned memory (PyTorch's caching host allocator, so a
    repeated size reuses its block): one DMA instead of a pageable copy staged through the driver, which for a
    129-frame video takes tenths of a second. If pinning fails, a plain copy."""
    if t.device.type != "cuda":
        return t.cpu()
    try:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    except RuntimeError as e:  # no pinnable memory left
        logger.warning("could not pin %s bytes of host memory (%s); copying unpinned", t.nbytes, e)
        return t.cpu()
    return host.copy_(t)
