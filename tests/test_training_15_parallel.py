"""Sequence-parallel LoRA training on CogVideoX 1.5 (CPU, gloo, 2 ranks, fp32): the Ulysses split of the padded
1.5 step (3 latent frames padded to 4 = 2 temporal patches x 2 x 3 + 7 text = 19 tokens, uneven shards) gives
the loss and, after the strategies' mean over ranks, the LoRA gradients of the unsplit step, T2V and I2V."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from parallel_harness import ok, run_ranks
from tiny_models import PRESET_FLAGS, TINY_DIT, randomize_
from training_parallel_cases import lora_grads, max_rel, tiny_batch, tiny_module

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.models.dit import CogDiT

pytestmark = pytest.mark.usefixtures("one_thread")


def _world_mean(grads: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, g in grads.items():
        g = g.contiguous()
        dist.all_reduce(g)
        out[name] = g / world
    return out


def split_15_step(rank: int, world: int) -> dict[str, Any]:
    """Per 1.5 preset: the unsplit and the split step's loss and world-mean LoRA gradients on this rank."""
    results = {}
    for preset in ("cogvideox1.5-5b", "cogvideox1.5-5b-i2v"):
        dit = randomize_(CogDiT(DiTConfig.from_dict({**TINY_DIT, **PRESET_FLAGS[preset]})), seed=1).float()
        batch = tiny_batch(seed=5)  # [2, 4, 3, 4, 6]: 3 latent frames, padded to 4 by the step
        if dit.family.is_i2v:
            batch["image_latents"] = torch.randn(2, 4, 1, 4, 6, generator=torch.Generator().manual_seed(6))
        whole_loss, whole = lora_grads(tiny_module(copy.deepcopy(dit)), batch)
        split = tiny_module(dit, sequence_parallel=world, devices=world)
        split_loss, grads = lora_grads(split, batch)
        results[preset] = {
            "split": split.denoiser.split.name,
            "loss_whole": whole_loss,
            "loss_split": split_loss,
            "rel": max_rel(_world_mean(grads, world), _world_mean(whole, world)),
        }
    return results


def test_15_ulysses_split_training_step_gives_the_unsplit_lora_gradients(tmp_path: Path) -> None:
    for rank, by_preset in enumerate(ok(run_ranks(2, split_15_step, tmp_path))):
        for preset, r in by_preset.items():
            assert r["split"] == "parallel:ulysses2", (rank, preset)
            assert r["loss_split"] == pytest.approx(r["loss_whole"], rel=1e-6), (rank, preset, r)
            assert r["rel"] < 1e-5, (rank, preset, r)
