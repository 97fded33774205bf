"""The prepare step's side of the cache folder: its settings, the folder itself, its records.

Before anything is encoded, the shapes and settings every record will have are worked out from the
encoders' configs (``_cache_info``; the clip geometry checked against the model family, :func:`check_clip`),
and ``cache_info.json`` is written, or checked against an earlier run's (``_write_or_check_info``).
:func:`check_cache_dir` tells whether a folder can be a cache at all; ``_drop_stale`` removes the records
whose inputs changed or left the dataset; :func:`write_record` writes one record atomically. The layout of
the folder is :mod:`diffsynth_cog.training.cache_layout`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from diffsynth_cog.configs import DiTConfig, check_num_frames, frame_multiple
from diffsynth_cog.errors import shorten
from diffsynth_cog.io.atomic import save_safetensors_atomic, write_json_atomic
from diffsynth_cog.models.text_encoder import CogTextEncoder
from diffsynth_cog.models.vae import CogVAE, CogVAEEncoder
from diffsynth_cog.pipeline.sampling import image_latent_scale, latent_plan
from diffsynth_cog.training.cache_layout import CACHE_INFO, CacheError, CacheInfo, CacheRecord, dtype_name
from diffsynth_cog.training.data import VideoSample

logger = logging.getLogger(__name__)


def write_record(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> int:
    """Writes a safetensors record atomically (see :mod:`diffsynth_cog.io.atomic`); returns its size in bytes.

    The folder is fsynced after the rename, so the record's name is on disk before the manifest
    line that vouches for it is appended (and fsynced) by the caller.
    """
    save_safetensors_atomic(path, tensors, metadata)
    return path.stat().st_size


def check_clip(dit_config: DiTConfig | None, num_frames: int, height: int, width: int) -> None:
    """Checks the clip geometry against the family of the transformer the cache is for, before anything loads:
    ``frame_multiple`` k+1 frames, sides multiples of ``size_multiple`` (16) and, on CogVideoX 1.5, within the
    DiT's position grid (``sampling.latent_plan``, the pipeline's rule); ValueError naming the value and the rule.
    ``dit_config`` None: nothing to check here (the VAE's factors are checked when the encoders are loaded)."""
    if dit_config is not None:
        latent_plan(dit_config, num_frames, height, width)


def _cache_info(
    text_encoder: CogTextEncoder,
    vae_encoder: CogVAEEncoder | CogVAE,
    *,
    num_frames: int,
    height: int,
    width: int,
    frame_interval: int,
    dtype: torch.dtype,
    sample_posterior: bool,
    seed: int,
    tiled: bool,
    model_paths: Mapping[str, str | os.PathLike[str]] | None,
    image_latents: bool = False,
    dit_config: DiTConfig | None = None,
) -> CacheInfo:
    """The shapes every record will have, computed from the configs (no encoding needed)."""
    check_clip(dit_config, num_frames, height, width)
    config = vae_encoder.config
    r, s = config.temporal_compression_ratio, config.spatial_compression
    check_num_frames(num_frames, frame_multiple(r))
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % s:
            raise ValueError(f"{name} must be a positive multiple of the VAE's spatial compression {s}, got {size}")
    return CacheInfo(
        latent_shape=(config.latent_channels, (num_frames - 1) // r + 1, height // s, width // s),
        prompt_emb_shape=(text_encoder.max_length, text_encoder.d_model),
        dtype=dtype_name(dtype),
        scaling_factor=float(config.scaling_factor),
        num_frames=num_frames,
        height=height,
        width=width,
        frame_interval=frame_interval,
        temporal_compression_ratio=r,
        spatial_compression=s,
        posterior="sample" if sample_posterior else "mean",
        seed=seed if sample_posterior else None,
        tiled=tiled,
        model_paths={k: str(v) for k, v in (model_paths or {}).items()},
        image_latent_shape=(config.latent_channels, 1, height // s, width // s) if image_latents else None,
        image_latent_scale=_image_scale(config, dit_config) if image_latents else None,
    )


def _image_scale(vae_config: object, dit_config: DiTConfig | None) -> float:
    """What the image latents are multiplied by: as the I2V pipeline scales its input image's latents for this
    family (``sampling.image_latent_scale``; 1.5 I2V: divided by the factor)."""
    family = dit_config.family if dit_config is not None else None
    invert = bool(getattr(vae_config, "invert_scale_latents", False))
    return image_latent_scale(family, float(vae_config.scaling_factor), invert)


def _write_or_check_info(cache_dir: Path, info: CacheInfo) -> None:
    """Writes cache_info.json, or checks that an existing cache was prepared with the same settings."""
    path = cache_dir / CACHE_INFO
    if not path.is_file():
        write_json_atomic(path, info.to_dict())
        return
    existing = CacheInfo.load(cache_dir)
    differences = existing.differences(info)
    if differences:
        raise CacheError(
            f"{cache_dir} holds a cache prepared with other settings ({'; '.join(differences)}; cache vs this run). "
            "Its records cannot be mixed with new ones: use another cache folder, or delete this one."
        )
    if existing.tiled != info.tiled:
        logger.warning(
            "%s was prepared with tiled=%s, this run uses tiled=%s; tiled latents differ from untiled ones (per-tile normalisation)",
            cache_dir,
            existing.tiled,
            info.tiled,
        )
    if dict(existing.model_paths) != dict(info.model_paths):
        logger.warning(
            "%s was prepared from %s, this run loads %s; make sure they are the same weights",
            cache_dir,
            dict(existing.model_paths),
            dict(info.model_paths),
        )


def check_cache_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """The cache folder, if it can be one: a folder (new, or an earlier cache) that can be written; else a
    CacheError that says what is in the way. Nothing is created here."""
    from diffsynth_cog.io.atomic import check_output_path

    out = Path(cache_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CacheError(f"--cache {out} is a file; the latent cache is a folder (a new one, or an earlier cache)")
    if out.is_dir() and any(out.iterdir()) and not (out / CACHE_INFO).is_file():
        raise CacheError(
            f"--cache {out} is a folder with other files and no {CACHE_INFO}, not a latent cache; give a new "
            "folder (or an earlier cache)"
        )
    try:
        check_output_path(out / CACHE_INFO, what="--cache")
    except ValueError as error:
        raise CacheError(str(error)) from None
    return out


def _drop_stale(
    cache_dir: Path, manifest: Path, stale: Sequence[CacheRecord], samples: Mapping[int, VideoSample]
) -> None:
    """Removes records whose inputs changed (re-encoded below) or left the dataset, and notes each in this rank's
    manifest, so that neither this run nor a trainer ever reads them, even if the run stops before the redo."""
    if not stale:
        return
    with manifest.open("a", encoding="utf-8") as handle:
        for record in stale:
            sample = samples.get(record.index)
            if sample is None:
                why = "is no longer in the dataset index: dropped"
            elif sample.prompt != record.prompt:
                why = f"has a new caption ({shorten(sample.prompt, 60)!r}): re-encoding"
            elif str(sample.path) != record.source:
                why = f"now comes from {sample.path}: re-encoding"
            elif not record.key:
                why = "was made by an older version (no record of its inputs): re-encoding"
            else:
                why = "was made from another version of its clip (size or modification time changed): re-encoding"
            logger.info("record %d (%s) %s", record.index, record.source, why)
            (cache_dir / record.file).unlink(missing_ok=True)
            tombstone = dataclasses.replace(record, dropped=True)
            handle.write(tombstone.to_json() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
