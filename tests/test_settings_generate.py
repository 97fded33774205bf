"""Every generated video carries its settings, ``generate --like`` reproduces it from them bitwise, windows' and
continuations' joins are recorded (and scored by ``evaluate``), and ``color_match`` keeps continuations'
colours stable. Tiny CogVideoX-5B on the CPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_model_folder

from diffsynth_cog import CogVideoPipeline, ModelManager
from diffsynth_cog.cli.main import main
from diffsynth_cog.denoise.windows import WindowSpec
from diffsynth_cog.families import get_family
from diffsynth_cog.io.settings import read_settings, sidecar_path
from diffsynth_cog.io.video import load_video, save_video, tensor_to_frames
from diffsynth_cog.pipeline.settings import window_joins


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b-settings"), "cogvideox-5b", seed=1)


BASE = ["generate", "--prompt", "a lighthouse", "--lora", "none", "--device", "cpu", "--dtype", "fp32"]
BASE += ["--height", "32", "--width", "48", "--steps", "2", "--fps", "8", "--no-download", "--no-progress"]


def frames_of(path) -> np.ndarray:
    return np.stack([np.asarray(f) for f in load_video(path)])


def test_window_joins_are_the_window_starts_in_pixel_frames():
    family = get_family("cogvideox-5b")
    # 17 frames = 5 latent frames; windows of 9 frames (3 latent) overlapping by a third: starts 0, 2 -> pixel 5
    assert window_joins(family, WindowSpec(9, 0.25), 5) == [5]
    assert window_joins(family, WindowSpec(9, 0.25), 7) == [5, 13]
    assert window_joins(family, WindowSpec(49), 13) == []  # one window: no join
    assert family.first_pixel_frame(0) == 0 and family.first_pixel_frame(3) == 9


def test_generate_like_reproduces_a_random_seed_video_bitwise_and_flags_win(folder, tmp_path):
    first, again, changed = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"
    options = ["--num-frames", "17", "--window-frames", "9", "--seed", "-1", "--cfg-scale", "5"]
    assert main([*BASE, "--model", str(folder), *options, "--output", str(first), "--save-settings"]) == 0
    settings = read_settings(first)
    assert settings["seed"] not in (None, -1)  # the seed actually drawn
    assert settings["windows"]["joins"] == settings["joins"] == [5]
    assert settings["cfg_scale"] == 5.0 and settings["command"]["model"] == str(folder)
    assert sidecar_path(first).is_file()
    assert main(["generate", "--like", str(first), "--output", str(again), "--no-progress"]) == 0
    np.testing.assert_array_equal(frames_of(again), frames_of(first))
    assert read_settings(again)["seed"] == settings["seed"]
    assert main(["generate", "--like", str(first), "--steps", "3", "--output", str(changed), "--no-progress"]) == 0
    assert read_settings(changed)["steps"] == 3  # the flag given wins over the video's settings
    assert not np.array_equal(frames_of(changed), frames_of(first))


def test_generate_like_a_video_without_settings_fails_before_any_model_loads(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    plain = tmp_path / "plain.mp4"
    save_video(tensor_to_frames(torch.rand(3, 9, 32, 48) * 2 - 1), plain, fps=8)
    assert main(["generate", "--like", str(plain), "--output", str(tmp_path / "x.mp4")]) == 2
    assert "carries no settings" in caplog.text and "loaded cog_" not in caplog.text
    assert main(["generate", "--like", str(tmp_path / "missing.mp4")]) == 2
    assert "no such file" in caplog.text


def test_evaluate_scores_the_window_joins_a_generated_video_records(folder, tmp_path):
    pytest.importorskip("cv2")
    pytest.importorskip("skimage")
    from diffsynth_cog.evaluate import evaluate_video

    out = tmp_path / "windows.mp4"
    assert (
        main([*BASE, "--model", str(folder), "--num-frames", "25", "--window-frames", "9", "--output", str(out)]) == 0
    )
    report = evaluate_video(out)
    assert [join["frame"] for join in report.joins] == [5, 13] == read_settings(out)["joins"]


# --------------------------------------------------------------------------------------------- continuation
HEIGHT, WIDTH = 64, 96


def world(frames: int) -> np.ndarray:
    """A coloured pattern drifting one pixel a frame, with sensor-like noise (so that a frame differs from the
    next by a few grey levels, as in footage): what a continuation should continue (uint8)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 6, (frames, HEIGHT, WIDTH, 3)).astype(np.float32)
    out = []
    for t in range(frames):
        u = x + t
        red = 120 + 60 * np.sin(u / 9.0) * np.cos(y / 11.0)
        green = 110 + 50 * np.cos(u / 13.0 + y / 17.0)
        blue = 100 + 40 * np.sin((u + y) / 15.0)
        out.append(np.stack([red, green, blue], axis=-1))
    return np.clip(np.stack(out) + noise, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b-colour"), "cogvideox-5b", seed=3)
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[root])
    return CogVideoPipeline.from_model_manager(manager, device="cpu")


def decode_the_world(pipe, monkeypatch, scene: np.ndarray, cast: float, where: list[int]) -> None:
    """The pipeline's decode returns the scene's frames at the clip's place (``where[0]``: its first frame),
    each generated clip ``cast`` warmer (red up, blue down) than the one before: the shift that each round trip
    through the VAE and the model adds, planted, and carried on by the next continuation of its frames."""
    calls = []

    def decode(latents, tiled, progress):  # noqa: ARG001
        calls.append(1)
        count = 4 * (latents.shape[2] - 1) + 1
        clip = scene[where[0] : where[0] + count].astype(np.float32)
        clip[..., 0] *= 1 + cast * len(calls)
        clip[..., 2] *= 1 - cast * len(calls)
        pixels = torch.from_numpy(np.clip(clip, 0, 255).round()).permute(3, 0, 1, 2)[None] / 127.5 - 1
        return pixels

    monkeypatch.setattr(pipe, "decode_latents", decode)


def extend_four_times(pipe, scene: np.ndarray, color_match: bool, where: list[int]) -> np.ndarray:
    video = [f for f in tensor_to_frames(torch.from_numpy(scene[:25]).permute(3, 0, 1, 2) / 127.5 - 1)]
    for _ in range(4):
        where[0] = len(video) - 9
        video = pipe.extend_video(
            video, 16, context_frames=9, prompt="x", num_inference_steps=1, seed=0, progress_bar=False,
            color_match=color_match,
        )  # fmt: skip
    return np.stack([np.asarray(f) for f in video])


def test_color_match_stops_the_colour_drift_of_chained_continuations(pipe, monkeypatch):
    pytest.importorskip("cv2")
    pytest.importorskip("skimage")
    from diffsynth_cog.evaluate import evaluate_frames
    from diffsynth_cog.evaluate.events import DRIFT_DELTA_E

    scene, where = world(25 + 4 * 16), [0]
    decode_the_world(pipe, monkeypatch, scene, cast=0.05, where=where)
    drifting = evaluate_frames(extend_four_times(pipe, scene, False, where), 8)
    assert [e.kind for e in drifting.events if e.kind == "drift"] == ["drift"]
    decode_the_world(pipe, monkeypatch, scene, cast=0.05, where=where)
    matched = evaluate_frames(extend_four_times(pipe, scene, True, where), 8)
    assert [e for e in matched.events if e.kind == "drift"] == []
    assert matched.curves["unexplained_drift"].max() < DRIFT_DELTA_E
    assert pipe.last_settings["continuation"]["color_match"] is True and pipe.last_settings["joins"] == [73]


def test_color_match_leaves_a_clean_continuation_within_a_grey_level(pipe, monkeypatch):
    pytest.importorskip("cv2")
    scene, where = world(25 + 16), [16]
    decode_the_world(pipe, monkeypatch, scene, cast=0.0, where=where)
    video = tensor_to_frames(torch.from_numpy(scene[:25]).permute(3, 0, 1, 2) / 127.5 - 1)
    common = dict(context_frames=9, prompt="x", num_inference_steps=1, seed=0, progress_bar=False, output_type="np")
    plain = pipe.extend_video(video, 16, **common)
    matched = pipe.extend_video(video, 16, color_match=True, **common)
    change = np.abs(np.round(matched * 255).astype(int) - np.round(plain * 255).astype(int))
    assert change.max() <= 1 and change.mean() < 1.0
    assert np.array_equal(np.round(plain[25:] * 255), scene[25:].astype(np.float64))  # the scene, untouched


def test_color_match_without_extend_by_or_opencv_fails_before_loading(folder, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    args = [*BASE, "--model", str(folder), "--num-frames", "9", "--output", str(tmp_path / "x.mp4")]
    assert main([*args, "--color-match"]) == 2
    assert "add --extend-by" in caplog.text
    source = tmp_path / "in.mp4"
    save_video(tensor_to_frames(torch.rand(3, 9, 32, 48) * 2 - 1), source, fps=8)
    monkeypatch.setitem(__import__("sys").modules, "cv2", None)  # OpenCV not installed
    monkeypatch.delitem(__import__("sys").modules, "diffsynth_cog.evaluate.color", raising=False)
    extend = ["--input-video", str(source), "--extend-by", "8", "--context-frames", "9", "--color-match"]
    assert main([*args, *extend]) == 2
    assert "'evaluate' extras" in caplog.text and "loaded cog_" not in caplog.text
