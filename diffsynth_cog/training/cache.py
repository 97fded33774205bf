"""The trainer's dataset over a latent cache: :class:`LatentCacheDataset`.

Its items are the cache's finished records (the merged manifests' current lines), in dataset-index order;
when it is opened, every record's file is checked against its manifest line and its header against
``cache_info.json``. The cache's layout (``cache_info.json`` and :class:`CacheInfo`, the records, the
manifests and reading them) is :mod:`diffsynth_cog.training.cache_layout`'s; its public names are importable
from here too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset

from diffsynth_cog.training.cache_layout import (
    _ST_DTYPES,
    CACHE_INFO,
    IMAGE_LATENTS_KEY,
    LATENTS_KEY,
    PROMPT_EMB_KEY,
    CacheError,
    CacheInfo,
    CacheRecord,
    header_key,
    read_manifests,
)
from diffsynth_cog.training.cache_layout import CACHE_FORMAT as CACHE_FORMAT
from diffsynth_cog.training.cache_layout import CACHE_VERSION as CACHE_VERSION
from diffsynth_cog.training.cache_layout import MANIFEST as MANIFEST
from diffsynth_cog.training.cache_layout import dtype_name as dtype_name
from diffsynth_cog.training.cache_layout import finished_records as finished_records
from diffsynth_cog.training.cache_layout import iter_manifest as iter_manifest
from diffsynth_cog.training.cache_layout import manifest_name as manifest_name
from diffsynth_cog.training.cache_layout import manifest_paths as manifest_paths
from diffsynth_cog.training.cache_layout import record_key as record_key
from diffsynth_cog.training.cache_layout import record_name as record_name
from diffsynth_cog.training.cache_layout import repair_manifest_tail as repair_manifest_tail

logger = logging.getLogger(__name__)


def _check_record_header(path: Path, info: CacheInfo) -> None:
    """Shapes and dtypes of a record from its header only (no tensor data read)."""
    expected = {LATENTS_KEY: list(info.latent_shape), PROMPT_EMB_KEY: list(info.prompt_emb_shape)}
    if info.image_latent_shape is not None:
        expected[IMAGE_LATENTS_KEY] = list(info.image_latent_shape)
    want_dtype = _ST_DTYPES[info.torch_dtype]
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            missing = [k for k in expected if k not in keys]
            if missing:
                raise CacheError(f"{path}: record lacks {missing}; it holds {sorted(keys)}")
            for key, shape in expected.items():
                tensor = handle.get_slice(key)
                found_shape, found_dtype = list(tensor.get_shape()), tensor.get_dtype()
                if found_shape != shape or found_dtype != want_dtype:
                    raise CacheError(
                        f"{path}: {key!r} is {found_dtype} {found_shape}, but {CACHE_INFO} says {want_dtype} {shape}; "
                        "the record comes from another prepare run (delete it and its manifest line, or re-prepare)"
                    )
    except SafetensorError as error:
        raise CacheError(f"{path}: unreadable record ({error}); delete it and re-run prepare to redo it") from error


class LatentCacheDataset(Dataset):
    """The records of a latent cache, ordered by dataset index.

    Item ``i`` is ``{"latents": [C, T, h, w], "prompt_emb": [L, d], "index": int}`` (CPU tensors in
    the cache's dtype; latents already scaled by the VAE scaling factor), plus ``"image_latents"``
    [C, 1, h, w] in an image-to-video cache. ``info`` is the cache's
    :class:`CacheInfo`; ``records`` the manifest entries (prompt and source video of each item).

    At construction every record's header is checked against ``cache_info.json`` (shapes, dtype,
    file size), so a bad file fails here, naming it, rather than hours into training. Pass
    ``validate=False`` to skip the per-file checks for very large caches.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], *, validate: bool = True) -> None:
        self.cache_dir = Path(cache_dir)
        self.info = CacheInfo.load(self.cache_dir)
        merged = read_manifests(self.cache_dir)
        if not merged:
            raise CacheError(f"{self.cache_dir}: the cache has no finished records (no manifest lines)")
        self.records: list[CacheRecord] = [merged[i] for i in sorted(merged)]
        if validate:
            for record in self.records:
                path = self.cache_dir / record.file
                if not path.is_file():
                    raise CacheError(
                        f"{path}: listed in the manifest (index {record.index}) but missing; re-run prepare to redo it"
                    )
                size = path.stat().st_size
                if size != record.bytes:
                    raise CacheError(
                        f"{path}: {size} bytes, but the manifest recorded {record.bytes}; the file was changed after "
                        "prepare finished it (delete it and re-run prepare to redo it)"
                    )
                if header_key(path) != record.key:
                    raise CacheError(
                        f"{path}: the file was encoded from other inputs than its manifest line (index "
                        f"{record.index}) says; a prepare run was interrupted: re-run prepare to finish it"
                    )
                _check_record_header(path, self.info)
        logger.info(
            "latent cache %s: %d records, latents %s, prompt_emb %s, %s",
            self.cache_dir,
            len(self.records),
            list(self.info.latent_shape),
            list(self.info.prompt_emb_shape),
            self.info.dtype,
        )

    def __len__(self) -> int:
        return len(self.records)

    @property
    def indices(self) -> list[int]:
        """Dataset indices of the items, in item order."""
        return [r.index for r in self.records]

    def __getitem__(self, position: int) -> dict[str, Any]:
        record = self.records[position]
        path = self.cache_dir / record.file
        try:
            tensors = load_file(str(path))  # safetensors: no pickle
        except (SafetensorError, OSError) as error:
            raise CacheError(f"{path}: cannot read record {record.index} ({error})") from error
        item = {"latents": tensors[LATENTS_KEY], "prompt_emb": tensors[PROMPT_EMB_KEY], "index": record.index}
        if IMAGE_LATENTS_KEY in tensors:
            item[IMAGE_LATENTS_KEY] = tensors[IMAGE_LATENTS_KEY]
        return item
