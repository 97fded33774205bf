"""An exported LoRA can be shared: its header names the model and data but shows no local path (unless asked),
it is readable by others as any file the user writes, and export-lora tells a wrong input in one short line."""

from __future__ import annotations

import json
import logging
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import PRESET_FLAGS, TINY_DIT

from diffsynth_cog.cli.main import main
from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.io.atomic import save_safetensors_atomic, torch_save_atomic, write_json_atomic
from diffsynth_cog.training.config import TrainConfig


def train_config(root: Path) -> dict:
    """A job's config as the trainer stores it in its checkpoints: absolute local paths under ``root``."""
    config = TrainConfig(
        model=str(root / "home" / "alice" / "models" / "CogVideoX-5b"),
        cache_dir=str(root / "home" / "alice" / "caches" / "cache-129f"),
        output_dir=str(root / "home" / "alice" / "runs" / "exvideo-run"),
        validation_prompts=("a cat",),
        validation_images=(str(root / "home" / "alice" / "images" / "cat.png"),),
    )
    return config.to_dict()


def write_checkpoint(path: Path, root: Path, rank: int = 4) -> Path:
    """A training checkpoint as the trainer writes it (our entry + the LoRA weights), made by hand."""
    config = DiTConfig.from_dict({**TINY_DIT, **PRESET_FLAGS["cogvideox-5b"]})
    layers = {f"blocks.{b}.attn1.to_{p}": {"rank": rank, "alpha": float(rank)} for b in (0, 1) for p in "qkv"}
    weights = {}
    for name in layers:
        weights[f"dit.{name}.lora_A.weight"] = torch.randn(rank, 32)
        weights[f"dit.{name}.lora_B.weight"] = torch.randn(32, rank)
    info = {"version": 1, "train_config": train_config(root), "dit_config": config.to_dict(), "lora_layers": layers}
    torch.save({"diffsynth_cog": info, "state_dict": weights, "global_step": 10}, path)
    return path


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_exported_lora_header_keeps_names_not_local_paths(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "step0000010.ckpt", tmp_path)
    out = tmp_path / "lora.safetensors"
    assert main(["export-lora", "--checkpoint", str(checkpoint), "--output", str(out)]) == 0
    meta = header(out)
    assert str(tmp_path) not in json.dumps(meta) and "alice" not in json.dumps(meta)
    assert meta["base_model"] == "CogVideoX-5b"
    assert meta["base_model_family"] == "cogvideox-5b"
    config = json.loads(meta["diffsynth_cog_train_config"])
    assert (config["model"], config["cache_dir"], config["output_dir"]) == ("CogVideoX-5b", "cache-129f", "exvideo-run")
    assert config["validation_images"] == ["cat.png"] and config["validation_prompts"] == ["a cat"]
    assert config["lora_rank"] == 64 and config["learning_rate"] == 1e-5  # the recipe itself stays


def test_include_paths_keeps_the_full_paths_in_the_header(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "step0000010.ckpt", tmp_path)
    out = tmp_path / "lora.safetensors"
    assert main(["export-lora", "--checkpoint", str(checkpoint), "--output", str(out), "--include-paths"]) == 0
    meta = header(out)
    config = json.loads(meta["diffsynth_cog_train_config"])
    assert config == train_config(tmp_path)
    assert meta["base_model"] == str(tmp_path / "home" / "alice" / "models" / "CogVideoX-5b")


@pytest.fixture
def umask():
    """Set a umask for one test; the old one comes back after it."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def plain_file_mode(folder: Path) -> int:
    """The mode a plain ``open(path, "w")`` gives a new file here (the reference every writer should match)."""
    probe = folder / "plain.txt"
    probe.write_text("x")
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_every_atomic_writer_gives_new_files_the_mode_a_plain_open_gives(tmp_path: Path, umask, mask: int) -> None:
    umask(mask)
    expected = plain_file_mode(tmp_path)
    save_safetensors_atomic(tmp_path / "a.safetensors", {"w": torch.zeros(2)})
    torch_save_atomic(tmp_path / "b.ckpt", {"w": torch.zeros(2)})
    write_json_atomic(tmp_path / "c.json", {"a": 1})
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.safetensors": expected, "b.ckpt": expected, "c.json": expected}


def test_exported_lora_is_readable_by_others_as_the_checkpoint_is(tmp_path: Path, umask) -> None:
    umask(0o022)
    checkpoint = write_checkpoint(tmp_path / "step0000010.ckpt", tmp_path)
    out = tmp_path / "lora.safetensors"
    assert main(["export-lora", "--checkpoint", str(checkpoint), "--output", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(checkpoint.stat().st_mode) == 0o644


def test_a_replaced_file_keeps_its_own_mode(tmp_path: Path, umask) -> None:
    umask(0o022)
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"old")
    target.chmod(0o640)  # the user restricted it on purpose
    save_safetensors_atomic(target, {"w": torch.zeros(2)})
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def not_checkpoints(tmp_path: Path) -> dict[str, Path]:
    files = {
        "text": tmp_path / "notes.txt",
        "pickle": tmp_path / "object.pkl",
        "safetensors": tmp_path / "lora.safetensors",
        "plain torch file": tmp_path / "weights.pt",
    }
    files["text"].write_text("hello, not a checkpoint\n")
    files["pickle"].write_bytes(pickle.dumps(logging.Logger, protocol=4))  # a global: refused by weights_only
    save_file({"w": torch.zeros(2)}, str(files["safetensors"]))
    torch.save({"w": torch.zeros(2)}, files["plain torch file"])
    return files


@pytest.mark.parametrize("kind", ["text", "pickle", "safetensors", "plain torch file"])
def test_export_lora_of_a_file_that_is_no_checkpoint_is_one_short_line_saying_what_to_pass(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    path = not_checkpoints(tmp_path)[kind]
    out = tmp_path / "out.safetensors"
    assert main(["export-lora", "--checkpoint", str(path), "--output", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    (message,) = errors
    assert str(path) in message and "diffsynth-cog train" in message and "checkpoints" in message
    assert len(message) < 400 and "\n" not in message
    assert "weights_only` argument" not in message and "arbitrary code" not in message  # torch's lecture
    assert "Warning" not in capfd.readouterr().err
    assert not out.exists()
