"""The one atomic writer: a failed write changes nothing and leaves no temporary file; every writer of
the project goes through it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffsynth_cog.io import atomic
from diffsynth_cog.io.atomic import (
    atomic_path,
    save_safetensors_atomic,
    torch_save_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

OLD = b"the previous, complete file\n"


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    path = tmp_path / "out" / "data.json"
    path.parent.mkdir()
    path.write_bytes(OLD)
    return path


def test_successful_write_replaces_the_file_completely_and_leaves_nothing_else(old_file: Path) -> None:
    values = {"b": [1, 2, 3], "a": "x" * 100_000}
    assert write_json_atomic(old_file, values) == old_file
    assert json.loads(old_file.read_text()) == values
    assert old_file.read_text().endswith("\n")
    assert files_in(old_file.parent) == ["data.json"]


def test_new_file_in_a_new_folder(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c.txt"
    write_text_atomic(path, "hello")
    assert path.read_text() == "hello" and files_in(path.parent) == ["c.txt"]


@pytest.mark.parametrize("error", [RuntimeError("writer failed"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_the_old_file_and_removes_the_temporary_one(old_file: Path, error) -> None:
    seen = []
    with pytest.raises(type(error)):
        with atomic_path(old_file) as partial:
            seen.append(partial)
            partial.write_bytes(b"half a fi")
            raise error
    assert seen[0].parent == old_file.parent and seen[0].name.startswith(".data.json.")
    assert old_file.read_bytes() == OLD
    assert files_in(old_file.parent) == ["data.json"]


def test_failed_rename_keeps_the_old_file_and_removes_the_temporary_one(old_file: Path, monkeypatch) -> None:
    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(old_file, b"new")
    assert old_file.read_bytes() == OLD and files_in(old_file.parent) == ["data.json"]


def test_writer_that_creates_no_file_is_an_error(old_file: Path) -> None:
    with pytest.raises(FileNotFoundError, match="without creating the file"):
        with atomic_path(old_file):
            pass
    assert old_file.read_bytes() == OLD and files_in(old_file.parent) == ["data.json"]


def test_data_is_fsynced_before_the_rename(old_file: Path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    write_bytes_atomic(old_file, b"new")
    assert events == ["fsync", "replace", "fsync"]  # file, rename, then the folder


def test_unserialisable_values_change_nothing(old_file: Path) -> None:
    with pytest.raises(TypeError):
        write_json_atomic(old_file, {"x": object()})
    with pytest.raises((TypeError, AttributeError)):
        save_safetensors_atomic(old_file, {"x": "not a tensor"})  # type: ignore[dict-item]
    assert old_file.read_bytes() == OLD and files_in(old_file.parent) == ["data.json"]


def test_safetensors_and_torch_save_round_trip(tmp_path: Path) -> None:
    t = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    save_safetensors_atomic(tmp_path / "t.safetensors", {"t": t}, {"k": "v"})
    assert torch.equal(load_file(tmp_path / "t.safetensors")["t"], t)
    torch_save_atomic(tmp_path / "c.ckpt", {"step": 3, "w": t})
    assert torch.load(tmp_path / "c.ckpt", weights_only=True)["step"] == 3
    assert files_in(tmp_path) == ["c.ckpt", "t.safetensors"]


# -------------------------------------------------------------------------------- every writer uses it
def _write_lora(path: Path) -> None:
    from diffsynth_cog.lora import export_lora, inject_lora

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inject_lora(model, {"0": (2, 2.0)}, generator=torch.Generator().manual_seed(0))
    export_lora(model, path)


def _write_record(path: Path) -> None:
    from diffsynth_cog.training.prepare import write_record

    write_record(path, {"latents": torch.zeros(2, 2)}, {"prompt": "p"})


def _write_video(path: Path) -> None:
    from diffsynth_cog.io.video import save_video

    save_video(np.zeros((5, 16, 16, 3), dtype=np.uint8), path, fps=4)


def _write_download_manifest(path: Path) -> None:
    from diffsynth_cog.hub.downloads import _RemoteFile, _write_manifest
    from diffsynth_cog.hub.presets import ModelPreset

    root = path.parent.parent
    preset = ModelPreset(name=path.stem, model_id="a/b", subfolder="m", files=("w.bin",))
    (root / "m").mkdir(exist_ok=True)
    (root / "m" / "w.bin").write_bytes(b"w")
    _write_manifest(root, preset, [_RemoteFile("w.bin", 1, None)])


def _write_checkpoint(path: Path) -> None:
    from diffsynth_cog.training.trainer import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)


WRITERS = {
    "export_lora": ("lora.safetensors", _write_lora),
    "write_record": ("record.safetensors", _write_record),
    "save_video": ("video.mp4", _write_video),
    "download manifest": ("preset.json", _write_download_manifest),
    "training checkpoint": ("last.ckpt", _write_checkpoint),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_project_writer_goes_through_the_atomic_writer(name: str, tmp_path: Path, monkeypatch) -> None:
    """Each writer stages its file through atomic.py, and a failing rename leaves the old file and no temporary."""
    file_name, write = WRITERS[name]
    from diffsynth_cog.hub.downloads import MANIFEST_FOLDER

    folder = tmp_path / (MANIFEST_FOLDER if name == "download manifest" else "out")
    folder.mkdir()
    target = folder / file_name
    staged: list[Path] = []
    real_temporary_name = atomic.temporary_name
    monkeypatch.setattr(atomic, "temporary_name", lambda t: (staged.append(t), real_temporary_name(t))[1])
    write(target)  # a real, complete write first
    assert staged == [target]
    assert target.stat().st_size > 0 and files_in(folder) == [file_name]
    before = target.read_bytes()

    def refuse(src, dst):
        raise OSError("rename refused")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="rename refused"):
        write(target)
    assert target.read_bytes() == before and files_in(folder) == [file_name]
