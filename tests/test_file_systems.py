"""Full and read-only file systems: no good file is ever replaced by a broken one, and a place that cannot be
written is refused before any work.

Each test mounts a small tmpfs of its own (``mount -t tmpfs -o size=...``): this needs root with the right to
mount, which CI has; elsewhere the tests are skipped, saying why. A "full disk" is the tmpfs with a filler file
that leaves a few KiB.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training_data import model_dir  # noqa: F401 (fixture)
from test_user_path import generate_args
from test_user_path_training import prepare_argv, write_dataset
from tiny_models import TINY_DIT, save_tiny_model_folder

from diffsynth_cog.cli.main import main
from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.errors import WriteError
from diffsynth_cog.io.video import load_video, save_video
from diffsynth_cog.training.cache import LatentCacheDataset

pytestmark = pytest.mark.usefixtures("one_thread")

Mount = Callable[..., Path]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    """``mount(size="256k", read_only=False)``: a fresh tmpfs under tmp_path, unmounted after the test."""
    mounted: list[Path] = []

    def make(size: str = "256k", read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); needs root (CI runs as root)")
        mounted.append(point)
        return point

    yield make
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free in ``folder``'s file system."""
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(folder).free - leave))
    return filler


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


VIDEO = np.random.default_rng(1).integers(0, 255, (25, 64, 96, 3), dtype=np.uint8)  # noise: ~100 KiB as H.264


def test_full_disk_never_replaces_a_good_video(mount: Mount) -> None:
    disk = mount("512k")
    good = save_video(VIDEO[:9, :32, :48], disk / "video.mp4")
    content = good.read_bytes()
    fill(disk, 16 * 1024)
    with pytest.raises(WriteError, match=r"cannot write .*video\.mp4: No space left on device .*was left as it was"):
        save_video(VIDEO, good, quality=10)
    assert good.read_bytes() == content and len(load_video(good)) == 9
    assert names(disk) == ["filler", "video.mp4"]  # no partial file left behind


def test_full_disk_in_generate_keeps_the_old_video_and_saves_the_new_one_elsewhere(
    tmp_path: Path, mount: Mount, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    folder = save_tiny_model_folder(tmp_path / "model", "cogvideox-5b", seed=2)
    disk = mount("256k")
    out = disk / "out.mp4"
    out.write_bytes(b"an earlier video")
    fill(disk, 4 * 1024)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = generate_args(folder, tmp_path, output=str(out), quality="10", height="64", width="96")
    assert main(argv + ["--overwrite"]) == 2
    (message,) = errors(caplog)
    assert "No space left on device" in message and "was left as it was" in message
    assert out.read_bytes() == b"an earlier video" and names(disk) == ["filler", "out.mp4"]
    (rescued,) = tmp_path.glob("diffsynth-cog-*-out.mp4")  # the hour of GPU time is not lost
    assert f"The generated video was saved to {rescued} instead" in message and len(load_video(rescued)) == 9


def lora_checkpoint(path: Path, rank: int = 64) -> Path:
    """A training checkpoint as the trainer writes it (our entry + the LoRA weights), made by hand."""
    config = DiTConfig.from_dict({**TINY_DIT, "in_channels": 4, "out_channels": 4})
    layers = {f"blocks.{b}.attn1.to_{p}": {"rank": rank, "alpha": float(rank)} for b in (0, 1) for p in "qkv"}
    weights = {}
    for name in layers:
        weights[f"dit.{name}.lora_A.weight"] = torch.randn(rank, 32)
        weights[f"dit.{name}.lora_B.weight"] = torch.randn(32, rank)
    info = {"version": 1, "train_config": {"model": "tiny"}, "dit_config": config.to_dict(), "lora_layers": layers}
    torch.save({"diffsynth_cog": info, "state_dict": weights, "global_step": 10}, path)
    return path


def test_full_disk_in_export_lora_is_one_message_and_keeps_the_old_lora(
    tmp_path: Path, mount: Mount, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = lora_checkpoint(tmp_path / "step0000010.ckpt")
    disk = mount("256k")
    out = disk / "lora.safetensors"
    assert main(["export-lora", "--checkpoint", str(checkpoint), "--output", str(out)]) == 0
    content = out.read_bytes()
    fill(disk, 8 * 1024)  # the LoRA takes ~100 KiB
    assert main(["export-lora", "--checkpoint", str(checkpoint), "--output", str(out), "--overwrite"]) == 2
    assert "No space left on device" in errors(caplog)[0] and "was left as it was" in errors(caplog)[0]
    assert out.read_bytes() == content and names(disk) == ["filler", "lora.safetensors"]


def test_full_disk_in_prepare_keeps_every_finished_record_whole_and_a_rerun_completes(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    mount: Mount,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = write_dataset(tmp_path / "data", ["a cat", "a dog", "a river", "a panda"])
    disk = mount("1m")
    cache = disk / "cache"
    filler = fill(disk, 20 * 1024)  # cache_info.json and about two records (~4 KiB each, in 4 KiB pages)
    assert main(prepare_argv(data, model_dir, cache, "--dtype", "fp32")) == 2
    assert "No space left on device" in errors(caplog)[-1]
    finished = LatentCacheDataset(cache)  # every record the manifest lists is whole (headers checked)
    assert 1 <= len(finished) < 4 and all(finished[i]["latents"].isfinite().all() for i in range(len(finished)))
    assert not [n for n in names(cache) if ".partial" in n]
    filler.unlink()
    assert main(prepare_argv(data, model_dir, cache, "--dtype", "fp32")) == 0
    assert LatentCacheDataset(cache).indices == [0, 1, 2, 3]


def test_read_only_places_are_refused_before_any_work(
    tmp_path: Path,
    mount: Mount,
    model_dir: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    folder = save_tiny_model_folder(tmp_path / "model", "cogvideox-5b", seed=2)
    read_only = mount("64k", read_only=True)
    checkpoint = lora_checkpoint(tmp_path / "step0000010.ckpt", rank=4)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": str(folder), "cache_dir": "c", "output_dir": str(read_only / "run")}))
    data = write_dataset(tmp_path / "data", ["a cat"])
    for argv in (
        generate_args(folder, tmp_path, output=str(read_only / "video.mp4")),
        ["export-lora", "--checkpoint", str(checkpoint), "--output", str(read_only / "lora.safetensors")],
        prepare_argv(data, model_dir, read_only / "cache"),
        ["train", "--config", str(job)],
    ):
        caplog.clear()
        assert main(argv) == 2, argv[0]
        assert "Read-only file system" in errors(caplog)[0] and "write somewhere else" in errors(caplog)[0], argv[0]
        assert "loaded" not in caplog.text, argv[0]
    assert names(read_only) == []
