"""The LightningDataModule over a latent cache, with a resumable, rank-sharded sample order.

A training run is one stream of samples, ``max_steps * grad_accumulation * batch_size`` long per
rank: data epoch ``e`` is a permutation of the cache seeded by ``(seed, e)``, split across ranks
the way ``torch.utils.data.DistributedSampler`` splits it (padded to a multiple of the world size,
rank ``r`` taking items ``r, r + W, ...``), and the epochs follow one another without a break.

Why not Lightning's own DistributedSampler: Lightning >= 2 does not fast-forward a sampler when
a run resumes in the middle of an epoch; it starts the epoch's data again, so a resumed run would
see other samples than the uninterrupted one. Here the position in the stream is a function of
the restored ``global_step`` alone (``global_step * grad_accumulation * batch_size`` items already
consumed on every rank), so the resumed run reads exactly the samples the uninterrupted run reads.
The Trainer is built with ``use_distributed_sampler=False`` for this reason (see ``trainer.py``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.training.cache import LatentCacheDataset
from diffsynth_cog.training.cache_layout import CacheInfo
from diffsynth_cog.training.config import TrainConfig
from diffsynth_cog.training.module import read_dit_config
from diffsynth_cog.training.sequence import data_parallel_coords

logger = logging.getLogger(__name__)


def _epoch_seed(seed: int, epoch: int) -> int:
    """Seed of data epoch ``epoch``'s permutation (a hash: no two (seed, epoch) pairs share one by construction)."""
    digest = hashlib.blake2b(f"diffsynth_cog/data/{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class StreamSampler(Sampler[int]):
    """Dataset positions for one rank: seeded per-epoch permutations, sharded, cut to ``num_items``.

    ``len()`` is the whole run's ``num_items``; iteration starts at item ``start`` (what a resumed
    run has already consumed), so Lightning's batch counters and the stream stay aligned.
    """

    def __init__(
        self,
        dataset_size: int,
        num_items: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        shuffle: bool = True,
    ) -> None:
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if not 0 <= start <= num_items:
            raise ValueError(f"start must be in [0, num_items={num_items}], got {start}")
        self.dataset_size, self.num_items = dataset_size, num_items
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start, self.shuffle = start, shuffle
        # Items per rank in one data epoch (DistributedSampler without drop_last pads to this).
        self.per_rank = math.ceil(dataset_size / world_size)

    def __len__(self) -> int:
        return self.num_items

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's share of data epoch ``epoch``."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / len(order)))[:total]  # pad by repeating, as DistributedSampler
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        position = self.start
        while position < self.num_items:
            order = self.epoch_order(epoch)
            for index in order[offset:]:
                if position >= self.num_items:
                    return
                yield index
                position += 1
            epoch, offset = epoch + 1, 0


class ResumableDataLoader(DataLoader):
    """A DataLoader that tells Lightning it can resume mid-epoch.

    Its position is not stored: the DataModule derives it from the restored ``global_step`` when it
    builds the loader, so ``load_state_dict`` only checks that the cache still has the same size.
    """

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        return {"dataset_size": len(self.dataset), "per_rank": getattr(sampler, "per_rank", None)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        size = state_dict.get("dataset_size")
        if size is not None and size != len(self.dataset):
            logger.warning(
                "the latent cache had %d records when the checkpoint was saved and has %d now; the resumed run "
                "reads another sample order than the original run would have",
                size,
                len(self.dataset),
            )


class CachedLatentDataModule(pl.LightningDataModule):
    """Batches ``{"latents": [B, C, T, h, w], "prompt_emb": [B, L, d], "index": [B]}`` from a latent cache.

    Args:
        cache_dir: the folder ``diffsynth-cog prepare`` wrote.
        dit_config: checked against the cache's ``cache_info.json`` in :meth:`setup` (latent
            channels, text length and width, patch divisibility); None skips the check.
        batch_size: per device. max_steps, grad_accumulation: the length of the sample stream
            (Lightning's values are used when a Trainer is attached).
        seed: of the per-epoch permutations. shuffle: False reads the cache in index order.
        num_workers: loader processes (records are safetensors files, cheap to read).
        validate: check every record's header when the dataset is opened (see LatentCacheDataset).
        sequence_parallel: ranks sharing each sample (``training.sequence``): the stream is sharded over
            their groups, every rank of a group reading the same samples.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        *,
        dit_config: DiTConfig | None = None,
        batch_size: int = 1,
        max_steps: int = 1,
        grad_accumulation: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        validate: bool = True,
        sequence_parallel: int = 1,
    ) -> None:
        super().__init__()
        self.cache_dir = Path(cache_dir).expanduser()
        self.dit_config = dit_config
        self.batch_size, self.max_steps, self.grad_accumulation = batch_size, max_steps, grad_accumulation
        self.seed, self.shuffle, self.num_workers, self.validate = seed, shuffle, num_workers, validate
        self.sequence_parallel = sequence_parallel
        self.dataset: LatentCacheDataset | None = None

    @classmethod
    def from_config(cls, config: TrainConfig, dit_config: DiTConfig | None = None) -> CachedLatentDataModule:
        """The DataModule of a job; the DiT config is read from the job's model (headers only) if not given."""
        return cls(
            config.cache_dir,
            dit_config=dit_config if dit_config is not None else read_dit_config(config.model),
            batch_size=config.batch_size,
            max_steps=config.max_steps,
            grad_accumulation=config.grad_accumulation,
            seed=config.seed,
            num_workers=config.num_workers,
            sequence_parallel=config.sequence_parallel,
        )

    @property
    def info(self) -> CacheInfo:
        return self.dataset.info if self.dataset is not None else CacheInfo.load(self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        self.dataset = LatentCacheDataset(self.cache_dir, validate=self.validate)
        if self.dit_config is not None:
            self.dataset.info.check_dit(self.dit_config)

    def _run_geometry(self) -> tuple[int, int, int, int, int]:
        """(data-parallel rank, data-parallel world size, optimizer steps done, max steps, micro-batches per step):
        with sequence parallelism, the rank's group and the number of groups."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 0, self.max_steps, self.grad_accumulation
        max_steps = trainer.max_steps if trainer.max_steps > 0 else self.max_steps
        rank, world = data_parallel_coords(trainer.global_rank, trainer.world_size, self.sequence_parallel)
        return rank, world, trainer.global_step, max_steps, trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup("fit")
        assert self.dataset is not None
        rank, world_size, done_steps, max_steps, accumulate = self._run_geometry()
        per_step = accumulate * self.batch_size
        sampler = StreamSampler(
            len(self.dataset),
            max_steps * per_step,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            start=min(done_steps, max_steps) * per_step,
            shuffle=self.shuffle,
        )
        if sampler.start:
            logger.info("resuming the sample stream after %d items (%d optimizer steps)", sampler.start, done_steps)
        return ResumableDataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )
