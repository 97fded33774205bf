"""The latent cache's layout: what :func:`~diffsynth_cog.training.prepare.prepare_cache` writes and the trainer reads.

Layout of a cache folder::

    cache_info.json                 shapes, dtype, scaling factor, clip geometry, model paths (CacheInfo)
    00000000.safetensors            one record per clip, named by its dataset index:
                                      "latents"    [C, T, h, w]  VAE latents already multiplied by the
                                                                 scaling factor (the x0 of training)
                                      "prompt_emb" [L, d]        T5 hidden states of the prompt
                                      "image_latents" [C, 1, h, w] (image-to-video caches only) the
                                                                 clip's first frame encoded alone, as
                                                                 an image, multiplied by
                                                                 ``image_latent_scale`` (the scaling
                                                                 factor; its inverse on 1.5 I2V)
                                      metadata: prompt, source, index, num_frames, height, width, ...
    manifest.jsonl                  one JSON line per finished record (single process), or
    manifest.rank00003.jsonl        one manifest per rank when several processes prepare the cache

A record counts as finished only once its manifest line exists: the record file is renamed into
place first and the line appended after, so a file without a line (an interrupted write) is
redone and a line always points at a complete file. Readers merge every manifest.

Each line and each record's header carry the record's key (:func:`record_key`: its caption, its clip's
path, size and modification time, the cache settings). Prepare re-encodes a record whose dataset entry
has another key now, and drops the records of entries that left the dataset (a ``"dropped": true`` line);
of several lines for one index, the one that describes the file on disk wins, whatever manifest holds it.

This module holds that layout and the reading of it: the file names, :class:`CacheInfo` (``cache_info.json``),
:class:`CacheRecord` (one manifest line), :func:`record_key`, and the manifests read, merged and repaired. The
trainer's dataset over the records is :mod:`diffsynth_cog.training.cache`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.errors import DiffSynthCogError
from diffsynth_cog.io.json_files import read_json
from diffsynth_cog.pipeline.sampling import image_latent_scale, latent_plan

logger = logging.getLogger(__name__)

CACHE_FORMAT = "diffsynth_cog.latent_cache"
CACHE_VERSION = 1
CACHE_INFO = "cache_info.json"
MANIFEST = "manifest.jsonl"
_RANK_MANIFEST = re.compile(r"^manifest\.rank(\d+)\.jsonl$")
LATENTS_KEY, PROMPT_EMB_KEY, IMAGE_LATENTS_KEY = "latents", "prompt_emb", "image_latents"

# safetensors header dtype names of the storage dtypes a cache may use.
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in _ST_DTYPES}


class CacheError(DiffSynthCogError, ValueError):
    """A latent cache is missing, inconsistent or corrupt (the message names the file)."""


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'; only the storage dtypes a cache supports."""
    if dtype not in _ST_DTYPES:
        raise ValueError(f"cache dtype must be one of {sorted(_TORCH_DTYPES)}, got {dtype}")
    return str(dtype).removeprefix("torch.")


def record_name(index: int) -> str:
    """File name of the record of dataset index ``index``."""
    return f"{index:08d}.safetensors"


def manifest_name(rank: int = 0, world_size: int = 1) -> str:
    """``manifest.jsonl`` for a single process, ``manifest.rank00003.jsonl`` for rank 3 of several."""
    return MANIFEST if world_size == 1 else f"manifest.rank{rank:05d}.jsonl"


def manifest_paths(cache_dir: Path) -> list[Path]:
    """Every manifest in ``cache_dir``, in a fixed order (the single-process one first, then by rank)."""
    found = []
    if (cache_dir / MANIFEST).is_file():
        found.append((-1, cache_dir / MANIFEST))
    if cache_dir.is_dir():
        for path in cache_dir.iterdir():
            match = _RANK_MANIFEST.match(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


# --------------------------------------------------------------------------------------------- cache info
@dataclass(frozen=True)
class CacheInfo:
    """What every record of a cache shares; written once as ``cache_info.json``.

    latent_shape: [C, T, h, w] of ``latents`` (scaled by ``scaling_factor``). prompt_emb_shape:
    [L, d] of ``prompt_emb``. image_latent_shape: [C, 1, h, w] of ``image_latents`` (the first frame
    alone, for image-to-video training), or None when the records hold none; image_latent_scale: what the image
    latents were multiplied by (``sampling.image_latent_scale`` of the DiT's family: the scaling factor, or on
    CogVideoX 1.5 I2V its inverse; caches without the entry used the factor). dtype: storage dtype name
    ('bfloat16'). posterior: 'mean' or 'sample' (with ``seed``). num_frames, height, width, frame_interval: the
    pixel clips encoded.
    """

    latent_shape: tuple[int, int, int, int]
    prompt_emb_shape: tuple[int, int]
    dtype: str
    scaling_factor: float
    num_frames: int
    height: int
    width: int
    frame_interval: int
    temporal_compression_ratio: int
    spatial_compression: int
    posterior: str = "mean"
    seed: int | None = None
    tiled: bool = True
    model_paths: Mapping[str, str] = field(default_factory=dict)
    image_latent_shape: tuple[int, int, int, int] | None = None
    image_latent_scale: float | None = None
    format: str = CACHE_FORMAT
    version: int = CACHE_VERSION

    # Fields whose change makes old records unusable with new ones (checked when a prepare resumes).
    MUST_MATCH = (
        "latent_shape",
        "prompt_emb_shape",
        "dtype",
        "scaling_factor",
        "num_frames",
        "height",
        "width",
        "frame_interval",
        "posterior",
        "seed",
        "image_latent_shape",
        "image_latent_scale",
        "format",
        "version",
    )

    def __post_init__(self) -> None:
        # Image latents without a recorded scale were multiplied by the factor (caches before CogVideoX 1.5).
        scale = self.image_latent_scale if self.image_latent_shape is not None else None
        if self.image_latent_shape is not None and scale is None:
            scale = self.scaling_factor
        object.__setattr__(self, "image_latent_scale", None if scale is None else float(scale))

    @property
    def latent_channels(self) -> int:
        return self.latent_shape[0]

    @property
    def latent_frames(self) -> int:
        return self.latent_shape[1]

    @property
    def text_length(self) -> int:
        return self.prompt_emb_shape[0]

    @property
    def text_dim(self) -> int:
        return self.prompt_emb_shape[1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["latent_shape"] = list(self.latent_shape)
        values["prompt_emb_shape"] = list(self.prompt_emb_shape)
        values["image_latent_shape"] = None if self.image_latent_shape is None else list(self.image_latent_shape)
        values["model_paths"] = dict(self.model_paths)
        # Derived values, for people reading the file and for trainers in other languages.
        values["latent_channels"], values["latent_frames"] = self.latent_channels, self.latent_frames
        values["text_length"], values["text_dim"] = self.text_length, self.text_dim
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = CACHE_INFO) -> CacheInfo:
        if values.get("format") != CACHE_FORMAT:
            raise CacheError(f"{source}: not a diffsynth_cog latent cache (format {values.get('format')!r})")
        if values.get("version") != CACHE_VERSION:
            raise CacheError(
                f"{source}: cache format version {values.get('version')}, this code reads version {CACHE_VERSION}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names}
        try:
            kwargs["latent_shape"] = tuple(int(v) for v in kwargs["latent_shape"])
            kwargs["prompt_emb_shape"] = tuple(int(v) for v in kwargs["prompt_emb_shape"])
            if kwargs.get("image_latent_shape") is not None:
                kwargs["image_latent_shape"] = tuple(int(v) for v in kwargs["image_latent_shape"])
            info = cls(**kwargs)
        except (KeyError, TypeError, ValueError) as error:
            raise CacheError(f"{source}: malformed cache info ({type(error).__name__}: {error})") from error
        if len(info.latent_shape) != 4 or len(info.prompt_emb_shape) != 2 or info.dtype not in _TORCH_DTYPES:
            raise CacheError(
                f"{source}: expected latent_shape [C, T, h, w], prompt_emb_shape [L, d] and dtype in "
                f"{sorted(_TORCH_DTYPES)}; found {info.latent_shape}, {info.prompt_emb_shape}, {info.dtype!r}"
            )
        return info

    @classmethod
    def load(cls, cache_dir: str | os.PathLike[str]) -> CacheInfo:
        path = Path(cache_dir) / CACHE_INFO
        if not path.is_file():
            raise CacheError(f"{Path(cache_dir)}: no {CACHE_INFO}; not a latent cache (run the prepare step first)")
        return cls.from_dict(read_json(path, CacheError), source=str(path))

    def record_settings(self) -> dict[str, Any]:
        """The settings every record is made with (part of each record's key, see :func:`record_key`). The image
        scale counts only where it is not the factor, so that the records of older caches keep their keys."""
        settings = {name: getattr(self, name) for name in self.MUST_MATCH}
        if settings["image_latent_scale"] in (None, self.scaling_factor):
            del settings["image_latent_scale"]
        return settings

    def differences(self, other: CacheInfo) -> list[str]:
        """'name: self vs other' for every :attr:`MUST_MATCH` field that differs."""
        return [
            f"{name}: {getattr(self, name)!r} vs {getattr(other, name)!r}"
            for name in self.MUST_MATCH
            if getattr(self, name) != getattr(other, name)
        ]

    def check_dit(self, config: DiTConfig) -> None:
        """Raises CacheError unless a DiT with ``config`` can train on these records.

        Checked: latent channels (DiT in/out channels; an image-to-video DiT, in = 2 x out, needs the
        first-frame image latents), text length and width (max_text_seq_length, text_embed_dim),
        the clip's frames and size by the family's rules (``sampling.latent_plan``: 8k+1 frames, sides multiples of
        16, within 1.5's position grid), and the image latents' scale for the family. The clip length is free:
        long-video training uses more latent frames than ``config.sample_frames`` on purpose.
        """
        problems = []
        channels = self.latent_channels
        image_to_video = config.in_channels == 2 * channels and config.out_channels == channels
        if image_to_video and self.image_latent_shape is None:
            problems.append(
                f"the DiT is image-to-video (in_channels {config.in_channels} = 2 x {channels}) but the cache holds no "
                "first-frame image latents: prepare it again with --image-latents (into a new cache folder)"
            )
        elif not image_to_video and (config.in_channels != channels or config.out_channels != channels):
            problems.append(
                f"latent channels {channels}, DiT in/out channels {config.in_channels}/{config.out_channels}"
            )
        if self.text_length != config.max_text_seq_length:
            problems.append(
                f"prompt_emb length {self.text_length}, DiT max_text_seq_length {config.max_text_seq_length}"
            )
        if self.text_dim != config.text_embed_dim:
            problems.append(f"prompt_emb width {self.text_dim}, DiT text_embed_dim {config.text_embed_dim}")
        try:
            latent_plan(config, self.num_frames, self.height, self.width)
        except ValueError as error:
            problems.append(f"clips of {self.num_frames} frames at {self.height}x{self.width}: {error}")
        family = config.family
        expected = image_latent_scale(family, self.scaling_factor)
        if image_to_video and self.image_latent_scale is not None and abs(self.image_latent_scale - expected) > 1e-6:
            problems.append(
                f"image latents multiplied by {self.image_latent_scale:g}, {family.label} takes them multiplied by "
                f"{expected:g} (invert_scale_latents: {family.invert_scale_latents}): prepare the cache again with "
                "this model's transformer in the model folder (into a new cache folder)"
            )
        if config.temporal_compression_ratio != self.temporal_compression_ratio:
            problems.append(
                f"temporal compression {self.temporal_compression_ratio}, DiT expects {config.temporal_compression_ratio}"
            )
        if problems:
            raise CacheError("the latent cache does not fit the DiT config: " + "; ".join(problems))
        if self.latent_frames != config.sample_latent_frames:
            logger.info(
                "cache clips have %d latent frames (%d pixel frames); the DiT's base clip has %d",
                self.latent_frames,
                self.num_frames,
                config.sample_latent_frames,
            )


# --------------------------------------------------------------------------------------------- manifests
@dataclass(frozen=True)
class CacheRecord:
    """One manifest line: a finished record, or (``dropped``) the note that prepare removed the record of
    ``index`` because what it was made from changed or left the dataset."""

    index: int
    file: str  # record file name, relative to the cache folder
    source: str  # the video it was encoded from
    prompt: str
    bytes: int  # size of the record file when it was finished
    key: str = ""  # record_key of what it was made from ("" in caches of older versions); also in the file's header
    dropped: bool = False

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        if not self.dropped:
            del values["dropped"]
        return json.dumps(values, ensure_ascii=False, sort_keys=True)


def record_key(source: str | os.PathLike[str], prompt: str, settings: Mapping[str, Any]) -> str:
    """What a record is made from, as a digest: the caption, the clip (its path, size and modification time:
    a replaced or re-encoded clip changes it) and the cache settings. Prepare re-encodes a record whose key
    differs from the one its dataset entry has now."""
    path = Path(source)
    try:
        stat = path.stat()
        clip: list[Any] = [str(path), stat.st_size, stat.st_mtime_ns]
    except OSError:  # a missing clip: skipped by prepare, but it still has a key
        clip = [str(path), None, None]
    text = json.dumps({"prompt": prompt, "clip": clip, "settings": dict(settings)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _parse_manifest_line(line: str, where: str) -> CacheRecord:
    values = json.loads(line)  # JSONDecodeError handled by the caller
    try:
        return CacheRecord(
            index=int(values["index"]),
            file=str(values["file"]),
            source=str(values.get("source", "")),
            prompt=str(values.get("prompt", "")),
            bytes=int(values["bytes"]),
            key=str(values.get("key", "")),
            dropped=bool(values.get("dropped", False)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CacheError(
            f"{where}: malformed manifest entry ({type(error).__name__}: {error}): {line[:200]}"
        ) from error


def iter_manifest(path: Path) -> Iterator[CacheRecord]:
    """Lines of one manifest file. An incomplete LAST line (a process stopped mid-append, or one
    still writing) is skipped with a warning; an unparsable line elsewhere is a CacheError."""
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield _parse_manifest_line(line, where)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: the line was never finished
                logger.warning("%s: ignoring an incomplete last manifest line (its record will be redone)", where)
                continue
            raise CacheError(f"{where}: corrupt manifest line ({error}): {line[:200]}") from error


def header_key(path: Path) -> str:
    """The key a record file was written with (its header's ``key``; "" for older caches or unreadable files)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("key", "")
    except (SafetensorError, OSError):
        return ""


def _resolve(cache_dir: Path, lines: list[CacheRecord]) -> tuple[CacheRecord | None, bool]:
    """(the current line of one index, whether its file is there as that line describes it).

    The line that describes the file on disk (size and key) wins, whatever the order of the manifests (ranks
    append to their own files). Without one: None when prepare dropped the record (a ``dropped`` line), else
    the last line (the file is missing or was changed: readers report it, prepare redoes it).
    """
    kept = [line for line in lines if not line.dropped]
    dropped = len(kept) < len(lines)
    if not kept:
        return None, False
    path = cache_dir / kept[-1].file
    if path.is_file():
        size, key = path.stat().st_size, header_key(path)
        matching = [line for line in kept if line.bytes == size and line.key == key]
        if matching:
            return matching[-1], True
    return (None, False) if dropped else (kept[-1], False)


def _lines_by_index(cache_dir: Path) -> dict[int, list[CacheRecord]]:
    lines: dict[int, list[CacheRecord]] = {}
    for path in manifest_paths(cache_dir):
        for record in iter_manifest(path):
            lines.setdefault(record.index, []).append(record)
    return lines


def read_manifests(cache_dir: str | os.PathLike[str]) -> dict[int, CacheRecord]:
    """Merged manifests of a cache: dataset index -> its current line (see :func:`_resolve`); records prepare
    dropped (stale, or no longer in the dataset) are left out."""
    folder = Path(cache_dir)
    merged = {}
    for index, lines in _lines_by_index(folder).items():
        record, _ = _resolve(folder, lines)
        if record is not None:
            merged[index] = record
    return merged


def repair_manifest_tail(path: Path) -> None:
    """Before appending to ``path``: make it end with a newline, dropping an unfinished last line.

    Without this, the next line would be glued onto the remains of an interrupted one.
    """
    if not path.is_file():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    tail = data[cut:].decode("utf-8", errors="replace")
    try:
        json.loads(tail)
    except json.JSONDecodeError:
        logger.warning("%s: dropping an unfinished last line left by an interrupted run: %r", path, tail[:120])
        with path.open("r+b") as handle:
            handle.truncate(cut)
        return
    with path.open("ab") as handle:  # a complete entry that only lacks its newline
        handle.write(b"\n")


def finished_records(cache_dir: Path) -> dict[int, CacheRecord]:
    """Records whose file is there as their manifest line describes it (size and key)."""
    done = {}
    for index, lines in _lines_by_index(cache_dir).items():
        record, complete = _resolve(cache_dir, lines)
        if complete and record is not None:
            done[index] = record
        elif record is not None:
            logger.info(
                "record %d: %s is missing or was changed after it was finished; it will be redone",
                index,
                cache_dir / record.file,
            )
    return done
