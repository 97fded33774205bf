"""A pipeline call's checks and what they derive, without any model (``diffsynth_cog.pipeline.checks``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffsynth_cog.configs import dit_preset
from diffsynth_cog.denoise.windows import WindowSpec
from diffsynth_cog.pipeline.checks import DEFAULT_DIT_TILES, check_call

T2V = dit_preset("cogvideox-5b")
I2V = dataclasses.replace(T2V, in_channels=2 * T2V.out_channels)


def call(config=T2V, **overrides):  # noqa: ANN001, ANN201
    arguments = dict(
        prompt="a",
        negative_prompt="",
        input_image=None,
        input_video=None,
        denoising_strength=1.0,
        height=480,
        width=720,
        num_frames=49,
        cfg_scale=7.0,
        num_inference_steps=50,
        seed=0,
        latents=None,
        dit_tiled=False,
        output_type="pil",
        windows=None,
        keep_frames=0,
    )
    return check_call(config, **{**arguments, **overrides})


def test_a_call_resolves_its_shape_windows_tiles_and_kept_frames():
    checked = call(
        num_frames=129, windows=True, dit_tiled=True, input_video=torch.zeros(1, 3, 129, 480, 720), keep_frames=17
    )
    assert checked.latent_shape == (1, 16, 33, 60, 90)
    assert checked.windows == WindowSpec(T2V.sample_frames) and checked.tiles == DEFAULT_DIT_TILES
    assert checked.kept == 5 and checked.video.shape == (1, 3, 129, 480, 720)
    plain = call()
    assert (plain.windows, plain.tiles, plain.kept, plain.video) == (None, None, 0, None)


@pytest.mark.parametrize(
    "config,overrides,message",
    [
        (T2V, {"output_type": "mp4"}, "output_type must be 'pil', 'np' or 'latent'; got 'mp4'"),
        (T2V, {"prompt": 3}, "prompt must be a string"),
        (I2V, {}, "image-to-video model: pass input_image"),
        (T2V, {"input_image": "x.png"}, "input_image needs an I2V transformer"),
        (T2V, {"latents": torch.zeros(1, 16, 13, 60, 91)}, r"latents must have shape \[1, 16, 13, 60, 90\]"),
        (T2V, {"input_video": torch.zeros(1, 3, 49, 480, 704)}, "input_video must have 49 frames of 480x720"),
        (T2V, {"keep_frames": 9}, "keep_frames needs input_video"),
        (I2V, {"input_image": torch.zeros(1), "windows": True}, "windows need a text-to-video transformer"),
    ],
)
def test_a_call_that_cannot_run_is_refused_with_what_to_change(config, overrides, message):
    with pytest.raises(ValueError, match=message):
        call(config, **overrides)
