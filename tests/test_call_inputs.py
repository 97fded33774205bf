"""A pipeline call's checks and what they derive, without any model (``diffsynth_cog.pipeline.checks``)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from diffsynth_cog.configs import dit_preset
from diffsynth_cog.denoise.windows import WindowSpec
from diffsynth_cog.models.tiling import TileSpec
from diffsynth_cog.pipeline.checks import check_call
from diffsynth_cog.pipeline.options import GenerationOptions, StepCacheSpec
from diffsynth_cog.pipeline.sampling import DIFFSYNTH, DIFFUSERS

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
    return check_call(config, GenerationOptions.from_keywords(**{**arguments, **overrides}))


def test_a_call_resolves_its_shape_windows_tiles_and_kept_frames():
    checked = call(
        num_frames=129, windows=True, dit_tiled=True, input_video=torch.zeros(1, 3, 129, 480, 720), keep_frames=17
    )
    assert checked.latent_shape == (1, 16, 33, 60, 90)
    assert checked.windows == WindowSpec(T2V.sample_frames) and checked.tiles is None  # 480x720 is one tile
    assert checked.kept == 5 and checked.video.shape == (1, 3, 129, 480, 720)
    plain = call()
    assert (plain.windows, plain.tiles, plain.kept, plain.video) == (None, None, 0, None)


def test_dit_tiles_take_the_familys_size_and_a_video_of_one_tile_runs_untiled(caplog: pytest.LogCaptureFixture) -> None:
    assert call(height=960, width=1440, dit_tiled=True).tiles == TileSpec((480, 720), (0.5, 0.5))
    v15 = dit_preset("cogvideox1.5-5b")
    assert call(v15, height=1536, width=1360, num_frames=81, dit_tiled=True).tiles == TileSpec((768, 1360), (0.5, 0.5))
    mine = TileSpec((32, 32), (0.5, 0.5))
    assert call(height=480, width=720, dit_tiled=mine).tiles == mine
    caplog.clear()
    assert call(height=480, width=720, dit_tiled=True).tiles is None
    assert "fits one tile, so the DiT runs untiled" in caplog.text


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
        (T2V, {"prompt": ["a cat", "a dog"]}, "prompt must be a string: one call makes one video, and a list of 2"),
        (T2V, {"sampler": "euler"}, "sampler 'euler' is not a known sampler; valid: ddim, dpm, diffsynth"),
        (T2V, {"conventions": "comfy"}, "conventions 'comfy' is not known; valid: diffusers, diffsynth"),
        (T2V, {"step_cache": "tea:0.2"}, "step cache method 'tea' is not a known step-skipping method"),
        (T2V, {"step_cache": "teacache:x"}, "must be 'METHOD:THRESHOLD'"),
        (T2V, {"step_cache": -0.1}, "step_cache threshold must be a number >= 0"),
        (dit_preset("cogvideox-2b"), {"step_cache": "teacache:0.2"}, "'teacache' needs a calibration"),
        (dit_preset("cogvideox-2b"), {"riflex": True}, "riflex needs a RoPE model"),
        (T2V, {"seed": -2}, "seed must be an integer >= -1 and <= 18446744073709551615; got -2"),
    ],
)
def test_a_call_that_cannot_run_is_refused_with_what_to_change(config, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message) if "[" not in message else message):
        call(config, **overrides)


def test_strings_are_parsed_once_into_values():
    options = GenerationOptions.from_keywords(step_cache="first-block:0.1", attention="window:2", windows=True)
    assert options.long_video.step_cache == StepCacheSpec(0.1, "first-block")
    assert options.long_video.attention.window == 2  # a mask part, not the string
    assert GenerationOptions.from_keywords(step_cache=0.2).long_video.step_cache == StepCacheSpec(0.2, "auto")
    assert GenerationOptions.from_keywords(attention="sdpa").long_video.attention == "sdpa"


@pytest.mark.parametrize(
    "sampler,conventions,expected",
    [("ddim", None, DIFFUSERS), ("diffsynth", None, DIFFSYNTH), ("ddim", "diffsynth", DIFFSYNTH),
     ("diffsynth", "diffusers", DIFFUSERS), ("dpm", DIFFSYNTH, DIFFSYNTH)],
)  # fmt: skip
def test_sampler_diffsynth_is_the_shorthand_for_its_conventions(sampler, conventions, expected):
    assert call(sampler=sampler, conventions=conventions).conventions == expected


def test_denoising_strength_without_an_input_video_is_logged_once_with_what_is_done(caplog):
    call(denoising_strength=0.5)
    assert [r.getMessage() for r in caplog.records] == [
        "denoising_strength=0.5 applies to video-to-video only: there is no input_video, so this video is "
        "generated from pure noise (strength 1.0)"
    ]
    caplog.clear()
    call(denoising_strength=1.0)
    assert not caplog.records
