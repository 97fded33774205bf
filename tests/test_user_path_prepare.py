"""``diffsynth-cog prepare`` as a user meets it: a dataset where nothing can be used is a failure that says why,
and every message about one clip names the clip's record in the index file (not "prompt 0")."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_training_data import model_dir, synthetic_clip  # noqa: F401 (fixture)

from diffsynth_cog.cli.main import main
from diffsynth_cog.io.video import save_video

pytestmark = pytest.mark.usefixtures("one_thread")


def prepare_argv(data: Path, model: Path, cache: Path) -> list[str]:
    argv = ["prepare", "--dataset", str(data), "--model", str(model), "--cache", str(cache), "--num-frames", "9"]
    return argv + ["--height", "32", "--width", "48", "--device", "cpu", "--num-workers", "0", "--no-progress"]


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def bad_clips(data: Path) -> list[str]:
    """clip0: not a video; clip1: 5 frames (9 needed); clip2: missing."""
    data.mkdir(parents=True)
    (data / "clip0.mp4").write_text("not a video")
    save_video(synthetic_clip(5, seed=1), data / "clip1.mp4", fps=8)
    return ["clip0.mp4", "clip1.mp4", "clip2.mp4"]


def test_prepare_where_every_clip_is_bad_fails_and_names_each_record(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = tmp_path / "data"
    names = bad_clips(data)
    (data / "metadata.json").write_text(json.dumps([{"file_name": n, "text": f"clip {n}"} for n in names]))
    assert main(prepare_argv(data, model_dir, tmp_path / "cache")) == 2
    (error,) = messages(caplog, logging.ERROR)
    assert "none of the 3 clips" in error and "1 too short, 1 unreadable, 1 missing" in error
    for record, name, reason in (
        (1, "clip0.mp4", "unreadable"),
        (2, "clip1.mp4", "too short"),
        (3, "clip2.mp4", "missing"),
    ):
        assert f"metadata.json record {record} ({name}): {reason}" in error
    assert "at least 9 frames" in error


def test_prepare_with_some_good_clips_succeeds_and_names_the_skipped_csv_lines(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    data = tmp_path / "data"
    names = bad_clips(data)
    save_video(synthetic_clip(9, seed=2), data / "good.mp4", fps=8)
    # Line 1 is the header; the quoted caption of good.mp4 spans lines 2-3, so the bad clips are on lines 4-6.
    rows = ['good.mp4,"a caption\nover two lines"'] + [f"{n},caption of {n}" for n in names]
    (data / "metadata.csv").write_text("video,prompt\n" + "\n".join(rows) + "\n")
    assert main(prepare_argv(data, model_dir, tmp_path / "cache")) == 0
    skipped = [m for m in messages(caplog, logging.INFO) if m.startswith("skipped ")]
    assert [m.split(" (")[0] for m in skipped] == [f"skipped metadata.csv line {n}" for n in (4, 5, 6)]


def test_a_cut_prompt_is_named_by_its_line_not_as_prompt_0(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        save_video(synthetic_clip(9, seed=i), data / f"v{i}.mp4", fps=8)
    long = " ".join(["a very long caption"] * 20)  # far beyond the tiny encoder's max_length
    (data / "prompts.txt").write_text(f"{long}\n{long}\n")
    (data / "videos.txt").write_text("v0.mp4\nv1.mp4\n")
    assert main(prepare_argv(data, model_dir, tmp_path / "cache")) == 0
    cut = [m for m in messages(caplog, logging.WARNING) if "tokens long" in m]
    assert [m.split(" is ")[0] for m in cut] == ["prompts.txt line 1", "prompts.txt line 2"]
