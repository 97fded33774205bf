"""The user path of post-training: a prepare cache that notices edits, checks before the encoders load, job files
refused with one message, and a console that tells a cluster job how training goes.

Tiny encoders and clips from tests/test_training_data.py, the tiny model folder of tests/tiny_models.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training_data import CountingEncoder, model_dir, run_prepare, synthetic_clip  # noqa: F401 (fixture)
from tiny_models import save_tiny_model_folder

from diffsynth_cog.cli.main import main
from diffsynth_cog.io.video import save_video
from diffsynth_cog.training.cache import LatentCacheDataset, read_manifests
from diffsynth_cog.training.prepare import Encoders, load_encoders

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat playing piano", "a dog in the garden", "the sunset over a river"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoders(model_dir: Path) -> Encoders:  # noqa: F811
    return load_encoders(model_dir, dtype=torch.float32)


def write_dataset(root: Path, prompts: list[str], seeds: list[int] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds or range(len(prompts))):
        save_video(synthetic_clip(9, seed), root / f"clip{i}.mp4", fps=8, quality=8)
    write_index(root, prompts)
    return root


def write_index(root: Path, prompts: list[str]) -> None:
    records = [{"file_name": f"clip{i}.mp4", "text": prompt} for i, prompt in enumerate(prompts)]
    (root / "metadata.json").write_text(json.dumps(records))


def cached(cache: Path) -> dict[int, tuple[str, torch.Tensor]]:
    data = LatentCacheDataset(cache)
    return {r.index: (r.prompt, data[i]["latents"]) for i, r in enumerate(data.records)}


# --------------------------------------------------------------------------------------------- prepare cache
def test_prepare_reencodes_edited_captions_and_replaced_clips_and_drops_records_that_left_the_dataset(
    encoders: Encoders, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    data, cache = write_dataset(tmp_path / "data", PROMPTS), tmp_path / "cache"
    assert run_prepare(encoders, data, cache).written == 3
    first = cached(cache)

    # A corrected caption and a replaced clip: both re-encoded, the third record kept as it is.
    write_index(data, [PROMPTS[0], "a dog asleep in the garden", PROMPTS[2]])
    save_video(synthetic_clip(9, seed=7), data / "clip2.mp4", fps=8, quality=8)
    summary = run_prepare(encoders, data, cache)
    assert (summary.written, summary.skipped_existing, summary.stale) == (2, 1, 2)
    assert "has a new caption ('a dog asleep in the garden'): re-encoding" in caplog.text
    assert "another version of its clip" in caplog.text
    second = cached(cache)
    assert second[1][0] == "a dog asleep in the garden" and second[0][0] == PROMPTS[0]
    assert torch.equal(second[0][1], first[0][1]) and torch.equal(second[1][1], first[1][1])  # same clips
    assert not torch.equal(second[2][1], first[2][1])  # the new clip's latents

    # A clip taken out of the dataset: its record is dropped, so training never sees it.
    write_index(data, [PROMPTS[0], "a dog asleep in the garden"])
    summary = run_prepare(encoders, data, cache)
    assert (summary.written, summary.stale) == (0, 1) and "no longer in the dataset index" in caplog.text
    assert LatentCacheDataset(cache).indices == [0, 1] and sorted(read_manifests(cache)) == [0, 1]
    assert run_prepare(encoders, data, cache).describe() == "0 written, 2 already done, 0 skipped"


def test_an_interrupted_reencode_never_leaves_the_old_record_to_train_on(
    encoders: Encoders, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, cache = write_dataset(tmp_path / "data", PROMPTS), tmp_path / "cache"
    run_prepare(encoders, data, cache)
    write_index(data, [PROMPTS[0], "a new caption", PROMPTS[2]])
    monkeypatch.setattr(encoders.vae_encoder, "encode", CountingEncoder(encoders.vae_encoder, fail_on=1))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_prepare(encoders, data, cache)
    assert LatentCacheDataset(cache).indices == [0, 2]  # the stale record is gone, not silently used
    monkeypatch.undo()
    assert run_prepare(encoders, data, cache).written == 1
    assert cached(cache)[1][0] == "a new caption"


def test_edits_are_seen_whatever_rank_wrote_the_old_record(encoders: Encoders, tmp_path: Path) -> None:
    """Ranks append to their own manifests; the line that describes the file on disk wins, in any order."""
    data, cache = write_dataset(tmp_path / "data", PROMPTS), tmp_path / "cache"
    for rank in (0, 1):
        run_prepare(encoders, data, cache, rank=rank, world_size=2)
    write_index(data, [PROMPTS[0], "an edited caption", PROMPTS[2]])
    assert run_prepare(encoders, data, cache).written == 1  # one process now: manifest.jsonl
    assert cached(cache)[1][0] == "an edited caption"
    write_index(data, PROMPTS)
    assert run_prepare(encoders, data, cache, rank=1, world_size=2).written == 1  # back, in the rank file
    assert cached(cache)[1][0] == PROMPTS[1]


def prepare_argv(data: Path, model: Path, cache: Path, *extra: str) -> list[str]:
    argv = ["prepare", "--dataset", str(data), "--model", str(model), "--cache", str(cache), "--num-frames", "9"]
    return argv + ["--height", "32", "--width", "48", "--device", "cpu", "--num-workers", "0", *extra]


@pytest.mark.parametrize(
    "case,message",
    [
        ("cache is a file", "is a file; the latent cache is a folder"),
        ("cache is another folder", "a folder with other files and no cache_info.json, not a latent cache"),
        ("53 frames", "--num-frames must be 8k+1"),
        ("no dataset", "dataset path not found"),
        ("model without vae", "no vae/ in the model folder"),
    ],
)
def test_prepare_refuses_bad_input_before_the_encoders_load(
    case: str,
    message: str,
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import diffsynth_cog.training.prepare as prepare

    monkeypatch.setattr(prepare, "load_encoders", lambda *a, **k: pytest.fail("the encoders were loaded"))
    data = write_dataset(tmp_path / "data", PROMPTS[:1])
    cache, model, extra = tmp_path / "cache", model_dir, []
    if case == "cache is a file":
        cache.write_text("x")
    elif case == "cache is another folder":
        cache = data
    elif case == "53 frames":
        extra = ["--num-frames", "53"]
    elif case == "no dataset":
        data = tmp_path / "nothing"
    else:
        model = tmp_path / "model"
        model.mkdir()
        for part in ("text_encoder", "tokenizer", "transformer"):
            (model / part).symlink_to(model_dir / part)
    assert main(prepare_argv(data, model, cache, *extra)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0]


# --------------------------------------------------------------------------------------------- training jobs
@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model, a prepared cache of two clips and a job file training 3 steps."""
    root = tmp_path_factory.mktemp("job")
    model = save_tiny_model_folder(root / "model", "cogvideox-5b", seed=0)
    data = write_dataset(root / "data", ["a cat", "a dog"])
    assert main(prepare_argv(data, model, root / "cache", "--dtype", "fp32")) == 0
    values = dict(
        model=str(model), cache_dir=str(root / "cache"), output_dir=str(root / "out"), lora_rank=4, max_steps=3
    )
    values.update(learning_rate=1e-2, checkpoint_every_n_steps=100, num_workers=0)
    (root / "job.json").write_text(json.dumps(values))
    return {"root": root, "job": root / "job.json", "values": values}


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(output_dir="{root}/job.json"), "output_dir"),
        (dict(cache_dir="{root}/nothing"), "no cache_info.json; not a latent cache"),
        (dict(model="{root}/nothing"), "nothing"),
        (dict(learning_rate="1e-4"), "learning_rate: expected a number in (0, 1], got '1e-4'"),
        (dict(max_steps=2.5), "max_steps: expected an integer >= 1, got 2.5"),
    ],
)
def test_bad_job_files_are_refused_with_one_message_before_the_model_loads(
    job: dict, change: dict, message: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    values = {
        **job["values"],
        **{k: v.format(root=job["root"]) if isinstance(v, str) else v for k, v in change.items()},
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(values))
    assert main(["train", "--config", str(path)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0], caplog.text
    assert "loaded CogDiT" not in caplog.text


def test_a_redirected_training_run_logs_steps_and_loss_prints_lightning_once_and_writes_metrics(
    job: dict, tmp_path: Path
) -> None:
    """What a cluster job sees: stdout and stderr to files (no terminal)."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "diffsynth_cog.cli", "train", "--config", str(job["job"]), "--set", f"output_dir={out}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert "diffsynth_cog.training.console: step 3/3  loss " in console  # the last step of a short run
    assert console.count("GPU available:") == 1  # Lightning's own lines, once
    assert "Epoch 0/-2" not in console and "-2" not in result.stdout
    metrics = next((out / "logs").rglob("metrics.csv")).read_text().splitlines()
    assert metrics[0].split(",")[:1] and "train/loss" in metrics[0] and len(metrics) >= 2


def test_on_a_terminal_the_bar_counts_the_runs_steps(
    job: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import diffsynth_cog.training.console as console
    from diffsynth_cog.training.config import TrainConfig
    from diffsynth_cog.training.trainer import run_training

    monkeypatch.setattr(console, "console_is_terminal", lambda: True)
    config = TrainConfig(**{**job["values"], "output_dir": str(tmp_path / "out")})
    run_training(config, progress=True, export=False)
    bar = capsys.readouterr().out  # Lightning's tqdm bar draws on stdout
    assert "train: 100%" in bar and "3/3" in bar and "Epoch" not in bar and "v_num" not in bar
