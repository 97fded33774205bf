"""Moving models between the CPU and the device to fit smaller GPUs.

Modes:
  * ``"none"``: every model stays on the device.
  * ``"model"``: models live on the CPU; ``using(name)`` brings one to the device for the
    duration of a ``with`` block (text encoder, then DiT, then VAE: one at a time on the GPU).
  * ``"sequential"``: like ``"model"`` for the VAE, but the DiT and the text encoder stay on the
    CPU and each layer with weights is moved in just before it runs and out right after
    (peak = one layer's weights + activations; every step pays the transfer of all weights).
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


class ModelOffloader:
    def __init__(self, device: torch.device, mode: str = "none") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown offload mode {mode!r}; valid: {MODES}")
        self.device = device
        self.mode = mode
        self.models: dict[str, nn.Module] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def register(self, models: dict[str, nn.Module]) -> None:
        self.models = dict(models)
        self.set_mode(self.mode)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown offload mode {mode!r}; valid: {MODES}")
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.mode = mode
        home = self.device if mode == "none" else torch.device("cpu")
        for model in self.models.values():
            model.to(home)
        if mode == "sequential":
            for name in _STREAMED:
                if name in self.models:
                    self._stream_layers(self.models[name])
        self._empty_cache()
        logger.info("offload mode: %s", mode)

    def _stream_layers(self, model: nn.Module) -> None:
        """Hooks that move each module owning weights to the device for its forward only.

        Parameters owned by a module that also has children (e.g. a learned position table on the
        root) are read directly by its forward, so they stay on the device.
        """
        for module in model.modules():
            own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            if not own:
                continue
            if any(True for _ in module.children()):
                for t in own:
                    t.data = t.data.to(self.device)
                continue
            self._hooks.append(module.register_forward_pre_hook(self._to_device))
            self._hooks.append(module.register_forward_hook(self._to_cpu))

    def _to_device(self, module: nn.Module, args: object) -> None:
        module.to(self.device)

    def _to_cpu(self, module: nn.Module, args: object, output: object) -> None:
        module.to("cpu")

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextmanager
    def using(self, name: str) -> Iterator[None]:
        """The named model is usable on the device inside the block."""
        model = self.models.get(name)
        move = model is not None and (self.mode == "model" or (self.mode == "sequential" and name not in _STREAMED))
        if move:
            model.to(self.device)
        try:
            yield
        finally:
            if move:
                model.to("cpu")
                self._empty_cache()
