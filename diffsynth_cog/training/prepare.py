"""The "prepare" step: run the T5 text encoder and the VAE encoder once over a dataset.

Long-video training keeps only the DiT in the training process (ExVideo's recipe): prompts and clips
are encoded ahead of time, here, and the trainer reads the results from a latent cache (layout in
:mod:`diffsynth_cog.training.cache_layout`). One record is written per clip, atomically; the step can be
interrupted and re-run (finished records are not redone; records whose caption, clip or settings
changed are, and records of clips no longer in the index are dropped) and spread over several
processes (sample ``i`` goes to rank ``i % world_size``, each rank keeping its own manifest).

How each clip is encoded (the posterior mean by default, or one seeded draw) is
:mod:`diffsynth_cog.training.encoders`'s; the cache folder's settings, checks and records are
:mod:`diffsynth_cog.training.cache_folder`'s. Their public names are importable from here too.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.errors import DiffSynthCogError
from diffsynth_cog.models.text_encoder import CogTextEncoder
from diffsynth_cog.models.vae import CogVAE, CogVAEEncoder
from diffsynth_cog.training.cache_folder import (
    _cache_info,
    _drop_stale,
    _write_or_check_info,
    check_cache_dir,
    write_record,
)
from diffsynth_cog.training.cache_folder import check_clip as check_clip
from diffsynth_cog.training.cache_layout import (
    CacheInfo,
    CacheRecord,
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
from diffsynth_cog.training.encoders import Encoders as Encoders
from diffsynth_cog.training.encoders import _ClipEncoder
from diffsynth_cog.training.encoders import load_encoders as load_encoders
from diffsynth_cog.training.encoders import posterior_generator as posterior_generator

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
        sample_posterior, seed: store one seeded posterior draw instead of the mean (see
            :mod:`diffsynth_cog.training.encoders`).
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
