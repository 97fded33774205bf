"""The diffsynth-cog command line on a tiny model folder."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from tiny_models import save_tiny_model_folder

from diffsynth_cog.cli import main
from diffsynth_cog.video_io import load_video


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b"), "cogvideox-5b", seed=1)


def test_generate_writes_an_mp4_with_the_right_frames_and_size(folder, tmp_path):
    out = tmp_path / "out.mp4"
    code = main(
        [
            "generate",
            "--prompt",
            "a lighthouse at dusk",
            "--model",
            str(folder),
            "--lora",
            "none",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--num-frames",
            "9",
            "--height",
            "32",
            "--width",
            "48",
            "--steps",
            "2",
            "--output",
            str(out),
            "--no-download",
            "--no-progress",
        ]
    )
    assert code == 0
    frames = load_video(out)
    assert len(frames) == 9 and frames[0].size == (48, 32)


def test_generate_rejects_bad_frame_counts_with_a_suggestion(folder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    args = ["generate", "--prompt", "x", "--model", str(folder), "--lora", "none", "--device", "cpu"]
    args += ["--dtype", "fp32", "--num-frames", "50", "--height", "32", "--width", "48", "--no-download"]
    assert main(args + ["--output", str(tmp_path / "x.mp4")]) == 2
    assert "Nearest valid values: 49 or 53" in caplog.text
    assert "loaded cog_" not in caplog.text  # checked before any model was loaded
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("given", ["", "transformer", "transformer/diffusion_pytorch_model.safetensors"])
def test_local_model_may_be_the_folder_or_its_transformer(folder, given):
    """The CLI loads the whole model folder around a transformer folder or file it is given."""
    import argparse

    from diffsynth_cog.cli import _resolve_model

    args = argparse.Namespace(model=str(folder / given), models_dir="unused", no_download=True, no_progress=True)
    assert _resolve_model(args) == folder


@pytest.mark.parametrize(
    "command,option", [("generate", "--models-dir"), ("download", "--models-dir"), ("upload-lora", "--repo-id")]
)
def test_help_texts(command, option):
    out = subprocess.run(
        [sys.executable, "-m", "diffsynth_cog.cli", command, "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: diffsynth-cog" in out and option in out


def test_generate_with_int8_weights_and_step_cache(folder, tmp_path):
    out = tmp_path / "q.mp4"
    args = ["generate", "--prompt", "a lighthouse", "--model", str(folder), "--lora", "none", "--device", "cpu"]
    args += ["--dtype", "fp32", "--num-frames", "9", "--height", "32", "--width", "48", "--steps", "4"]
    args += ["--quantize", "int8", "--step-cache", "0.5", "--output", str(out), "--no-download", "--no-progress"]
    assert main(args) == 0
    assert len(load_video(out)) == 9


def test_cli_attention_choices_match_the_library():
    from diffsynth_cog.cli import ATTENTION_BACKENDS
    from diffsynth_cog.models.attention import BACKENDS

    assert ATTENTION_BACKENDS == BACKENDS


def test_generate_with_a_missing_attention_kernel_fails_before_loading(folder, tmp_path, monkeypatch, caplog):
    from diffsynth_cog.models import attention

    monkeypatch.setattr(attention, "_fa3_module", lambda: None)
    # The model path does not exist either: the attention check must be what fails, before any loading.
    args = ["generate", "--prompt", "x", "--model", str(folder / "missing"), "--attention", "fa3", "--device", "cpu"]
    assert main(args + ["--output", str(tmp_path / "x.mp4"), "--no-download"]) == 2
    assert "pip install fa3-fwd" in caplog.text and "missing" not in caplog.text
    assert attention.get_attention_backend() == "auto"
