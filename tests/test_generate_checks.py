"""``diffsynth-cog generate`` checks every input before any model loads (issue 26's cases): batches and their
output folder, input videos opened and measured, option pairs against the model, seeds."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from tiny_models import save_tiny_model_folder

from diffsynth_cog.cli.generate import generation_options
from diffsynth_cog.cli.generate_checks import check_generate_args
from diffsynth_cog.cli.main import build_parser, main
from diffsynth_cog.io.video import save_video

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b"), "cogvideox-5b", seed=2)


@pytest.fixture(scope="module")
def folder_2b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-2b"), "cogvideox-2b", seed=2)


@pytest.fixture(scope="module")
def folder_15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-15"), "cogvideox1.5-5b", seed=2)


def tiny(folder: Path, tmp_path: Path, *extra: str, prompt: bool = True) -> list[str]:
    argv = ["generate", "--model", str(folder), "--lora", "none", "--device", "cpu", "--dtype", "fp32"]
    argv += ["--num-frames", "9", "--height", "32", "--width", "48", "--steps", "1", "--no-download", "--no-progress"]
    argv += ["--models-dir", str(tmp_path / "models")]
    return argv + (["--prompt", "a lighthouse"] if prompt else []) + list(extra)


def refused(argv: list[str], caplog: pytest.LogCaptureFixture) -> str:
    """Runs the command, which must fail before any model loads with one error message; returns it."""
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    assert main(argv) == 2
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(messages) == 1, caplog.text
    assert "loaded cog_" not in caplog.text
    return messages[0]


def video_file(path: Path, frames: int, height: int = 32, width: int = 48) -> Path:
    save_video(np.random.default_rng(0).integers(0, 255, (frames, height, width, 3), dtype=np.uint8), path)
    return path


# --------------------------------------------------------------------------------------------- batches
def prompt_file(tmp_path: Path, *lines: object) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_a_batch_whose_output_dir_is_a_file_is_refused_before_the_first_video(folder, tmp_path, caplog):
    (tmp_path / "afile").write_text("in the way")
    prompts = prompt_file(tmp_path, "a cat", "a dog")
    message = refused(tiny(folder, tmp_path, "--prompts", str(prompts), "--output-dir", str(tmp_path / "afile"),
                           prompt=False), caplog)  # fmt: skip
    assert "--output-dir" in message and "afile" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_batch_into_a_read_only_folder_is_refused_before_the_first_video(folder, tmp_path, caplog):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    prompts = prompt_file(tmp_path, "a cat")
    message = refused(tiny(folder, tmp_path, "--prompts", str(prompts), "--output-dir", str(out), prompt=False), caplog)
    assert "cannot write" in message


def test_every_batch_line_is_checked_first_and_a_bad_one_refuses_the_batch_naming_its_line(folder, tmp_path, caplog):
    prompts = prompt_file(
        tmp_path, {"prompt": "a cat"}, {"prompt": "a dog", "num_frames": 53}, {"prompt": "a fox", "seed": -7}
    )
    out = tmp_path / "videos"
    message = refused(tiny(folder, tmp_path, "--prompts", str(prompts), "--output-dir", str(out), prompt=False), caplog)
    assert "2 bad line(s); nothing was generated" in message
    assert (
        f"{prompts}:2: num_frames must be 8k+1" in message and f"{prompts}:3: seed must be an integer >= -1" in message
    )
    assert not out.exists() or not list(out.iterdir())


def test_batch_outputs_stay_inside_the_output_dir_unless_allowed(folder, tmp_path, caplog):
    prompts = prompt_file(tmp_path, {"prompt": "a cat", "output": "../../x.mp4"})
    argv = tiny(folder, tmp_path, "--prompts", str(prompts), "--output-dir", str(tmp_path / "v"), prompt=False)
    assert "is outside --output-dir" in refused(argv, caplog)
    args = build_parser().parse_args([*argv, "--allow-outside-output-dir"])
    assert check_generate_args(args, generation_options(args)).jobs[0].output == tmp_path / "v" / "../../x.mp4"


def test_output_with_prompts_is_refused(folder, tmp_path, caplog):
    prompts = prompt_file(tmp_path, "a cat")
    argv = tiny(folder, tmp_path, "--prompts", str(prompts), "--output", str(tmp_path / "x.mp4"), prompt=False)
    assert "--output" in refused(argv, caplog) and "--output-dir" in caplog.text


# --------------------------------------------------------------------------------------------- input videos
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--extend-by", "4", "--context-frames", "9"], "extend_by must be a positive multiple of 8"),
        (["--extend-by", "8", "--context-frames", "10"], "context_frames must be 8k+1"),
        (["--extend-by", "8", "--context-frames", "17"], "context_frames=17 exceeds the video's 9 frames"),
        (["--num-frames", "17"], "has 9 frames; --num-frames 17 needs at least that many"),
    ],
)
def test_input_video_is_opened_and_measured_before_any_model_loads(folder, tmp_path, caplog, extra, message):
    source = video_file(tmp_path / "in.mp4", 9)
    argv = tiny(folder, tmp_path, "--input-video", str(source), "--output", str(tmp_path / "o.mp4"), *extra)
    assert message in refused(argv, caplog)


def test_an_unreadable_input_video_is_refused_before_any_model_loads(folder, tmp_path, caplog):
    (tmp_path / "broken.mp4").write_text("not a video")
    argv = tiny(folder, tmp_path, "--input-video", str(tmp_path / "broken.mp4"), "--output", str(tmp_path / "o.mp4"))
    assert "broken.mp4" in refused(argv, caplog)


def test_a_resized_or_cut_input_video_is_logged_once_with_what_was_done(folder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    source = video_file(tmp_path / "big.mp4", 17, 64, 96)
    args = build_parser().parse_args(tiny(folder, tmp_path, "--input-video", str(source), "--output", "o.mp4"))
    plan = check_generate_args(args, generation_options(args))
    assert len(plan.input_video) == 9 and plan.input_video[0].size == (48, 32)
    logs = [r.getMessage() for r in caplog.records]
    assert logs.count(f"--input-video {source}: resized from 96x64 to 48x32 (scaled to cover, centre-cropped)") == 1
    assert logs.count(f"--input-video {source}: using its first 9 of 17 frames") == 1
    assert plan.options.sampling.denoising_strength == 0.7


def test_a_continued_video_starts_its_new_frames_from_noise_unless_a_strength_is_given(folder, tmp_path):
    source = video_file(tmp_path / "in.mp4", 9)
    argv = tiny(folder, tmp_path, "--input-video", str(source), "--extend-by", "8", "--context-frames", "9")
    for extra, strength in (([], 1.0), (["--denoising-strength", "0.5"], 0.5)):
        args = build_parser().parse_args([*argv, "--output", str(tmp_path / "o.mp4"), *extra])
        plan = check_generate_args(args, generation_options(args))
        assert plan.options.sampling.denoising_strength == strength and len(plan.input_video) == 9


def test_denoising_strength_without_an_input_video_is_refused(folder, tmp_path, caplog):
    argv = tiny(folder, tmp_path, "--denoising-strength", "0.5", "--output", str(tmp_path / "o.mp4"))
    assert "--denoising-strength 0.5 sets how much of an --input-video is kept" in refused(argv, caplog)


# --------------------------------------------------------------------------------------------- options x model
def test_option_pairs_that_cannot_work_with_the_model_are_refused_before_loading(folder, folder_2b, tmp_path, caplog):
    out = ["--output", str(tmp_path / "o.mp4")]
    cases = [
        (tiny(folder, tmp_path, "--quantize", "fp8", *out), "--quantize fp8 runs fp8 matmuls, which need a CUDA GPU"),
        (tiny(folder_2b, tmp_path, "--riflex", *out), "riflex needs a RoPE model"),
        (tiny(folder, tmp_path, "--step-cache", "0.2", "--step-cache-method", "teacache", *out), "needs a calibration"),
        (tiny(folder, tmp_path, "--step-cache", "0.2", "--step-cache-method", "tea", *out), "'tea' is not a known"),
        (tiny(folder, tmp_path, "--sampler", "euler", *out), "--sampler 'euler' is not a known sampler"),
        (tiny(folder, tmp_path, "--seed", "-5", *out), "--seed must be an integer >= -1 and <= 18446744073709551615"),
    ]
    for argv, message in cases:
        caplog.clear()
        assert message in refused(argv, caplog)


def test_what_cogvideox_15_cannot_run_is_refused_before_loading(folder_15, tmp_path, caplog):
    out = ["--output", str(tmp_path / "o.mp4")]
    source = str(video_file(tmp_path / "in.mp4", 9))
    cases = [
        (tiny(folder_15, tmp_path, "--sampler", "diffsynth", *out), "sampler='diffsynth' follows DiffSynth-Studio"),
        (tiny(folder_15, tmp_path, "--conventions", "diffsynth", *out), "conventions='diffsynth' follow DiffSynth"),
        (tiny(folder_15, tmp_path, "--input-video", source, *out), "input_video (video-to-video, continuation) is"),
        (
            tiny(folder_15, tmp_path, "--input-video", source, "--extend-by", "8", "--context-frames", "9", *out),
            "not supported on CogVideoX1.5-5B",
        ),
    ]
    for argv, message in cases:
        caplog.clear()
        assert message in refused(argv, caplog)


@pytest.mark.parametrize("rank,messages", [("0", 1), ("1", 0)])
def test_a_parallel_layout_that_cannot_work_is_refused_before_loading_by_rank_0_only(
    folder, tmp_path, caplog, monkeypatch, rank, messages
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    assert main(tiny(folder, tmp_path, "--ulysses", "3", "--output", str(tmp_path / "o.mp4"))) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == messages and "loaded cog_" not in caplog.text
    assert all("on 2 processes" in e for e in errors)


@pytest.mark.parametrize(
    "model,expected",
    [
        ("CogVideoX1.5-5B", {"height": 768, "width": 1360, "num_frames": 81, "fps": 16}),
        ("CogVideoX-5B", {"height": 480, "width": 720, "num_frames": 129, "fps": 8}),
    ],
)
def test_generate_takes_the_chosen_models_defaults_for_size_frames_and_fps(model, expected):
    from diffsynth_cog.cli.generate_checks import apply_model_defaults
    from diffsynth_cog.cli.main import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x", "--model", model])
    apply_model_defaults(args)
    assert {k: getattr(args, k) for k in expected} == expected
    given = build_parser().parse_args(["generate", "--prompt", "x", "--model", model, "--num-frames", "161"])
    apply_model_defaults(given)
    assert given.num_frames == 161  # what the user gives stays


def test_lora_auto_knows_that_cogvideox15_was_trained_on_161_frames(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from diffsynth_cog.cli.checks import choose_lora, choose_model

    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    v15, v10 = choose_model("CogVideoX1.5-5B"), choose_model("CogVideoX-5B")
    assert (v15.base_frames, v10.base_frames) == (161, 49)
    assert choose_lora("auto", v15, 161, tmp_path).preset is None  # its own length: no LoRA, no warning
    assert "trained on" not in caplog.text
    choose_lora("auto", v15, 241, tmp_path)  # beyond it: no long-video LoRA is known for 1.5, said once
    assert "241 frames run on the base model, trained on 161" in caplog.text
    assert choose_lora("auto", v10, 129, tmp_path).preset == "ExVideo-CogVideoX-LoRA-129f-v1"
