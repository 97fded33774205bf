"""The inputs of one pipeline call, checked before anything is encoded or drawn.

:func:`check_call` takes the arguments of ``CogVideoPipeline.__call__`` that shape the work (sizes, numbers, the
inputs to edit or keep, windows, DiT tiles) and returns a :class:`CheckedCall` with what the pipeline derives from
them, or raises ValueError saying what to change. Pure: no model runs, nothing is drawn (an image path is opened,
so that a missing file fails now and not after the prompt is encoded).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from diffsynth_cog.configs import DiTConfig, check_generation_numbers
from diffsynth_cog.denoise.windows import WindowSpec
from diffsynth_cog.io.video import load_image, video_to_tensor
from diffsynth_cog.models.tiling import TileSpec
from diffsynth_cog.pipeline.continuation import kept_latent_frames
from diffsynth_cog.pipeline.sampling import latent_plan

OUTPUT_TYPES = ("pil", "np", "latent")
DEFAULT_DIT_TILES = TileSpec((480, 720), (0.5, 0.5))  # dit_tiled=True: base-size tiles overlapping by half


@dataclass(frozen=True)
class CheckedCall:
    """What a call derives from its arguments: the latents' shape [1, C, T, H/8, W/8], the video to edit as pixels
    [1, 3, F, H, W] (or None), the latent frames to keep (0: none), the temporal windows and the DiT's tiles;
    ``padding``: latent frames added at the front to make whole temporal patches (1.5), dropped before decoding."""

    latent_shape: tuple[int, int, int, int, int]
    video: torch.Tensor | None
    kept: int
    windows: WindowSpec | None
    tiles: TileSpec | None
    padding: int = 0


def latent_shape_for(config: DiTConfig, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """The latents [1, C, T, H/8, W/8] of one video (T padded to whole temporal patches on 1.5); checks the frame
    count and the size (``sampling.latent_plan``)."""
    return latent_plan(config, num_frames, height, width).shape


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'np' or 'latent'; got {output_type!r}")


def check_call(
    config: DiTConfig,
    *,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str],
    input_image: Image.Image | str | os.PathLike | None,
    input_video: Sequence[Image.Image] | torch.Tensor | None,
    denoising_strength: float,
    height: int,
    width: int,
    num_frames: int,
    cfg_scale: float,
    num_inference_steps: int,
    seed: int | None,
    latents: torch.Tensor | None,
    dit_tiled: bool | TileSpec,
    output_type: str,
    windows: bool | WindowSpec | None,
    keep_frames: int,
) -> CheckedCall:
    """The checks of ``CogVideoPipeline.__call__`` (its docstring says what each argument means)."""
    plan = latent_plan(config, num_frames, height, width)
    latent_shape = plan.shape
    check_output_type(output_type)
    check_generation_numbers(
        cfg_scale=cfg_scale, num_inference_steps=num_inference_steps, denoising_strength=denoising_strength, seed=seed
    )
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not (isinstance(text, str) or (isinstance(text, Sequence) and all(isinstance(t, str) for t in text))):
            raise ValueError(f"{name} must be a string (or a list of strings); got {type(text).__name__}")
    is_i2v = config.in_channels != config.out_channels
    if is_i2v and input_image is None:
        raise ValueError("this transformer is an image-to-video model: pass input_image")
    if input_image is not None and not is_i2v:
        raise ValueError("input_image needs an I2V transformer (e.g. CogVideoX-5B-I2V)")
    if isinstance(input_image, (str, os.PathLike)):
        load_image(input_image)  # a missing or unreadable image fails now, not after the prompt is encoded
    if latents is not None and tuple(latents.shape) != latent_shape:
        raise ValueError(f"latents must have shape {list(latent_shape)} for these settings; got {list(latents.shape)}")
    video = None
    if input_video is not None:
        video = input_video if isinstance(input_video, torch.Tensor) else video_to_tensor(input_video)[None]
        if tuple(video.shape[2:]) != (num_frames, height, width):
            raise ValueError(f"input_video must have {num_frames} frames of {height}x{width}; got {list(video.shape)}")
    kept = 0
    if keep_frames:
        if video is None:
            raise ValueError("keep_frames needs input_video (the frames to keep are its first ones)")
        if keep_frames > num_frames:
            raise ValueError(f"keep_frames={keep_frames} exceeds num_frames={num_frames}")
        kept = kept_latent_frames(keep_frames, config.temporal_compression_ratio)
    if windows is True:
        windows = WindowSpec(config.sample_frames)
    windows = windows or None
    if windows is not None:  # windows of whole temporal patches (1.5)
        windows = dataclasses.replace(windows, patch_t=config.temporal_patch)
    if windows is not None and is_i2v:
        raise ValueError(
            "windows need a text-to-video transformer: the I2V model conditions every call on its first frame, "
            "which only the first window holds"
        )
    if dit_tiled is True and config.family.version != "1.0":  # the family's default size, overlapping by half
        dit_tiled = dataclasses.replace(DEFAULT_DIT_TILES, size=config.family.default_size())
    tiles = (DEFAULT_DIT_TILES if dit_tiled is True else dit_tiled) or None
    return CheckedCall(
        latent_shape=latent_shape, video=video, kept=kept, windows=windows, tiles=tiles, padding=plan.padding
    )
