"""Reading tensors from raw files without pickle.

Accepts what users actually have on disk:

* a single ``.safetensors`` file;
* a sharded checkpoint (``*.safetensors.index.json`` plus its shards);
* a diffusers-layout folder holding one of the above (``config.json`` beside it);
* a ``.bin`` / ``.pt`` / ``.pth`` file, read with ``torch.load(weights_only=True)``.

Every failure names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from diffsynth_cog.errors import WeightsFileError
from diffsynth_cog.io.json_files import read_json

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights live: the files, and the config.json found beside them (if any)."""

    path: Path  # what the caller passed
    files: tuple[Path, ...]  # weight files, in a stable order
    config: dict[str, Any] | None  # parsed config.json next to the weights, if present
    config_path: Path | None


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, WeightsFileError)


def _shards_from_index(index_path: Path) -> tuple[Path, ...]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsFileError(f"{index_path}: no 'weight_map' in the shard index")
    names = sorted(set(weight_map.values()))
    files = tuple(index_path.parent / n for n in names)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WeightsFileError(f"{index_path}: shard(s) listed in the index are missing: {missing}")
    return files


def resolve_weights(path: str | os.PathLike[str]) -> WeightsSource:
    """Finds the weight files and config that ``path`` (a file or a folder) stands for."""
    p = Path(path)
    if not p.exists():
        raise WeightsFileError(f"{p}: no such file or folder")
    if p.is_file():
        if p.name.endswith(".index.json"):
            files = _shards_from_index(p)
        elif p.suffix in WEIGHT_SUFFIXES:
            files = (p,)
        else:
            raise WeightsFileError(f"{p}: not a weights file (expected one of {WEIGHT_SUFFIXES} or *.index.json)")
        folder = p.parent
    else:
        folder = p
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise WeightsFileError(f"{folder}: several shard indexes {[i.name for i in indexes]}; pass one of them")
        if indexes:
            files = _shards_from_index(indexes[0])
        else:
            candidates = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in SAFETENSORS_SUFFIXES)
            if not candidates:
                candidates = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in PICKLE_SUFFIXES)
            if not candidates:
                raise WeightsFileError(
                    f"{folder}: no weights found (looked for *.safetensors, a *.safetensors.index.json, "
                    f"or {PICKLE_SUFFIXES})"
                )
            files = tuple(candidates)
    found = read_config(folder)
    config, config_path = found if found is not None else (None, None)
    return WeightsSource(path=p, files=files, config=config, config_path=config_path)


def read_config(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Path] | None:
    """The config.json of the folder ``path`` is (or is in): (values, its path), or None when there is none."""
    p = Path(path)
    config_path = (p if p.is_dir() else p.parent) / "config.json"
    return (_read_json(config_path), config_path) if config_path.is_file() else None


def _check_safetensors_header(path: Path) -> dict[str, Any]:
    """Reads and validates the header, including that the file holds every byte it promises.

    safetensors itself catches a corrupt header but maps files lazily, so a truncated file
    would only fail (or crash) on first access of a missing tensor; we check up front.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise WeightsFileError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise WeightsFileError(f"{path}: corrupt safetensors header (length {n} > file size {size})")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsFileError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise WeightsFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise WeightsFileError(f"{path}: corrupt safetensors header entry for {key!r}") from e
    if 8 + n + end > size:
        raise WeightsFileError(
            f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, the file has {size}"
        )
    return header


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` dict of a safetensors file (empty if none)."""
    header = _check_safetensors_header(Path(path))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def tensor_shapes(source: WeightsSource) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor, read from headers only (no tensor data is touched)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in source.files:
        if f.suffix in SAFETENSORS_SUFFIXES:
            header = _check_safetensors_header(f)
            for k, info in header.items():
                if k != "__metadata__":
                    shapes[k] = tuple(int(s) for s in info["shape"])
        else:
            for k, t in _torch_load(f).items():
                shapes[k] = tuple(t.shape)
    return shapes


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types (pickle, zip, runtime); all mean "unreadable"
        raise WeightsFileError(f"{path}: cannot read as a weights-only torch checkpoint ({e})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsFileError(f"{path}: expected a dict of tensors")
    return obj


def iter_tensors(
    source: WeightsSource,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    skip: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (key, tensor) one at a time, so a loader never holds two copies of a large model.

    Keys for which ``skip(key)`` is true are not read at all (safetensors files; a pickle-free
    torch file is memory-mapped, so its skipped tensors are not read either).
    """
    seen: set[str] = set()
    for f in source.files:
        if f.suffix in SAFETENSORS_SUFFIXES:
            _check_safetensors_header(f)
            try:
                with safe_open(f, framework="pt", device=str(device)) as st:
                    for k in st.keys():
                        if k in seen:
                            raise WeightsFileError(f"{f}: key {k!r} appears in more than one shard")
                        seen.add(k)
                        if skip is not None and skip(k):
                            continue
                        t = st.get_tensor(k)
                        yield k, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)
            except SafetensorError as e:
                raise WeightsFileError(f"{f}: corrupt safetensors file ({e})") from e
        else:
            for k, t in _torch_load(f).items():
                if k in seen:
                    raise WeightsFileError(f"{f}: key {k!r} appears in more than one file")
                seen.add(k)
                if skip is not None and skip(k):
                    continue
                t = t.to(device)
                yield k, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)


def load_state_dict(
    path: str | os.PathLike[str] | WeightsSource,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Every tensor of a file, shard set or folder, as one dict."""
    source = path if isinstance(path, WeightsSource) else resolve_weights(path)
    return dict(iter_tensors(source, dtype=dtype, device=device))
