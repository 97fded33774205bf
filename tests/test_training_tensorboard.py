"""Validation videos in TensorBoard, and the text encoder / VAE held only while needed (CPU, tiny model)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from test_training import NUM_FRAMES, tiny_config, workspace  # noqa: F401  (module fixture)

import diffsynth_cog.loading.text_encoder_loader as text_encoder_loader
import diffsynth_cog.loading.vae_loader as vae_loader
import diffsynth_cog.training.module as training_module
from diffsynth_cog.training.trainer import run_training
from diffsynth_cog.training.validation import GIF_MAX_FRAMES, gif_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gif_keeps_at_most_the_frame_budget_and_the_clip_speed() -> None:
    frames = [Image.new("RGB", (720, 480), (i, 0, 0)) for i in range(129)]
    data, height, width = gif_bytes(frames, fps=8)
    gif = Image.open(io.BytesIO(data))
    assert (gif.width, gif.height) == (width, height) == (256, 171)
    assert gif.n_frames == 65 <= GIF_MAX_FRAMES  # every 2nd frame
    assert gif.info["duration"] == 250  # 2 frames at 8 fps per shown frame: the clip plays at its speed


@pytest.mark.slow
def test_validation_videos_reach_tensorboard_and_encoders_are_held_only_while_needed(
    workspace: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events: list[str] = []

    def spy(name: str, module, attribute: str) -> None:
        original = getattr(module, attribute)

        def wrapped(*args, **kwargs):
            events.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, attribute, wrapped)

    spy("t5", text_encoder_loader, "load_text_encoder")
    spy("dit", training_module, "load_dit")
    spy("vae_decoder", vae_loader, "load_vae_decoder")
    spy("vae_encoder", vae_loader, "load_vae_encoder")
    output = tmp_path / "run"
    config = tiny_config(
        workspace,
        output,
        max_steps=4,
        checkpoint_every_n_steps=4,
        validation_every_n_steps=2,
        validation_prompts=("a cat", "a dog"),
        validation_num_inference_steps=2,
        validation_cfg_scale=2.0,
    )
    result = run_training(config, progress=False, export=False)
    assert result.global_step == 4
    # The prompts are encoded once, before the DiT is loaded; the decoder is loaded for each
    # validation's decoding only (the text-to-video model needs no VAE encoder).
    assert events == ["t5", "dit", "vae_decoder", "vae_decoder"]

    runs = list((output / "logs" / "tensorboard").glob("version_*"))
    assert len(runs) == 1
    accumulator = EventAccumulator(str(runs[0]), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert "train/loss" in tags["scalars"] and len(accumulator.Scalars("train/loss")) == 4
    assert {"validation/0", "validation/1"} <= set(tags["images"])
    for i in (0, 1):
        shown = accumulator.Images(f"validation/{i}")
        assert [e.step for e in shown] == [2, 4]
        gif = Image.open(io.BytesIO(shown[-1].encoded_image_string))
        assert gif.format == "GIF" and gif.n_frames == NUM_FRAMES  # the whole 9-frame clip, animated
        assert (gif.width, gif.height) == (48, 32)
        assert f"validation/{i}/file/text_summary" in tags["tensors"]
    text = accumulator.Tensors("validation/1/file/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "step0000004_1.mp4" in text and "a dog" in text
    assert (output / "validation" / "step0000004_1.mp4").is_file()
