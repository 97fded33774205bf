"""Continuing a video through the pipeline (``Pipeline.extend_video``): the context frames and the new
ones make one video-to-video clip whose context latents are pinned at every step (``continuation``); the new
frames are returned after the original, untouched ones, optionally colour-matched, and the settings record the
join."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffsynth_cog.io.frames import tensor_to_frames, video_to_tensor
from diffsynth_cog.pipeline.checks import check_output_type
from diffsynth_cog.pipeline.continuation import check_extension, match_new_frames, require_color_matching
from diffsynth_cog.pipeline.settings import Pipeline, continued_settings


def extend(
    pipe: Pipeline,
    video: Sequence[Image.Image] | torch.Tensor,
    extend_by: int,
    *,
    context_frames: int,
    denoising_strength: float,
    output_type: str,
    color_match: bool,
    **kwargs: Any,
) -> list[Image.Image] | np.ndarray | torch.Tensor | None:
    """``pipe.extend_video``'s work (see its docstring)."""
    pixels = video if isinstance(video, torch.Tensor) else video_to_tensor(list(video))[None]
    if pixels.ndim != 5 or pixels.shape[:2] != (1, 3):
        raise ValueError(f"video must be PIL frames or pixels [1, 3, F, H, W]; got shape {list(pixels.shape)}")
    for key in ("input_video", "num_frames", "height", "width", "keep_frames", "input_image"):
        if key in kwargs:
            raise ValueError(f"extend_video sets {key} itself; got {key}=...")
    check_output_type(output_type)
    if color_match:
        if output_type == "latent":
            raise ValueError("color_match works on decoded frames: use output_type 'pil' or 'np'")
        require_color_matching()
    total = pixels.shape[2]
    check_extension(total, context_frames, extend_by, pipe.dit.config.temporal_compression_ratio)
    context = pixels[:, :, total - context_frames :]
    clip = torch.cat([context, context[:, :, -1:].expand(-1, -1, extend_by, -1, -1)], dim=2)
    out = pipe(
        input_video=clip,
        num_frames=context_frames + extend_by,
        height=pixels.shape[3],
        width=pixels.shape[4],
        keep_frames=context_frames,
        denoising_strength=denoising_strength,
        output_type=output_type,
        **kwargs,
    )
    if pipe.last_settings is not None:
        pipe.last_settings = continued_settings(
            pipe.last_settings,
            source_frames=total,
            context_frames=context_frames,
            extend_by=extend_by,
            color_match=color_match,
        )
    if out is None or output_type == "latent":  # None: a rank other than the generation's first
        return out
    # The new frames are the clip's last ones (the decoder returns 4t frames, not 4t-3, for an even number t of
    # latent frames: the extra ones are at the start).
    new = out[-extend_by:]
    if color_match:
        real = video[total - context_frames :] if not isinstance(video, torch.Tensor) else context[0]
        new = match_new_frames(new, out[-(extend_by + context_frames) : -extend_by], real)
    if output_type == "np":
        original = ((pixels[0].float() + 1) / 2).permute(1, 2, 3, 0).numpy()
        return np.concatenate([original, new])
    original = list(video) if not isinstance(video, torch.Tensor) else tensor_to_frames(pixels[0])
    return original + list(new)
