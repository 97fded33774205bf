"""Sequence-parallel and sparse-attention LoRA training (issue 12, parts 2 and 3), on the CPU in fp32.

The split step runs on 2 gloo processes started here (tests/parallel_harness.py), on a 25-token call (no
degree divides it), with gradient checkpointing (so the blocks' exchanges also run in the recomputation).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from parallel_harness import ok, run_ranks
from safetensors import safe_open
from test_training import tiny_config, workspace  # noqa: F401  (module fixture)
from training_parallel_cases import (
    ReferenceWindowAttention,
    bench_tiny,
    lora_grads,
    max_rel,
    sequence_parallel_grads,
    tiny_batch,
    tiny_dit,
    tiny_module,
    train_job,
    two_rank_session,
)

from diffsynth_cog.cli.generate import _hint_trained_attention
from diffsynth_cog.lora import TRAINED_ATTENTION_KEY, trained_attention
from diffsynth_cog.training.config import TrainConfig, TrainConfigError
from diffsynth_cog.training.trainer import run_training

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------- part 2
def test_ulysses_split_step_gives_the_lora_gradients_of_the_unsplit_step_and_ring_refuses_to_train(
    tmp_path: Path,
) -> None:
    results = ok(run_ranks(2, two_rank_session, tmp_path))
    for rank, (by_attention, ring_message) in enumerate(results):
        assert "inference only" in ring_message and "Ulysses" in ring_message, (rank, ring_message)
        for attention, r in by_attention.items():
            assert r["split_name"] == "parallel:ulysses2", (rank, attention)
            assert r["loss_split"] == pytest.approx(r["loss_whole"], rel=1e-6), (rank, attention)
            assert r["rel"] < 1e-5, (rank, attention, r)
            assert r["rel_local"] > 1e-2, (rank, attention, r)  # a rank's own gradient is only its share's


def test_two_groups_of_two_average_the_groups_samples(tmp_path: Path) -> None:
    """4 ranks: sequence_parallel 2 x 2 data-parallel groups, each group its own sample."""
    results = ok(run_ranks(4, sequence_parallel_grads, tmp_path, 2, ["window:1:token"]))  # (blocks: dense here)
    for rank, by_attention in enumerate(results):
        r = by_attention["window:1:token"]
        assert r["rel"] < 1e-5, (rank, r)
    assert results[0]["window:1:token"]["loss_split"] != results[2]["window:1:token"]["loss_split"]  # two samples


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
    sparse = tiny_module(dit, attention="window:0:token")  # token-exact: the tiny sequence is one 128-token block
    assert sparse.denoiser.parts()["attention"] == "window0-token"
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


def test_training_under_a_mask_exports_a_lora_that_records_it_and_generate_hints_at_it(
    workspace,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = tiny_config(workspace, tmp_path / "run", attention="window:0", max_steps=2, checkpoint_every_n_steps=2)
    result = run_training(config, progress=False)
    assert result.module.denoiser.parts()["attention"] == "window0"
    assert trained_attention(result.lora_path) == "window:0"
    with safe_open(result.lora_path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata[TRAINED_ATTENTION_KEY] == "window:0"
    assert json.loads(metadata["diffsynth_cog_train_config"])["attention"] == "window:0"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffsynth_cog.cli.main"):
        _hint_trained_attention(result.lora_path, "window:0")  # run as trained: nothing to say
        assert not [r for r in caplog.records if r.name == "diffsynth_cog.cli.main"]
        _hint_trained_attention(result.lora_path, None)
    assert "add --sparse-attention window:0" in caplog.text and "dense attention" in caplog.text


def test_run_training_with_sequence_parallel_2_on_2_ranks_trains_the_one_process_lora(
    workspace,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The whole job (Lightning's DDP on gloo, the group-sharded data, the shared noise, the exchanges, the
    strategy's gradient mean) against the same job on one process: the same samples, the same LoRA."""
    common = dict(
        max_steps=2, checkpoint_every_n_steps=2, tensorboard=False, accelerator="cpu", attention="window:1:token"
    )
    single = run_training(tiny_config(workspace, tmp_path / "one", **common), progress=False)
    job = tiny_config(workspace, tmp_path / "two", sequence_parallel=2, devices=2, **common).to_dict()
    ranks = ok(run_ranks(2, train_job, tmp_path / "ranks", job))
    assert [r["split"] for r in ranks] == ["parallel:ulysses2"] * 2
    assert ranks[0]["strategy"] == "DDPStrategy" and ranks[0]["step"] == 2
    assert ranks[0]["lora_path"] is not None and ranks[1]["lora_path"] is None
    expected = single.module.lora_weights()
    assert all(v.norm() > 0 for k, v in expected.items() if "lora_B" in k)  # B starts at 0: the steps moved it
    for r in ranks:
        assert max_rel(r["lora"], expected) < 1e-4, max_rel(r["lora"], expected)
    assert trained_attention(ranks[0]["lora_path"]) == "window:1:token"


# --------------------------------------------------------------------------------------------- benchmark
def test_sequence_parallel_and_sparse_benchmark_runs_its_tiny_cpu_smoke_mode(tmp_path: Path) -> None:
    """benchmarks/bench_train_sp.py --tiny on 2 gloo ranks: the script the GPUs run, proven on the CPU."""
    ok(run_ranks(2, bench_tiny, tmp_path / "ranks", str(tmp_path)))
    sp = json.loads((tmp_path / "tiny_sp.json").read_text())
    assert sp["ranks"] == 2 and len(sp["split"]) == 2 and sp["speedup"] > 0
    assert sp["one_gpu"]["parts"]["split"] == "whole" and sp["split"][1]["parts"]["split"] == "parallel:ulysses2"
    assert sp["losses_equal_on_ranks"]
    # the same sample, timesteps and noise, and after the first update the same LoRA: the one-GPU run's losses
    assert sp["split"][0]["losses"] == pytest.approx(sp["one_gpu"]["losses"], rel=1e-4)
    assert sp["one_gpu"]["losses"][0] != sp["one_gpu"]["losses"][1]
    for r in sp["split"]:  # the reduced gradients are the one-GPU step's
        assert r["grad_norms"] == pytest.approx(sp["one_gpu"]["grad_norms"], rel=1e-5)
    sparse = json.loads((tmp_path / "tiny_sparse.json").read_text())
    assert sorted(sparse["runs"], key=int) == ["9", "17"]
    for entry in sparse["runs"].values():
        assert entry["dense"]["parts"]["attention"] == "auto"
        assert {s: r["parts"]["attention"] for s, r in entry["sparse"].items()} == {
            "window:1:token": "window1-token",
            "radial:token": "radial-token",
        }
        assert set(entry["sparse_vs_dense"]) == {"window:1:token", "radial:token"}
        assert all(v > 0 for v in entry["sparse_vs_dense"].values())
