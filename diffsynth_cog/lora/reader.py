"""Opening a LoRA: a file, a folder holding one (or a shard index), or a state dict, read lazily.

:func:`open_lora` reads the names, shapes and dtypes of a LoRA's tensors from the safetensors headers
alone (safetensors only, never pickle), so that a 1 GB file is checked before any of its data is read;
:class:`LoRATensors` then fetches each tensor on demand. :func:`trained_attention` reads the attention
spec this trainer's export records in the header.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from diffsynth_cog.errors import LoRAError
from diffsynth_cog.loading.state_dict import resolve_weights, safetensors_metadata

TRAINED_ATTENTION_KEY = "diffsynth_cog_attention"  # the attention spec a LoRA was trained under (trainer's export)


@dataclass(frozen=True)
class LoRATensors:
    """Key -> (shape, dtype name) of a LoRA, plus a way to fetch each tensor on demand."""

    source: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors dtype names ("F32", "BF16", ...)
    metadata: dict[str, str]
    folder: Path | None  # where an adapter_config.json could sit
    files: dict[str, Path] = field(default_factory=dict)  # key -> file (path input)
    values: Mapping[str, torch.Tensor] | None = None  # state-dict input

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[str], torch.Tensor]]:
        """Yields ``get(key) -> tensor`` (CPU); file handles stay open for the whole block."""
        if self.values is not None:
            values = self.values
            yield lambda key: values[key].detach()
            return
        with contextlib.ExitStack() as stack:
            handles: dict[Path, Any] = {}
            try:
                for f in sorted(set(self.files.values())):
                    handles[f] = stack.enter_context(safe_open(f, framework="pt", device="cpu"))
            except SafetensorError as e:
                raise LoRAError(f"{self.source}: corrupt safetensors file ({e})") from e
            yield lambda key: handles[self.files[key]].get_tensor(key)


def _dtype_name(t: torch.Tensor) -> str:
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
    return names.get(t.dtype, str(t.dtype))


def open_lora(lora: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> LoRATensors:
    """A LoRA file, a folder holding one (or a shard index), or a state dict, read from headers only."""
    if isinstance(lora, Mapping):
        bad = [k for k, v in lora.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise LoRAError(f"LoRA state dict: values must be tensors; {bad[:3]} are not")
        return LoRATensors(
            source="LoRA state dict",
            shapes={k: tuple(v.shape) for k, v in lora.items()},
            dtypes={k: _dtype_name(v) for k, v in lora.items()},
            metadata={},
            folder=None,
            values=lora,
        )
    source = resolve_weights(lora)
    non_st = [str(f) for f in source.files if f.suffix != ".safetensors"]
    if non_st:
        raise LoRAError(f"{source.path}: LoRA files are read from safetensors only (no pickle); got {non_st}")
    if source.path.is_dir() and len(source.files) > 1 and not list(source.path.glob("*.index.json")):
        raise LoRAError(f"{source.path}: several safetensors files {[f.name for f in source.files]}; pass one")
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    files: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    for f in source.files:
        metadata.update(safetensors_metadata(f))  # also checks the header and that no byte is missing
        try:
            with safe_open(f, framework="pt", device="cpu") as st:
                for k in st.keys():
                    if k in files:
                        raise LoRAError(f"{f}: key {k!r} appears in more than one shard")
                    sl = st.get_slice(k)
                    shapes[k], dtypes[k], files[k] = tuple(sl.get_shape()), sl.get_dtype(), f
        except SafetensorError as e:
            raise LoRAError(f"{f}: corrupt safetensors file ({e})") from e
    name = str(source.files[0]) if len(source.files) == 1 else str(source.path)
    return LoRATensors(name, shapes, dtypes, metadata, source.files[0].parent, files=files)


def trained_attention(lora: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> str | None:
    """The attention spec (e.g. ``"window:2"``) a LoRA exported by this trainer was trained under, from its
    header; None for a LoRA trained dense or written elsewhere."""
    return open_lora(lora).metadata.get(TRAINED_ATTENTION_KEY)
