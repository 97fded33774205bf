"""The command line's "longer videos" options: parsing and checks before loading, and whole runs on a tiny model."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from tiny_models import save_tiny_model_folder

from diffsynth_cog.cli.generate import generation_options
from diffsynth_cog.cli.main import build_parser, main
from diffsynth_cog.denoise.masks import RadialAttention, TemporalWindowAttention
from diffsynth_cog.denoise.windows import WindowSpec
from diffsynth_cog.io.video import load_video, save_video, tensor_to_frames
from diffsynth_cog.pipeline.options import StepCacheSpec

BASE = ["generate", "--prompt", "a river", "--output", "x.mp4"]


def options(*extra: str) -> dict:
    """The long-video parts the options of ``extra`` give, by field name, without the unset ones."""
    parts = generation_options(build_parser().parse_args(BASE + list(extra))).long_video
    return {k: v for k, v in vars(parts).items() if v is not None}


def test_long_video_options_become_values_of_the_generation_options():
    assert options() == {}
    assert options("--riflex") == {"riflex": True}
    assert options("--riflex", "2", "20") == {"riflex": (2, 20)}
    window = options("--sparse-attention", "window:2")["attention"]
    assert isinstance(window, TemporalWindowAttention) and window.window == 2 and window.granularity == "block"
    assert isinstance(options("--sparse-attention", "radial")["attention"], RadialAttention)
    assert isinstance(options("--attention", "radial")["attention"], RadialAttention)  # --attention takes masks too
    assert options("--sparse-attention", "radial:token")["attention"].name == "radial-token"
    assert options("--window-frames", "49", "--window-overlap", "0.5") == {"windows": WindowSpec(49, 0.5)}
    assert options("--windows", "49") == {"windows": WindowSpec(49)}
    assert options("--step-cache", "0.2") == {"step_cache": StepCacheSpec(0.2, "auto")}
    assert options("--step-cache", "0.1", "--step-cache-method", "first-block") == {
        "step_cache": StepCacheSpec(0.1, "first-block")
    }


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--riflex", "2"], "no value or two"),
        (["--sparse-attention", "window"], "unknown attention"),
        (["--window-frames", "50"], "4k\\+1"),
        (["--extend-by", "8"], "--input-video"),
    ],
)
def test_bad_long_video_options_fail_before_loading(tmp_path, caplog, extra, message):
    # The model folder does not exist: the option check must be what fails.
    args = ["generate", "--prompt", "x", "--model", str(tmp_path / "missing"), "--device", "cpu", "--no-download"]
    assert main(args + ["--output", str(tmp_path / "x.mp4")] + extra) == 2
    assert re.search(message, caplog.text) and "missing" not in caplog.text


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b-cli-long"), "cogvideox-5b", seed=1)


def tiny_args(folder, out) -> list[str]:
    args = ["generate", "--prompt", "a lighthouse", "--model", str(folder), "--lora", "none", "--device", "cpu"]
    return (
        args
        + ["--dtype", "fp32", "--height", "32", "--width", "48", "--steps", "2", "--output", str(out)]
        + [
            "--no-download",
            "--no-progress",
        ]
    )


def test_generate_with_windows_sparse_attention_riflex_and_step_cache(folder, tmp_path):
    out = tmp_path / "long.mp4"
    extra = ["--num-frames", "17", "--window-frames", "9", "--sparse-attention", "window:1", "--riflex", "1", "2"]
    assert main(tiny_args(folder, out) + extra + ["--step-cache", "0.5"]) == 0
    assert len(load_video(out)) == 17


def test_extend_a_video_from_the_command_line(folder, tmp_path):
    source = tmp_path / "in.mp4"
    save_video(tensor_to_frames(torch.rand(3, 9, 32, 48) * 2 - 1), source, fps=8)
    out = tmp_path / "longer.mp4"
    extra = ["--input-video", str(source), "--extend-by", "8", "--context-frames", "9"]
    assert main(tiny_args(folder, out) + extra) == 0
    assert len(load_video(out)) == 17


def test_generate_hints_the_frame_by_frame_window_for_a_flex_attention_window_and_stays_quiet_otherwise(caplog):
    from diffsynth_cog.cli.generate import _hint_frame_window

    expected = {
        "window:2": "window:2:frame",
        "window:1:nosink:token": "window:1:nosink:frame",
        "window:2:frame": None,  # already frame by frame
        "radial": None,  # not one band per frame: no frame-by-frame form
    }
    for spec, hint in expected.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="diffsynth_cog.cli.main"):
            _hint_frame_window(spec)
        said = [r.getMessage() for r in caplog.records]
        if hint is None:
            assert said == [], spec
        else:
            assert len(said) == 1 and f"--sparse-attention {hint} " in said[0], said
