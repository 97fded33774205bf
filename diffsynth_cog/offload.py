"""Moving models between the CPU and the device to fit smaller GPUs.

Modes:
  * ``"none"``: every model stays on the device.
  * ``"model"``: models live on the CPU; ``using(name)`` brings one to the device for the
    duration of a ``with`` block (text encoder, then DiT, then VAE: one at a time on the GPU).
  * ``"sequential"``: like ``"model"`` for the VAE, but the DiT and the text encoder stay on the
    CPU and each layer with weights is moved in just before it runs and out right after
    (peak = one layer's weights + activations; every step pays the transfer of all weights).

Offloaded weights keep one persistent CPU copy, pinned when possible: bringing a model in is one
fast host-to-device copy, and sending it out only drops the device copy (inference does not change
weights, so nothing has to be copied back). Merge LoRAs before generating, not inside a ``using`` block.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

logger = logging.getLogger(__name__)

MODES = ("none", "model", "sequential")
_STREAMED = ("dit", "text_encoder")  # models large enough to stream layer by layer


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))


class ModelOffloader:
    def __init__(self, device: torch.device, mode: str = "none", pin_memory: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown offload mode {mode!r}; valid: {MODES}")
        self.device = device
        self.mode = mode
        self.pin_memory = pin_memory and device.type == "cuda"
        self.models: dict[str, nn.Module] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._home: dict[int, torch.Tensor] = {}  # id(tensor) -> its CPU copy while offloaded

    def register(self, models: dict[str, nn.Module]) -> None:
        self.models = dict(models)
        self.set_mode(self.mode)

    # -- moving tensors ------------------------------------------------------------------------

    def _to_cpu_home(self, tensors: list[torch.Tensor]) -> None:
        """Makes each tensor's data its (pinned) CPU copy."""
        for t in tensors:
            if id(t) in self._home:
                t.data = self._home[id(t)]
                continue
            cpu = t.data.to("cpu")
            if self.pin_memory:
                try:
                    cpu = cpu.pin_memory()
                except RuntimeError as e:  # not enough page-locked memory: pageable still works, slower
                    logger.warning("could not pin %s of host memory (%s); offloading unpinned", cpu.nbytes, e)
                    self.pin_memory = False
            self._home[id(t)] = cpu
            t.data = cpu

    def _to_device(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            home = self._home.get(id(t), t.data)
            t.data = home.to(self.device, non_blocking=self.pin_memory)

    def _drop_device_copies(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            if id(t) in self._home:
                t.data = self._home[id(t)]
            else:  # a tensor created after offloading was set up: keep it, on the CPU
                self._to_cpu_home([t])

    # -- modes ---------------------------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown offload mode {mode!r}; valid: {MODES}")
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.mode = mode
        for model in self.models.values():
            tensors = list(model.parameters()) + list(model.buffers())
            if mode == "none":
                self._to_device(tensors)
            else:
                self._to_cpu_home(tensors)
        if mode == "none":
            self._home.clear()
        if mode == "sequential":
            for name in _STREAMED:
                if name in self.models:
                    self._stream_layers(self.models[name])
        self._empty_cache()
        logger.info("offload mode: %s", mode)

    def _stream_layers(self, model: nn.Module) -> None:
        """Hooks that bring each module owning weights to the device for its forward only.

        Parameters owned by a module that also has children (e.g. a learned position table on the
        root) are read directly by its forward, so they stay on the device.
        """
        for module in model.modules():
            own = _own_tensors(module)
            if not own:
                continue
            if any(True for _ in module.children()):
                self._to_device(own)
                continue
            self._hooks.append(module.register_forward_pre_hook(lambda m, args: self._to_device(_own_tensors(m))))
            self._hooks.append(
                module.register_forward_hook(lambda m, args, out: self._drop_device_copies(_own_tensors(m)))
            )

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextmanager
    def using(self, name: str) -> Iterator[None]:
        """The named model is usable on the device inside the block."""
        model = self.models.get(name)
        move = model is not None and (self.mode == "model" or (self.mode == "sequential" and name not in _STREAMED))
        tensors = list(model.parameters()) + list(model.buffers()) if move else []
        if move:
            self._to_device(tensors)
        try:
            yield
        finally:
            if move:
                self._drop_device_copies(tensors)
                self._empty_cache()
