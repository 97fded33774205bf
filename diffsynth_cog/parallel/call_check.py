"""Every rank of a generation must make the same call: fingerprints of the arguments, compared.

A rank called with another prompt, seed or size would compute its share of a different video and
the ranks would mix the two without an error (or hang in collectives of different shapes). So before
any work each rank hashes every option of the call (the pipeline passes its ``GenerationOptions`` field by
field, with the generator), the ranks all-gather the hashes, and if any differ all of them raise the same
:class:`ParallelError` naming the options and the ranks.

Tensors are fingerprinted by shape, dtype, their float64 sum and a strided sample of their bytes
(a large input video costs milliseconds, not a full hash); images by their pixels; generators by
their state; dataclass values (a ``WindowSpec``, a ``StepCacheSpec``, whole options) by their fields; callables
are not compared (each rank may log differently).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import types
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from diffsynth_cog.parallel.comm import all_gather
from diffsynth_cog.parallel.layout import ParallelError

_SAMPLE = 1 << 16  # elements of a tensor that enter its fingerprint


def _canonical(value: Any) -> bytes:
    if value is None or isinstance(value, bool | int | float | str):
        return repr(value).encode()
    if isinstance(value, os.PathLike):
        return repr(os.fspath(value)).encode()
    if isinstance(value, torch.Tensor):
        t = value.detach()
        flat = t.reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLE)].cpu().contiguous()
        total = 0.0 if t.is_complex() else t.double().sum().item()
        return f"tensor{tuple(t.shape)}{t.dtype}{total!r}".encode() + sample.view(torch.uint8).numpy().tobytes()
    if isinstance(value, torch.Generator):
        return b"generator" + value.get_state().numpy().tobytes()
    if isinstance(value, list | tuple):
        return b"[" + b",".join(_canonical(v) for v in value) + b"]"
    if isinstance(value, Mapping):
        return b"{" + b",".join(_canonical(k) + b":" + _canonical(v) for k, v in sorted(value.items())) + b"}"
    if hasattr(value, "tobytes") and hasattr(value, "mode"):  # a PIL image
        return f"image{value.size}{value.mode}".encode() + value.tobytes()
    if isinstance(value, types.FunctionType | types.MethodType | types.BuiltinFunctionType | functools.partial):
        return b"callable"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # by its fields, slotted or not
        named = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.compare and f.name[0] != "_"}
        return type(value).__name__.encode() + _canonical(named)
    if hasattr(value, "__dict__"):  # parts (StepCache, TileSpec, attention parts): their plain settings
        public = {k: _settings(v) for k, v in vars(value).items() if not k.startswith("_")}
        return type(value).__name__.encode() + _canonical(public)
    return repr(value).encode()


def _settings(value: Any) -> Any:
    return value if isinstance(value, None | bool | int | float | str | torch.Tensor) else repr(type(value))


def fingerprint(value: Any) -> int:
    """A signed 64-bit hash of ``value`` that is equal on every rank for equal values."""
    return int.from_bytes(hashlib.blake2b(_canonical(value), digest_size=8).digest(), "little", signed=True)


def check_same_call(
    arguments: Mapping[str, Any], group: dist.ProcessGroup, ranks: list[int], device: torch.device
) -> None:
    """Raises ParallelError on every rank of ``group`` unless all of them passed equal ``arguments``."""
    names = sorted(arguments)
    mine = torch.tensor([fingerprint(arguments[name]) for name in names], dtype=torch.int64, device=device)
    table = torch.stack(all_gather(mine, group, "comparing the call's arguments across ranks")).cpu()  # [ranks, n]
    differ = [name for j, name in enumerate(names) if not bool((table[:, j] == table[0, j]).all())]
    if differ:
        detail = "; ".join(
            f"{name}: "
            + ", ".join(f"rank {r} #{int(table[i, names.index(name)]) & 0xFFFF:04x}" for i, r in enumerate(ranks))
            for name in differ
        )
        raise ParallelError(
            f"the ranks of one generation were called with different arguments ({detail}): every rank must "
            "call the pipeline with the same arguments (same prompt, seed, sizes and inputs); rank 0's "
            "arguments are not copied to the others"
        )
