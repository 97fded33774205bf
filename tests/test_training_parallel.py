"""Sequence-parallel and sparse-attention LoRA training (issue 12, parts 2 and 3), on the CPU in fp32.

The split step runs on 2 gloo processes started here (tests/parallel_harness.py), on a 25-token call (no
degree divides it), with gradient checkpointing (so the blocks' exchanges also run in the recomputation).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from parallel_harness import ok, run_ranks
from safetensors import safe_open
from test_training import tiny_config, workspace  # noqa: F401  (module fixture)
from training_parallel_cases import (
    ReferenceWindowAttention,
    lora_grads,
    max_rel,
    ring_refused,
    sequence_parallel_grads,
    tiny_batch,
    tiny_dit,
    tiny_module,
)

from diffsynth_cog.lora import TRAINED_ATTENTION_KEY, trained_attention
from diffsynth_cog.training.config import TrainConfig, TrainConfigError
from diffsynth_cog.training.trainer import run_training


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- part 2
def test_ulysses_split_step_gives_the_lora_gradients_of_the_unsplit_step(tmp_path: Path) -> None:
    results = ok(run_ranks(2, sequence_parallel_grads, tmp_path, 2, [None, "window:0"]))
    for rank, by_attention in enumerate(results):
        for attention, r in by_attention.items():
            assert r["split_name"] == "parallel:ulysses2", (rank, attention)
            assert r["loss_split"] == pytest.approx(r["loss_whole"], rel=1e-6), (rank, attention)
            assert r["rel"] < 1e-5, (rank, attention, r)
            assert r["rel_local"] > 1e-2, (rank, attention, r)  # a rank's own gradient is only its share's


def test_two_groups_of_two_average_the_groups_samples(tmp_path: Path) -> None:
    """4 ranks: sequence_parallel 2 x 2 data-parallel groups, each group its own sample."""
    results = ok(run_ranks(4, sequence_parallel_grads, tmp_path, 2, ["window:1"]))
    for rank, by_attention in enumerate(results):
        r = by_attention["window:1"]
        assert r["rel"] < 1e-5, (rank, r)
    assert results[0]["window:1"]["loss_split"] != results[2]["window:1"]["loss_split"]  # two samples


def test_ring_attention_refuses_to_train(tmp_path: Path) -> None:
    messages = ok(run_ranks(2, ring_refused, tmp_path))
    assert all("inference only" in m and "Ulysses" in m for m in messages), messages


def test_sequence_parallel_config_is_checked_against_ranks_and_heads(workspace, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(TrainConfigError, match=r"sequence_parallel: 2 does not divide the 3 ranks.*valid: \[1, 3\]"):
        TrainConfig(model="m", cache_dir="c", output_dir="o", sequence_parallel=2, devices=3)
    with pytest.raises(TrainConfigError, match="sequence_parallel: expected an integer >= 1"):
        TrainConfig(model="m", cache_dir="c", output_dir="o", sequence_parallel=0)
    config = tiny_config(workspace, tmp_path / "run", sequence_parallel=4, devices=4)  # the tiny DiT has 2 heads
    with pytest.raises(TrainConfigError, match=r"does not divide the DiT's 2 attention heads; valid .*\[1, 2\]"):
        run_training(config, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------------------------- part 3
def test_sparse_lora_gradients_equal_the_dense_masked_reference() -> None:
    dit = tiny_dit()
    batch = tiny_batch()
    sparse = tiny_module(dit, attention="window:0")
    assert sparse.denoiser.parts()["attention"] == "window0"
    loss, grads = lora_grads(sparse, batch)
    reference = tiny_module(tiny_dit(), attention=None)
    reference.denoiser.attention = ReferenceWindowAttention(0)
    ref_loss, ref_grads = lora_grads(reference, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert max_rel(grads, ref_grads) < 1e-5
    dense_loss, dense_grads = lora_grads(tiny_module(tiny_dit()), batch)
    assert max_rel(dense_grads, ref_grads) > 1e-2  # the mask matters at this size


def test_attention_field_is_checked_with_the_valid_specs() -> None:
    with pytest.raises(TrainConfigError, match=r"attention: unknown attention 'windw:2'.*'window:W'"):
        TrainConfig(model="m", cache_dir="c", output_dir="o", attention="windw:2")
    assert TrainConfig(model="m", cache_dir="c", output_dir="o", attention="radial").attention == "radial"


def test_training_under_a_mask_exports_a_lora_that_records_it(workspace, tmp_path: Path) -> None:  # noqa: F811
    config = tiny_config(workspace, tmp_path / "run", attention="window:0", max_steps=2, checkpoint_every_n_steps=2)
    result = run_training(config, progress=False)
    assert result.module.denoiser.parts()["attention"] == "window0"
    assert trained_attention(result.lora_path) == "window:0"
    with safe_open(result.lora_path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata[TRAINED_ATTENTION_KEY] == "window:0"
    assert json.loads(metadata["diffsynth_cog_train_config"])["attention"] == "window:0"
