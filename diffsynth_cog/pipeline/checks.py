"""The inputs of one pipeline call, checked before anything is encoded or drawn.

:func:`check_call` takes a call's :class:`~diffsynth_cog.pipeline.options.GenerationOptions` (sizes, numbers, the
inputs to edit or keep, sampler and conventions, windows, DiT tiles, the long-video parts) and returns a
:class:`CheckedCall` with what the pipeline derives from them (for CogVideoX 1.5 by the family's rules:
``sampling.latent_plan``'s padded latents, ``check_family_call``'s refusals, windows in whole temporal
patches, the family's DiT tile size), or raises ValueError saying what to change. Pure: no model runs, nothing is
drawn (an image path is opened, so that a missing file fails now and not after the prompt is encoded).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffsynth_cog.configs import (
    DiTConfig,
    check_generation_numbers,
    check_number,
    dit_family,
    teacache_coefficients,
)
from diffsynth_cog.denoise.riflex import resolve_riflex
from diffsynth_cog.denoise.windows import WindowSpec
from diffsynth_cog.families import Family
from diffsynth_cog.io.frames import video_to_tensor
from diffsynth_cog.io.video import load_image
from diffsynth_cog.models.attention import check_backend
from diffsynth_cog.models.tiling import TileSpec
from diffsynth_cog.pipeline.continuation import kept_latent_frames
from diffsynth_cog.pipeline.options import (
    SAMPLERS,
    STEP_SKIPPERS,
    GenerationOptions,
    Inputs,
    LongVideo,
    StepCacheSpec,
)
from diffsynth_cog.pipeline.sampling import DIFFSYNTH, DIFFUSERS, Conventions, conventions_for, latent_plan

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "latent")
DIT_TILE_OVERLAP = (0.5, 0.5)  # dit_tiled=True: tiles of the family's default size, overlapping by half


@dataclass(frozen=True)
class CheckedCall:
    """What a call derives from its arguments: the latents' shape [1, C, T, H/8, W/8], the video to edit as pixels
    [1, 3, F, H, W] (or None), the latent frames to keep (0: none), the temporal windows, the DiT's tiles, the
    sampling conventions; ``padding``: latent frames added at the front to make whole temporal patches (1.5),
    dropped before decoding."""

    latent_shape: tuple[int, int, int, int, int]
    video: torch.Tensor | None
    kept: int
    windows: WindowSpec | None
    tiles: TileSpec | None
    conventions: Conventions = DIFFUSERS
    padding: int = 0


def latent_shape_for(config: DiTConfig, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """The latents [1, C, T, H/8, W/8] of one video (T padded to whole temporal patches on 1.5); checks the frame
    count and the size (``sampling.latent_plan``)."""
    return latent_plan(config, num_frames, height, width).shape


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'np' or 'latent'; got {output_type!r}")


def check_call(config: DiTConfig, options: GenerationOptions) -> CheckedCall:
    """The checks of one generation (``pipeline.options`` says what each option means), before anything runs."""
    inputs, sampling = options.inputs, options.sampling
    plan = latent_plan(config, inputs.num_frames, inputs.height, inputs.width)
    latent_shape = plan.shape
    check_output_type(options.output.output_type)
    check_generation_numbers(
        cfg_scale=sampling.cfg_scale,
        num_inference_steps=sampling.num_inference_steps,
        denoising_strength=sampling.denoising_strength,
        seed=sampling.seed,
    )
    SAMPLERS.check(sampling.sampler, "sampler")
    conventions = conventions_for(sampling.sampler, sampling.conventions)
    check_family_call(config.family, options)
    _check_prompts(inputs.prompt, inputs.negative_prompt)
    _check_image(config, inputs.input_image)
    if inputs.latents is not None and tuple(inputs.latents.shape) != latent_shape:
        raise ValueError(
            f"latents must have shape {list(latent_shape)} for these settings; got {list(inputs.latents.shape)}"
        )
    video = _video(inputs, sampling.denoising_strength)
    kept = _kept(config, inputs, video)
    windows = _windows(config, options.long_video.windows)
    check_parts(config, options.long_video)
    return CheckedCall(
        latent_shape=latent_shape,
        video=video,
        kept=kept,
        windows=windows,
        tiles=_tiles(config, options.memory.dit_tiled, inputs.height, inputs.width),
        conventions=conventions,
        padding=plan.padding,
    )


def _windows(config: DiTConfig, windows: bool | WindowSpec | None) -> WindowSpec | None:
    """The temporal windows of a call (True: the model's trained length), in whole temporal patches (1.5)."""
    windows = (WindowSpec(config.sample_frames) if windows is True else windows) or None
    if windows is None:
        return None
    if config.in_channels != config.out_channels:
        raise ValueError(
            "windows need a text-to-video transformer: the I2V model conditions every call on its first frame, "
            "which only the first window holds"
        )
    return dataclasses.replace(windows, patch_t=config.temporal_patch)


def _tiles(config: DiTConfig, dit_tiled: bool | TileSpec, height: int, width: int) -> TileSpec | None:
    """The DiT's tiles of a call (True: the family's default size, overlapping by half); None, with a warning,
    when the video fits one tile (tiles would change nothing)."""
    tiles = TileSpec(config.family.default_size(), DIT_TILE_OVERLAP) if dit_tiled is True else (dit_tiled or None)
    if tiles is not None and height <= tiles.size[0] and width <= tiles.size[1]:
        logger.warning(
            "DiT tiles of %dx%d px: the %dx%d video fits one tile, so the DiT runs untiled (tiles are for larger "
            "sizes)",
            *tiles.size, height, width,
        )  # fmt: skip
        return None
    return tiles


def _check_prompts(prompt: object, negative_prompt: object) -> None:
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if isinstance(text, str):
            continue
        if isinstance(text, Sequence) and all(isinstance(t, str) for t in text):
            raise ValueError(
                f"{name} must be a string: one call makes one video, and a list of {len(text)} prompts is not "
                "batched. Call the pipeline once per prompt (each with its seed), or use the command line's "
                "--prompts FILE"
            )
        raise ValueError(f"{name} must be a string; got {type(text).__name__}")


def _check_image(config: DiTConfig, input_image: object) -> None:
    is_i2v = config.in_channels != config.out_channels
    if is_i2v and input_image is None:
        raise ValueError("this transformer is an image-to-video model: pass input_image")
    if input_image is not None and not is_i2v:
        raise ValueError("input_image needs an I2V transformer (e.g. CogVideoX-5B-I2V)")
    if isinstance(input_image, (str, os.PathLike)):
        load_image(input_image)  # a missing or unreadable image fails now, not after the prompt is encoded


def _video(inputs: Inputs, denoising_strength: float) -> torch.Tensor | None:
    """The video to edit as pixels [1, 3, F, H, W], checked against the call's size; says once when a
    ``denoising_strength`` has nothing to act on."""
    if inputs.input_video is None:
        if denoising_strength != 1.0:
            logger.warning(
                "denoising_strength=%s applies to video-to-video only: there is no input_video, so this video is "
                "generated from pure noise (strength 1.0)",
                denoising_strength,
            )
        return None
    given = inputs.input_video
    video = given if isinstance(given, torch.Tensor) else video_to_tensor(given)[None]
    wanted = (inputs.num_frames, inputs.height, inputs.width)
    if tuple(video.shape[2:]) != wanted:
        raise ValueError(
            f"input_video must have {wanted[0]} frames of {wanted[1]}x{wanted[2]}; got {list(video.shape)} (it is "
            "neither resized nor cut: load_video(path, height=, width=, num_frames=) does both)"
        )
    return video


def _kept(config: DiTConfig, inputs: Inputs, video: torch.Tensor | None) -> int:
    if not inputs.keep_frames:
        return 0
    if video is None:
        raise ValueError("keep_frames needs input_video (the frames to keep are its first ones)")
    if inputs.keep_frames > inputs.num_frames:
        raise ValueError(f"keep_frames={inputs.keep_frames} exceeds num_frames={inputs.num_frames}")
    return kept_latent_frames(inputs.keep_frames, config.temporal_compression_ratio)


def check_parts(config: DiTConfig, parts: LongVideo) -> None:
    """The long-video parts against the transformer (needs only its config, so the command line runs it before
    loading): RIFLEx needs RoPE, TeaCache a calibration, a kernel its package."""
    resolve_riflex(config, parts.riflex)
    step_cache = parts.step_cache
    if isinstance(step_cache, StepCacheSpec):
        check_number(step_cache.threshold, name="step_cache threshold", low=0.0)
        STEP_SKIPPERS.check(step_cache.method, "step cache method")
        if step_cache.method == "teacache" and teacache_coefficients(config) is None:
            raise ValueError(
                f"step cache method 'teacache' needs a calibration: TeaCache has no calibrated polynomial for this "
                f"transformer ({dit_family(config)}, {config.num_layers} layers; published for the released "
                "CogVideoX-5B, CogVideoX1.5-5B and CogVideoX1.5-5B-I2V only). Use the method 'first-block' (CLI "
                "--step-cache-method first-block) or 'auto'"
            )
    if isinstance(parts.attention, str):
        check_backend(parts.attention)


def check_family_call(family: Family, options: GenerationOptions) -> None:
    """What a family refuses of a call's options before any work: CogVideoX 1.5 has no DiffSynth-Studio sampler or
    conventions (DiffSynth-Studio has no 1.5), and no video-to-video (an 8k+1-frame video encodes to an odd number of
    latent frames, not whole temporal patches; the reference's video-to-video pipeline refuses such videos, and no
    reference pads them)."""
    if family.patch_size_t == 1:
        return
    sampling = options.sampling
    if sampling.sampler == "diffsynth":
        raise ValueError(
            f"sampler='diffsynth' follows DiffSynth-Studio 1.1.x, which has no {family.label}: use 'ddim' or 'dpm'"
        )
    if conventions_for(sampling.sampler, sampling.conventions).name == DIFFSYNTH.name:
        raise ValueError(
            f"conventions='diffsynth' follow DiffSynth-Studio 1.1.x, which has no {family.label}: use 'diffusers' "
            "(the default)"
        )
    if options.inputs.input_video is not None:
        raise ValueError(
            f"input_video (video-to-video, continuation) is not supported on {family.label}: its "
            f"{family.frame_multiple}k+1-frame videos encode to an odd number of latent frames, not whole temporal "
            f"patches of {family.patch_size_t}, and the reference (diffusers' CogVideoXVideoToVideoPipeline) refuses "
            "them; generate from text or an image instead"
        )
