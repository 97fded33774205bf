"""The diffsynth-cog command line on a tiny model folder."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_model_folder

from diffsynth_cog import CogVideoPipeline, ModelManager, StepCache, quantize_dit
from diffsynth_cog.cli.main import main
from diffsynth_cog.io.video import load_video, save_video


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
    assert "Nearest valid values: 49 or 57" in caplog.text
    assert "loaded cog_" not in caplog.text  # checked before any model was loaded
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("given", ["", "transformer", "transformer/diffusion_pytorch_model.safetensors"])
def test_local_model_may_be_the_folder_or_its_transformer(folder, given):
    """The CLI loads the whole model folder around a transformer folder or file it is given."""
    from diffsynth_cog.cli.checks import LoRAChoice, choose_model, fetch_models

    model = choose_model(str(folder / given))
    assert fetch_models(model, LoRAChoice(), models_dir="unused", download=False, progress=False)[0] == folder


@pytest.mark.parametrize(
    "command,option", [("generate", "--models-dir"), ("download", "--models-dir"), ("upload-lora", "--repo-id")]
)
def test_help_texts(command, option):
    out = subprocess.run(
        [sys.executable, "-m", "diffsynth_cog.cli", command, "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: diffsynth-cog" in out and option in out


# Every option that shapes the output is given, so that the in-process run below can repeat it.
GENERATE = ["generate", "--prompt", "a lighthouse", "--negative-prompt", "fog", "--lora", "none"]
GENERATE += ["--device", "cpu", "--dtype", "fp32", "--num-frames", "9", "--height", "32", "--width", "48"]
GENERATE += ["--steps", "6", "--cfg-scale", "6", "--sampler", "ddim", "--seed", "5", "--no-tiled-vae"]
GENERATE += ["--fps", "8", "--quality", "10", "--no-download", "--no-progress"]
# The tiny random DiT changes a lot from step to step (block 0's relative change ~0.5-1.2), so a
# threshold that skips steps here is larger than the real models' 0.1-0.3.
STEP_CACHE = 1.0


def cli_video(folder, path, *options: str) -> np.ndarray:
    """Runs ``diffsynth-cog generate`` with ``options``; the mp4's frames as uint8 [F, H, W, 3]."""
    assert main([*GENERATE, "--model", str(folder), "--output", str(path), *options]) == 0
    return np.stack([np.asarray(f) for f in load_video(path)])


def library_video(folder, path, quantize: str | None = None, step_cache: StepCache | None = None) -> np.ndarray:
    """The same generation through the library, written and read back as the CLI does."""
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
    if quantize is not None:
        quantize_dit(manager.fetch_model("cog_dit"), quantize)
    pipe = CogVideoPipeline.from_model_manager(manager, device="cpu")
    frames = pipe(
        prompt="a lighthouse",
        negative_prompt="fog",
        num_frames=9,
        height=32,
        width=48,
        num_inference_steps=6,
        cfg_scale=6.0,
        sampler="ddim",
        seed=5,
        tiled=False,
        progress_bar=False,
        step_cache=step_cache,
    )
    save_video(frames, path, fps=8, quality=10)
    return np.stack([np.asarray(f) for f in load_video(path)])


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def plain_video(folder, tmp_path_factory):
    return cli_video(folder, tmp_path_factory.mktemp("plain") / "plain.mp4")


def test_plain_generate_equals_the_library_run(folder, tmp_path, plain_video):
    """The harness of the two tests below: without options the CLI is the library call it claims to be."""
    assert np.array_equal(plain_video, library_video(folder, tmp_path / "lib.mp4"))


def test_quantize_int8_takes_effect(folder, tmp_path, plain_video):
    quantized = cli_video(folder, tmp_path / "int8.mp4", "--quantize", "int8")
    assert mean_abs(quantized, plain_video) > 0.1  # int8 weight error: ~1 level of 255 on average here
    assert np.array_equal(quantized, library_video(folder, tmp_path / "lib.mp4", quantize="int8"))


def test_step_cache_takes_effect(folder, tmp_path, plain_video):
    cached = cli_video(folder, tmp_path / "cached.mp4", "--step-cache", str(STEP_CACHE))
    assert mean_abs(cached, plain_video) > 1.0
    cache = StepCache(STEP_CACHE)
    assert np.array_equal(cached, library_video(folder, tmp_path / "lib.mp4", step_cache=cache))
    assert cache.stats()["skipped"] > 0


def test_int8_and_step_cache_together(folder, tmp_path, plain_video):
    both = cli_video(folder, tmp_path / "both.mp4", "--quantize", "int8", "--step-cache", str(STEP_CACHE))
    cache = StepCache(STEP_CACHE)
    assert np.array_equal(both, library_video(folder, tmp_path / "lib.mp4", quantize="int8", step_cache=cache))
    assert cache.stats()["skipped"] > 0


def test_generate_with_a_missing_attention_kernel_fails_before_loading(folder, tmp_path, monkeypatch, caplog):
    from diffsynth_cog.models import attention

    monkeypatch.setattr(attention, "_fa3_module", lambda: None)
    # The model path does not exist either: the attention check must be what fails, before any loading.
    args = ["generate", "--prompt", "x", "--model", str(folder / "missing"), "--attention", "fa3", "--device", "cpu"]
    assert main(args + ["--output", str(tmp_path / "x.mp4"), "--no-download"]) == 2
    assert "pip install fa3-fwd" in caplog.text and "missing" not in caplog.text
    assert attention.get_attention_backend() == "auto"
