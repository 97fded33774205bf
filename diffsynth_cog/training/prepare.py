"""The "prepare" step: run the T5 text encoder and the VAE encoder once over a dataset.

Long-video training keeps only the DiT in the training process (ExVideo's recipe): prompts and clips
are encoded ahead of time, here, and the trainer reads the results from a latent cache (layout in
:mod:`diffsynth_cog.training.cache`). One record is written per clip, atomically; the step can be
interrupted and re-run (finished records are not redone; records whose caption, clip or settings
changed are, and records of clips no longer in the index are dropped) and spread over several
processes (sample ``i`` goes to rank ``i % world_size``, each rank keeping its own manifest).

Latents are the posterior MEAN by default. The VAE posterior is a Gaussian; diffusers' trainers draw
a fresh sample from it at every step, which a cache cannot do: a cached draw is frozen, so it adds
the same fixed perturbation in every epoch rather than acting as augmentation. The mean is the
latent the decoder reconstructs from, and it is bit-reproducible, so a record redone after an
interruption, or by another rank, is identical to the original. ``sample_posterior=True`` stores
one draw instead, from a generator seeded by ``(seed, index)`` so that each record's draw does not
depend on rank count or resume order.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffsynth_cog.configs import DiTConfig, check_num_frames, frame_multiple
from diffsynth_cog.errors import DiffSynthCogError, shorten
from diffsynth_cog.io.atomic import save_safetensors_atomic, write_json_atomic
from diffsynth_cog.loading.model_folder import resolve_model_folder
from diffsynth_cog.loading.text_encoder_loader import load_text_encoder
from diffsynth_cog.loading.vae_loader import load_vae_encoder
from diffsynth_cog.models.text_encoder import CogTextEncoder
from diffsynth_cog.models.vae import CogVAE, CogVAEEncoder
from diffsynth_cog.pipeline.sampling import image_latent_scale, latent_plan
from diffsynth_cog.training.cache import (
    CACHE_FORMAT,
    CACHE_INFO,
    IMAGE_LATENTS_KEY,
    LATENTS_KEY,
    PROMPT_EMB_KEY,
    CacheError,
    CacheInfo,
    CacheRecord,
    dtype_name,
    finished_records,
    manifest_name,
    record_key,
    record_name,
    repair_manifest_tail,
)
from diffsynth_cog.training.data import (
    SKIP_REASONS,
    SkippedSample,
    VideoClipDataset,
    VideoSample,
    describe_skips,
    first_item,
    load_dataset_index,
)

logger = logging.getLogger(__name__)

_LISTED = 5  # skipped clips a failure message names one by one


class NoUsableClipsError(DiffSynthCogError):
    """Every clip of the dataset was skipped: the cache holds nothing to train on (the message lists why)."""


@dataclass
class PrepareSummary:
    """What one :func:`prepare_cache` call did (for its rank).

    written: records encoded and written now. skipped_existing: records of this rank already
    finished by an earlier run. skipped_bad: clips that could not be read, with the reason.
    other_ranks: records of the index that belong to other ranks.
    """

    cache_dir: Path
    written: int = 0
    skipped_existing: int = 0
    skipped_bad: list[SkippedSample] = field(default_factory=list)
    other_ranks: int = 0
    stale: int = 0  # records dropped because what they were made from changed (re-encoded) or left the dataset

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        """Reason -> count, every reason listed (zero counts included)."""
        counts = Counter(s.reason for s in self.skipped_bad)
        return {reason: counts.get(reason, 0) for reason in SKIP_REASONS}

    def describe(self) -> str:
        """'2 written, 1 already done, 1 stale dropped, 2 skipped: 1 too short, 1 unreadable'."""
        stale = f"{self.stale} stale dropped, " if self.stale else ""
        return (
            f"{self.written} written, {self.skipped_existing} already done, {stale}{describe_skips(self.skipped_bad)}"
        )

    @property
    def nothing_usable(self) -> bool:
        """Every clip there was to encode was skipped, and none was done before: nothing to train on."""
        return bool(self.skipped_bad) and self.written == 0 and self.skipped_existing == 0

    def unusable_message(self, dataset: str | os.PathLike[str], needed_frames: int) -> str:
        """Why nothing was written and what to do: the skips by reason, the first ones by record."""
        listed = "; ".join(
            f"{s.where or f'clip {s.index}'} ({s.path.name}): {s.reason.replace('_', ' ')}"
            for s in self.skipped_bad[:_LISTED]
        )
        more = f"; and {len(self.skipped_bad) - _LISTED} more" if len(self.skipped_bad) > _LISTED else ""
        return (
            f"none of the {len(self.skipped_bad)} clips of {dataset} could be used ({describe_skips(self.skipped_bad)}), "
            f"so the cache {self.cache_dir} holds nothing to train on: {listed}{more}. Fix or remove those records "
            f"(each video needs at least {needed_frames} frames at these --num-frames / --frame-interval; the lines "
            "above give each reader's error) and run prepare again"
        )


@dataclass(frozen=True)
class Encoders:
    """The two frozen encoders of the prepare step, the paths they were loaded from and the transformer config of
    the model folder (None without one): the family the cache is for (``prepare_cache(dit_config=...)``)."""

    text_encoder: CogTextEncoder
    vae_encoder: CogVAEEncoder
    paths: dict[str, str]
    dit_config: DiTConfig | None = None


# --------------------------------------------------------------------------------------------- loading
def load_encoders(
    model_dir: str | os.PathLike[str] | None = None,
    *,
    text_encoder_path: str | os.PathLike[str] | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
    vae_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    vae_dtype: torch.dtype | None = None,
    max_text_length: int | None = None,
    vae_scaling_factor: float | None = None,
) -> Encoders:
    """The T5 text encoder and the VAE encoder (no decoder) for :func:`prepare_cache`.

    ``model_dir``: a CogVideoX model folder (``text_encoder/``, ``tokenizer/``, ``vae/``, and
    ``transformer/`` whose ``max_text_seq_length`` sets the prompt length and whose family sets the
    VAE scale when the VAE has no config.json). Any of ``text_encoder_path`` / ``tokenizer_path`` /
    ``vae_path`` overrides the folder's part (or replaces ``model_dir`` altogether). ``dtype``:
    weights of both encoders (``vae_dtype`` for the VAE alone). ``max_text_length``: tokens per
    prompt (default: the transformer config's, else 226).
    """
    if model_dir is None and (text_encoder_path is None or vae_path is None):
        raise ValueError("pass model_dir, or both text_encoder_path and vae_path")
    folder = resolve_model_folder(model_dir, text_encoder=text_encoder_path, tokenizer=tokenizer_path, vae=vae_path)
    text_path, vae_folder = folder.require("text_encoder"), folder.require("vae")
    text_encoder = load_text_encoder(
        text_path,
        tokenizer_path=folder.require("tokenizer"),
        dtype=dtype,
        device=device,
        max_length=max_text_length if max_text_length is not None else folder.max_text_seq_length,
    )
    vae_encoder = load_vae_encoder(
        vae_folder,
        dtype=vae_dtype or dtype,
        device=device,
        scaling_factor=vae_scaling_factor if vae_scaling_factor is not None else folder.vae_scaling_factor,
    ).eval()
    vae_encoder.requires_grad_(False)
    paths = {"text_encoder": str(text_path), "vae": str(vae_folder), "tokenizer": str(folder.require("tokenizer"))}
    return Encoders(text_encoder=text_encoder, vae_encoder=vae_encoder, paths=paths, dit_config=folder.dit_config)


def distributed_rank() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the environment torchrun / Lightning / SLURM launchers set.

    For sharding ``prepare_cache`` over processes without initialising a process group (the prepare
    step needs no communication): launch N copies with ``torchrun --nproc-per-node N`` and pass
    ``rank, world_size`` through, and ``cuda:{local_rank}`` as the device. (0, 1, 0) when unset.
    """
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    if not 0 <= rank < world_size:
        raise ValueError(f"environment gives RANK={rank}, WORLD_SIZE={world_size}: need 0 <= rank < world_size")
    return rank, world_size, local_rank


# --------------------------------------------------------------------------------------------- writing
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


def posterior_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for record ``index``'s posterior draw: same draw whatever rank or order encodes it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


def _iterate(dataset: VideoClipDataset, num_workers: int) -> Iterable[dict[str, object] | SkippedSample]:
    if num_workers <= 0:
        return (dataset[i] for i in range(len(dataset)))
    # Workers decode the next clips (ffmpeg, resize) while the encoders run on the current one.
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=first_item)


# --------------------------------------------------------------------------------------------- prepare
def prepare_cache(
    source: str | os.PathLike[str] | Sequence[VideoSample],
    cache_dir: str | os.PathLike[str],
    text_encoder: CogTextEncoder,
    vae_encoder: CogVAEEncoder | CogVAE,
    *,
    num_frames: int = 129,
    height: int = 480,
    width: int = 720,
    frame_interval: int = 1,
    tiled: bool = True,
    sample_posterior: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    num_workers: int = 0,
    model_paths: Mapping[str, str | os.PathLike[str]] | None = None,
    progress: bool = True,
    image_latents: bool = False,
    dit_config: DiTConfig | None = None,
) -> PrepareSummary:
    """Encodes every clip of a dataset (this rank's share) into ``cache_dir``; returns what was done.

    Args:
        source: a dataset folder or index file (see :func:`~diffsynth_cog.training.data.load_dataset_index`)
            or a list of :class:`VideoSample`.
        cache_dir: output folder (created). Re-running on it resumes: records listed in a manifest
            whose file is intact are skipped; the rest are (re)done.
        text_encoder, vae_encoder: frozen encoders (see :func:`load_encoders`); a whole
            :class:`CogVAE` works as well as its encoder.
        num_frames, height, width, frame_interval: the clip read from each video (``num_frames`` =
            8k+1, sides multiples of the VAE's factor, of 16 with ``dit_config``); videos shorter than ``(num_frames - 1) * frame_interval + 1``
            frames are skipped.
        tiled: spatial tiling in the VAE (bounds memory at 480x720 and above).
        sample_posterior, seed: store one seeded posterior draw instead of the mean (module docstring).
        rank, world_size: this process takes samples with ``index % world_size == rank``.
        device: where inputs go (default: the VAE's weights' device).
        dtype: storage dtype of latents and prompt embeddings.
        num_workers: DataLoader worker processes that decode videos ahead of the encoders (0: inline).
        model_paths: recorded in cache_info.json (e.g. ``load_encoders(...).paths``).
        progress: tqdm bar over this rank's clips.
        image_latents: also store each clip's first frame encoded alone, as an image (the condition of
            image-to-video training, encoded as the I2V pipeline encodes its input image), as
            ``image_latents`` [C, 1, h, w]: the posterior mean, or with ``sample_posterior`` a draw
            from the record's generator after the clip's; multiplied as the I2V pipeline multiplies its image's
            latents for ``dit_config``'s family (the scaling factor; its inverse on CogVideoX 1.5 I2V).
        dit_config: the transformer the cache is for (``Encoders.dit_config``): its family's frame, size and
            position-grid rules are checked before any encoding (:func:`check_clip`) and it sets the image
            latents' scale. None: the VAE's factors and its config's ``invert_scale_latents`` alone.

    Unreadable (corrupt, missing) and too-short videos are skipped, never retried within the run and
    never fatal; each is logged at INFO and the summary counts them by reason. Any other error
    (e.g. out of memory) stops the run; finished records stay and a re-run continues after them.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    samples = _load_samples(source)

    out = check_cache_dir(cache_dir)
    info = _cache_info(
        text_encoder,
        vae_encoder,
        num_frames=num_frames,
        height=height,
        width=width,
        frame_interval=frame_interval,
        dtype=dtype,
        sample_posterior=sample_posterior,
        seed=seed,
        tiled=tiled,
        model_paths=model_paths,
        image_latents=image_latents,
        dit_config=dit_config,
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_or_check_info(out, info)

    plan, summary = _plan_rank(out, samples, info, rank, world_size)
    encoder = _ClipEncoder.build(
        text_encoder,
        vae_encoder,
        info,
        device=device,
        dtype=dtype,
        tiled=tiled,
        sample_posterior=sample_posterior,
        seed=seed,
        image_latents=image_latents,
    )
    dataset = VideoClipDataset(plan.todo, num_frames, height, width, frame_interval, on_error="report")
    _encode_all(dataset, encoder, plan, summary, rank=rank, num_workers=num_workers, progress=progress)
    _log_summary(rank, summary)
    return summary


def _load_samples(source: str | os.PathLike[str] | Sequence[VideoSample]) -> list[VideoSample]:
    """The dataset's samples, from an index (folder or file) or a list; ValueError if two share an index."""
    samples = load_dataset_index(source) if isinstance(source, (str, os.PathLike)) else list(source)
    duplicates = sorted(i for i, n in Counter(s.index for s in samples).items() if n > 1)
    if duplicates:
        raise ValueError(f"sample indices must be unique (they name the cache records); repeated: {duplicates[:10]}")
    return samples


@dataclass(frozen=True)
class _RankPlan:
    """This rank's share of the work, after resuming from what the cache already holds."""

    out: Path
    manifest_path: Path
    keys: dict[int, str]  # every sample's record key (its inputs and the cache's settings)
    todo: list[VideoSample]  # this rank's samples with no up-to-date record, in dataset order
    by_index: dict[int, VideoSample]  # ``todo`` by sample index


def _plan_rank(
    out: Path, samples: Sequence[VideoSample], info: CacheInfo, rank: int, world_size: int
) -> tuple[_RankPlan, PrepareSummary]:
    """Repairs this rank's manifest, drops its stale records and works out what is left to encode; logs the plan."""
    settings = info.record_settings()
    keys = {s.index: record_key(s.path, s.prompt, settings) for s in samples}
    manifest_path = out / manifest_name(rank, world_size)
    repair_manifest_tail(manifest_path)
    finished = finished_records(out)  # every rank's manifest: a resume may use another world size
    stale = [r for i, r in finished.items() if i % world_size == rank and keys.get(i) != r.key]
    _drop_stale(out, manifest_path, stale, {s.index: s for s in samples})
    done = {i: r for i, r in finished.items() if keys.get(i) == r.key}
    mine = [s for s in samples if s.index % world_size == rank]
    todo = [s for s in mine if s.index not in done]
    by_index = {s.index: s for s in todo}
    summary = PrepareSummary(
        cache_dir=out,
        skipped_existing=len(mine) - len(todo),
        other_ranks=len(samples) - len(mine),
        stale=len(stale),
    )
    logger.info(
        "prepare rank %d/%d: %d of %d clips are this rank's; %d already done, %d to encode into %s",
        rank,
        world_size,
        len(mine),
        len(samples),
        summary.skipped_existing,
        len(todo),
        out,
    )
    plan = _RankPlan(out=out, manifest_path=manifest_path, keys=keys, todo=todo, by_index=by_index)
    return plan, summary


@dataclass(frozen=True)
class _ClipEncoder:
    """Encodes one clip (and its prompt) into a record's tensors, in the cache's storage dtype."""

    text_encoder: CogTextEncoder
    vae_encoder: CogVAEEncoder | CogVAE
    info: CacheInfo
    device: torch.device
    vae_dtype: torch.dtype
    scale: float  # the VAE's scaling factor
    dtype: torch.dtype
    tiled: bool
    sample_posterior: bool
    seed: int
    image_latents: bool

    @classmethod
    def build(
        cls,
        text_encoder: CogTextEncoder,
        vae_encoder: CogVAEEncoder | CogVAE,
        info: CacheInfo,
        *,
        device: str | torch.device | None,
        dtype: torch.dtype,
        tiled: bool,
        sample_posterior: bool,
        seed: int,
        image_latents: bool,
    ) -> _ClipEncoder:
        param = next(vae_encoder.parameters())
        return cls(
            text_encoder=text_encoder,
            vae_encoder=vae_encoder,
            info=info,
            device=torch.device(device) if device is not None else param.device,
            vae_dtype=param.dtype,
            scale=float(vae_encoder.config.scaling_factor),
            dtype=dtype,
            tiled=tiled,
            sample_posterior=sample_posterior,
            seed=seed,
            image_latents=image_latents,
        )

    def encode(self, item: Mapping[str, object], sample: VideoSample) -> dict[str, torch.Tensor]:
        index, prompt = int(item["index"]), str(item["prompt"])
        with torch.inference_mode():
            prompt_emb = self.text_encoder.encode(prompt, device=self.device, names=[sample.label])[0]  # [L, d]
            video = item["video"].unsqueeze(0).to(device=self.device, dtype=self.vae_dtype)  # [1, 3, F, H, W]
            generator = posterior_generator(self.seed, index) if self.sample_posterior else None
            latents = self.vae_encoder.encode(
                video, tiled=self.tiled, sample=self.sample_posterior, generator=generator
            )[0]
            # Scale in fp32 (x0 of training), then round once to the storage dtype.
            latents = (latents.float() * self.scale).to(self.dtype).cpu()  # [C, T, h, w]
            prompt_emb = prompt_emb.to(self.dtype).cpu()
            record = {LATENTS_KEY: latents, PROMPT_EMB_KEY: prompt_emb}
            if self.image_latents:  # the first frame alone, as an image (1 frame -> 1 latent frame)
                first = self.vae_encoder.encode(
                    video[:, :, :1], tiled=self.tiled, sample=self.sample_posterior, generator=generator
                )
                image_scale = self.info.image_latent_scale
                record[IMAGE_LATENTS_KEY] = (first[0].float() * image_scale).to(self.dtype).cpu()  # [C, 1, h, w]
        return record

    def check_shapes(self, index: int, record: Mapping[str, torch.Tensor]) -> None:
        """RuntimeError if a tensor's shape is not the one cache_info.json promises."""
        shapes = {LATENTS_KEY: self.info.latent_shape, PROMPT_EMB_KEY: self.info.prompt_emb_shape}
        shapes[IMAGE_LATENTS_KEY] = self.info.image_latent_shape
        for key, tensor in record.items():
            expected = shapes[key]
            if tuple(tensor.shape) != tuple(expected):
                raise RuntimeError(f"clip {index}: {key} came out {list(tensor.shape)}, expected {list(expected)}")

    def metadata(self, index: int, prompt: str, sample: VideoSample, key: str) -> dict[str, str]:
        """The safetensors metadata of record ``index``."""
        return {
            "format": CACHE_FORMAT,
            "index": str(index),
            "prompt": prompt,
            "source": str(sample.path),
            "num_frames": str(self.info.num_frames),
            "height": str(self.info.height),
            "width": str(self.info.width),
            "frame_interval": str(self.info.frame_interval),
            "scaling_factor": repr(self.scale),
            "posterior": self.info.posterior,
            "key": key,
        }


def _log_skip(item: SkippedSample) -> None:
    logger.info(
        "skipped %s (%s): %s",
        item.where or f"clip {item.index}",
        item.reason.replace("_", " "),
        item.message,
    )


def _encode_all(
    dataset: VideoClipDataset,
    encoder: _ClipEncoder,
    plan: _RankPlan,
    summary: PrepareSummary,
    *,
    rank: int,
    num_workers: int,
    progress: bool,
) -> None:
    """Encodes and writes every clip of ``dataset``, each record followed by its manifest line; counts into
    ``summary`` (records written, clips skipped)."""
    with (
        plan.manifest_path.open("a", encoding="utf-8") as manifest,
        tqdm(total=len(plan.todo), desc=f"prepare rank {rank}", unit="clip", disable=not progress) as bar,
    ):
        for item in _iterate(dataset, num_workers):
            bar.update(1)
            if isinstance(item, SkippedSample):
                summary.skipped_bad.append(item)
                _log_skip(item)
                bar.set_postfix(skipped=len(summary.skipped_bad))
                continue
            index, prompt = int(item["index"]), str(item["prompt"])
            sample = plan.by_index[index]
            record = encoder.encode(item, sample)
            encoder.check_shapes(index, record)
            metadata = encoder.metadata(index, prompt, sample, plan.keys[index])
            name = record_name(index)
            size = write_record(plan.out / name, record, metadata)
            # The manifest line comes only after the record is in place: a line always means a whole file.
            line = CacheRecord(
                index=index, file=name, source=str(sample.path), prompt=prompt, bytes=size, key=plan.keys[index]
            )
            manifest.write(line.to_json() + "\n")
            manifest.flush()
            os.fsync(manifest.fileno())
            summary.written += 1


def _log_summary(rank: int, summary: PrepareSummary) -> None:
    if summary.skipped_bad:
        names = ", ".join(s.path.name for s in summary.skipped_bad[:20])
        more = f" and {len(summary.skipped_bad) - 20} more" if len(summary.skipped_bad) > 20 else ""
        logger.warning("prepare rank %d: %s (%s%s)", rank, summary.describe(), names, more)
    else:
        logger.info("prepare rank %d: %s", rank, summary.describe())
