"""Video I/O: H.264 round trips, frame sampling, resize/crop geometry and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth_cog.io.video import (
    ImageReadError,
    VideoReadError,
    VideoTooShortError,
    load_image,
    load_video,
    save_video,
    tensor_to_frames,
    video_to_tensor,
)

NUM_FRAMES, HEIGHT, WIDTH = 17, 48, 64
GRAY_STEP = 14  # frame i is filled with gray level i * GRAY_STEP, so the decoded mean names the frame


def moving_square_video(num_frames: int = NUM_FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """[F, H, W, 3] uint8: a gray background whose level encodes the frame index, plus a yellow
    square moving right by 3 px per frame."""
    video = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for i in range(num_frames):
        video[i] = i * GRAY_STEP
        video[i, 8:20, 2 + 3 * i : 14 + 3 * i] = (255, 255, 0)
    return video


def as_array(frames: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(f) for f in frames]).astype(np.float64)


def frame_index(frame: Image.Image) -> int:
    """Recover the frame index from a frame's background gray level (rows below the square)."""
    return round(float(np.asarray(frame)[24:].mean()) / GRAY_STEP)


@pytest.fixture
def video_path(tmp_path: Path) -> Path:
    return save_video(moving_square_video(), tmp_path / "square.mp4", fps=8, quality=9)


def test_round_trip_keeps_frame_count_size_and_pixels(video_path: Path) -> None:
    frames = load_video(video_path)
    assert len(frames) == NUM_FRAMES
    assert all(f.size == (WIDTH, HEIGHT) and f.mode == "RGB" for f in frames)
    decoded, original = as_array(frames), moving_square_video().astype(np.float64)
    # H.264 is lossy and yuv420p halves the colour resolution, so the square's edges smear by up to
    # ~120 levels on a few pixels. At quality 9 (crf 5) the mean error stays below 2 levels of 255,
    # and flat areas away from the square are within 4 levels.
    assert np.abs(decoded - original).mean() < 2.0
    assert np.abs(decoded[:, 28:] - original[:, 28:]).max() <= 4.0
    # The square really moves: its centre column follows 3 px per frame.
    yellow = (decoded[..., 0] > 200) & (decoded[..., 1] > 200) & (decoded[..., 2] < 80)
    centres = [np.nonzero(yellow[i].any(axis=0))[0].mean() for i in range(NUM_FRAMES)]
    np.testing.assert_allclose(np.diff(centres), 3.0, atol=0.6)


def test_frame_interval_and_start_pick_the_right_frames(video_path: Path) -> None:
    frames = load_video(video_path, num_frames=5, frame_interval=3, start_frame=2)
    assert [frame_index(f) for f in frames] == [2, 5, 8, 11, 14]
    everything_from_4 = load_video(video_path, start_frame=4, frame_interval=4)
    assert [frame_index(f) for f in everything_from_4] == [4, 8, 12, 16]


def test_resize_covers_then_centre_crops(tmp_path: Path) -> None:
    # 64x48 source with a red left half and a blue right half; target 32x32 (taller aspect):
    # scale = max(32/48, 32/64) = 2/3 -> 43x32 (round(42.67)), then crop 5 px left and 6 px right.
    video = np.zeros((3, 48, 64, 3), dtype=np.uint8)
    video[:, :, :32] = (255, 0, 0)
    video[:, :, 32:] = (0, 0, 255)
    path = save_video(video, tmp_path / "halves.mp4", quality=10)
    frames = load_video(path, height=32, width=32)
    assert [f.size for f in frames] == [(32, 32)] * 3
    pixels = np.asarray(frames[0]).astype(int)
    # The red/blue boundary sits at x = 21.33 in the 43 px wide resize, i.e. x = 16.33 after the
    # 5 px crop: columns 0..14 are red, 18..31 blue (a column of margin for the resampling filter).
    assert (pixels[:, :15, 0] > 200).all() and (pixels[:, :15, 2] < 60).all()
    assert (pixels[:, 18:, 2] > 200).all() and (pixels[:, 18:, 0] < 60).all()

    wide = load_video(path, height=16, width=64)  # wider than the source aspect: crop rows instead
    assert wide[0].size == (64, 16)


def test_too_short_video_names_file_and_counts(video_path: Path) -> None:
    with pytest.raises(VideoTooShortError) as info:
        load_video(video_path, num_frames=9, frame_interval=2, start_frame=2)  # needs 2 + 8 * 2 + 1 = 19
    message = str(info.value)
    assert str(video_path) in message and f"has {NUM_FRAMES} frames" in message and "need 19" in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_raises_video_read_error(video_path: Path, tmp_path: Path, damage: str) -> None:
    bad = tmp_path / f"{damage}.mp4"
    data = video_path.read_bytes()
    bad.write_bytes(b"not a video at all" * 50 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(VideoReadError, match=str(bad)):
        load_video(bad)
    with pytest.raises(VideoReadError, match="not found"):
        load_video(tmp_path / "missing.mp4")


@pytest.mark.parametrize("quality", [0, 11, -1, 10.5])
def test_quality_out_of_range_raises_and_writes_nothing(tmp_path: Path, quality: float) -> None:
    with pytest.raises(ValueError, match=r"\[1, 10\]"):
        save_video(moving_square_video(num_frames=2), tmp_path / "bad.mp4", quality=quality)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    # Frames of two sizes are rejected before ffmpeg starts; a target that cannot be replaced (a folder
    # of that name) fails after encoding, at the rename, which must remove the temporary file.
    with pytest.raises(ValueError, match="one size"):
        save_video([Image.new("RGB", (8, 8)), Image.new("RGB", (10, 8))], tmp_path / "mixed.mp4")
    target_dir = tmp_path / "out"
    target_dir.mkdir()
    (target_dir / "clip.mp4").mkdir()  # a folder where the file should go: the final rename fails
    with pytest.raises(OSError):
        save_video(moving_square_video(num_frames=2), target_dir / "clip.mp4")
    assert sorted(p.name for p in target_dir.iterdir()) == ["clip.mp4"]  # no *.partial.mp4 left behind
    assert (target_dir / "clip.mp4").is_dir()


def test_odd_sizes_are_padded_to_even(tmp_path: Path) -> None:
    video = moving_square_video(num_frames=3, height=47, width=63)
    frames = load_video(save_video(video, tmp_path / "odd.mp4", quality=10))
    assert frames[0].size == (64, 48)
    decoded = as_array(frames)
    # The padded row/column repeats the last one (flat gray background there: within 4 levels).
    assert np.abs(decoded[:, 47, :63] - decoded[:, 46, :63]).max() <= 4.0
    assert np.abs(decoded[:, :47, 63] - decoded[:, :47, 62]).max() <= 4.0


def test_tensor_input_and_tensor_helpers_round_trip(tmp_path: Path) -> None:
    original = moving_square_video(num_frames=5)
    tensor = video_to_tensor([Image.fromarray(f) for f in original])
    assert tensor.shape == (3, 5, HEIGHT, WIDTH) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    # uint8 -> [-1, 1] -> uint8 is exact (127.5 steps round back to the same integers).
    np.testing.assert_array_equal(as_array(tensor_to_frames(tensor)), original)
    np.testing.assert_array_equal(as_array(tensor_to_frames(tensor[None])), original)
    # Overshoot beyond [-1, 1] (as a VAE decoder produces) is clipped, not wrapped around.
    assert np.asarray(tensor_to_frames(tensor * 1.5)[0]).max() == 255

    from_tensor = load_video(save_video(tensor[None], tmp_path / "t.mp4", quality=9))
    from_float = load_video(save_video(original.astype(np.float32) / 255.0, tmp_path / "f.mp4", quality=9))
    for frames in (from_tensor, from_float):
        assert np.abs(as_array(frames) - original).mean() < 2.0  # same lossy-codec bound as above

    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        save_video(original.astype(np.float32), tmp_path / "range.mp4")  # 0..255 floats: a range mix-up
    with pytest.raises(ValueError, match=r"\[3, F, H, W\]"):
        save_video(torch.zeros(5, 3, 8, 8), tmp_path / "layout.mp4")


def test_load_image_resizes_and_crops(tmp_path: Path) -> None:
    image = Image.new("RGB", (90, 60), (10, 200, 30))
    image.paste((250, 0, 0), (0, 0, 45, 60))
    path = tmp_path / "cond.png"
    image.save(path)
    loaded = load_image(path, height=30, width=30)  # scale 0.5 -> 45x30, crop 7 px from the left
    assert loaded.size == (30, 30) and loaded.mode == "RGB"
    assert np.asarray(loaded)[:, :14, 0].min() > 200 and np.asarray(loaded)[:, 17:, 1].min() > 150
    assert load_image(image.convert("RGBA"), 60, 90).size == (90, 60)
    with pytest.raises(ImageReadError, match="not found"):
        load_image(tmp_path / "nope.png", 30, 30)
    (tmp_path / "broken.png").write_bytes(b"nope")
    with pytest.raises(ImageReadError, match="broken.png"):
        load_image(tmp_path / "broken.png", 30, 30)


# --------------------------------------------------------------------------------------------- layouts
def _levels(frames: list[Image.Image]) -> np.ndarray:
    return np.array([float(np.asarray(f).mean()) for f in frames])


def test_channels_last_tensors_and_arrays_are_frames_height_width(tmp_path: Path) -> None:
    # 4 frames of 32x48 (HxW) whose gray level names the frame: 0.2, 0.4, 0.6, 0.8 of full scale.
    levels = torch.tensor([0.2, 0.4, 0.6, 0.8])
    video = levels[:, None, None, None].expand(4, 32, 48, 3).contiguous()
    expected = [round(v * 255) for v in levels.tolist()]
    for name, frames in {
        "float_tensor": video,
        "uint8_tensor": (video * 255).round().to(torch.uint8),
        "batched_array": video.numpy()[None],
    }.items():
        decoded = load_video(save_video(frames, tmp_path / f"{name}.mp4", quality=10))
        assert [f.size for f in decoded] == [(48, 32)] * 4, name
        np.testing.assert_allclose(_levels(decoded), expected, atol=1.01, err_msg=name)  # yuv420p rounding
    # The VAE layout [3, F, H, W] in [-1, 1] still reads as before: level (x + 1) * 127.5.
    vae = (levels * 2 - 1)[None, :, None, None].expand(3, 4, 32, 48)
    np.testing.assert_allclose(
        _levels(load_video(save_video(vae, tmp_path / "vae.mp4", quality=10))), expected, atol=1.01
    )


def test_a_tensor_with_three_first_and_last_is_refused_unless_the_layout_is_named(tmp_path: Path) -> None:
    video = torch.rand(3, 32, 48, 3)  # 3 frames of 32x48, or 32 frames of 48x3: the shape cannot say
    with pytest.raises(ValueError, match=r"layout='FHWC' or layout='CFHW'") as info:
        save_video(video, tmp_path / "ambiguous.mp4")
    assert "3 frames of 48x32" in str(info.value) and "32 frames of 3x48" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    decoded = load_video(save_video(video, tmp_path / "named.mp4", layout="FHWC"))
    assert len(decoded) == 3 and decoded[0].size == (48, 32)
    with pytest.raises(ValueError, match="needs 3 channels"):
        save_video(torch.rand(5, 8, 8, 3), tmp_path / "wrong.mp4", layout="CFHW")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        save_video(torch.rand(5, 8, 8, 3) * 2 - 1, tmp_path / "range.mp4")  # [-1, 1] floats channels-last


# --------------------------------------------------------------------------------------------- settings
SETTINGS = {
    "model": "CogVideoX-5B",
    "lora": [{"file": "ExVideo-CogVideoX-LoRA-129f-v1.safetensors", "sha256": "ab" * 32, "alpha": 1.0}],
    "prompt": 'an astronaut = "riding"; a horse # on Mars \\ façade\nsecond line',
    "negative_prompt": "",
    "seed": 6,
    "height": 48,
    "width": 64,
    "num_frames": 17,
    "fps": 8,
    "steps": 50,
    "sampler": "ddim",
    "cfg_scale": 7.0,
    "windows": {"size": 49, "overlap": 16},
    "joins": [9, 13],
    "riflex": None,
    "version": "0.1.0",
}


def test_settings_round_trip_through_the_container_and_the_sidecar(tmp_path: Path) -> None:
    from diffsynth_cog.io.settings import joins_of, read_settings, sidecar_path

    path = save_video(moving_square_video(), tmp_path / "with.mp4", settings=SETTINGS)
    assert read_settings(path) == SETTINGS
    assert not sidecar_path(path).exists()
    assert joins_of(read_settings(path)) == [9, 13]
    # The sidecar alone also gives them back (e.g. after a tool rewrote the mp4 without its tags).
    other = save_video(moving_square_video(num_frames=3), tmp_path / "side.mkv", settings=SETTINGS, sidecar=True)
    assert sidecar_path(other) == tmp_path / "side.json"
    assert read_settings(tmp_path / "side.json") == SETTINGS == read_settings(other)
    (tmp_path / "side.json").unlink()
    assert read_settings(other) == SETTINGS  # from the mkv's own tag
    assert read_settings(save_video(moving_square_video(num_frames=2), tmp_path / "none.mp4")) is None


def test_settings_that_json_cannot_hold_are_refused_before_encoding(tmp_path: Path) -> None:
    from diffsynth_cog.io.settings import SettingsError

    for bad, named in [({"seed": torch.tensor(3)}, "seed"), ({"windows": {"size": float("nan")}}, "windows.size")]:
        with pytest.raises(SettingsError, match=named):
            save_video(moving_square_video(num_frames=2), tmp_path / "bad.mp4", settings=bad)
    with pytest.raises(SettingsError, match="joins"):
        save_video(moving_square_video(num_frames=2), tmp_path / "bad.mp4", settings={"joins": [0.5]})
    assert list(tmp_path.iterdir()) == []
