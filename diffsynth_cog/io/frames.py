"""Frames between their forms: frame lists (PIL images or uint8 arrays), video tensors in [-1, 1], uint8 arrays.

* a *frame list* is a list of RGB `PIL.Image.Image`, all the same size;
* a *video tensor* is a float tensor `[3, F, H, W]` (or `[1, 3, F, H, W]`) with values in [-1, 1],
  the range the VAE encodes and decodes;
* an array or tensor `[F, H, W, 3]` (layout ``FHWC``) holds uint8 0..255 or float 0..1.

:mod:`diffsynth_cog.io.video` reads and writes them as files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

VideoLike = Sequence[Image.Image] | Sequence[np.ndarray] | np.ndarray | torch.Tensor


def video_to_tensor(frames: Sequence[Image.Image]) -> torch.Tensor:
    """Frame list (F RGB images of one size H x W) -> float32 tensor `[3, F, H, W]` in [-1, 1]."""
    if len(frames) == 0:
        raise ValueError("video_to_tensor got an empty frame list")
    array = _frames_to_uint8(frames)  # [F, H, W, 3] uint8
    tensor = torch.from_numpy(array).permute(3, 0, 1, 2).contiguous()  # [3, F, H, W]
    return tensor.float() / 127.5 - 1.0


def tensor_to_frames(video: torch.Tensor) -> list[Image.Image]:
    """Video tensor `[3, F, H, W]` or `[1, 3, F, H, W]` in [-1, 1] -> list of F RGB images.

    Values outside [-1, 1] are clipped: a VAE decoder overshoots the range slightly, and clipping
    is what every viewer would do anyway.
    """
    array = _tensor_to_uint8(video)  # [F, H, W, 3]
    return [Image.fromarray(frame) for frame in array]


def _tensor_to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] / [1, 3, F, H, W] tensor in [-1, 1] -> uint8 array [F, H, W, 3]."""
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(
                f"a 5-D video tensor must have batch size 1 ([1, 3, F, H, W]); got shape {tuple(video.shape)}"
            )
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(
            f"expected a video tensor [3, F, H, W] or [1, 3, F, H, W] in [-1, 1]; got shape {tuple(video.shape)}"
        )
    if not video.is_floating_point():
        raise ValueError(f"expected a float video tensor in [-1, 1]; got dtype {video.dtype}")
    pixels = ((video.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().numpy()  # [F, H, W, 3]


def _frames_to_uint8(frames: Sequence[Image.Image] | Sequence[np.ndarray]) -> np.ndarray:
    """List of PIL images or HxWx3 uint8 arrays -> uint8 array [F, H, W, 3] (all frames one size)."""
    arrays = []
    for index, frame in enumerate(frames):
        if isinstance(frame, Image.Image):
            array = np.asarray(frame.convert("RGB"))
        else:
            array = np.asarray(frame)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
                raise ValueError(
                    f"frame {index}: expected a PIL image or a uint8 array [H, W, 3]; "
                    f"got {array.dtype} array of shape {array.shape}"
                )
        if arrays and array.shape != arrays[0].shape:
            raise ValueError(
                f"frame {index} is {array.shape[1]}x{array.shape[0]} (WxH) but frame 0 is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; all frames of a video must have one size"
            )
        arrays.append(array)
    return np.stack(arrays)


LAYOUTS = ("FHWC", "CFHW")
_LAYOUT_HELP = (
    "save_video takes a list of PIL images or [H, W, 3] uint8 arrays; an array or tensor [F, H, W, 3] "
    "(layout 'FHWC': uint8 0..255 or float 0..1, optionally with a leading batch of 1); or a float tensor "
    "[3, F, H, W] in [-1, 1] (layout 'CFHW', the VAE's output, optionally [1, 3, F, H, W])"
)


def _layout_of(shape: tuple[int, ...], layout: str | None, is_tensor: bool) -> str:
    """'FHWC' or 'CFHW' for a 4-D video shape: ``layout`` when given, else read from where the 3 channels are."""
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
        if shape[3 if layout == "FHWC" else 0] != 3:
            raise ValueError(f"layout={layout!r} needs 3 channels there; got shape {list(shape)}. {_LAYOUT_HELP}")
        return layout
    channels_last, channels_first = shape[3] == 3, shape[0] == 3 and is_tensor
    if channels_last and channels_first:
        raise ValueError(
            f"cannot tell the layout of a video of shape {list(shape)}: it reads as [F, H, W, 3] ({shape[0]} frames "
            f"of {shape[2]}x{shape[1]}, WxH) or as [3, F, H, W] ({shape[1]} frames of {shape[3]}x{shape[2]}). "
            "Pass layout='FHWC' or layout='CFHW' to save_video"
        )
    if channels_last:
        return "FHWC"
    if channels_first:
        return "CFHW"
    hint = " (a numpy array is read as [F, H, W, 3]; pass a torch tensor for [3, F, H, W])" if not is_tensor else ""
    raise ValueError(f"cannot read a video of shape {list(shape)}{hint}. {_LAYOUT_HELP}")


def _channels_last_to_uint8(video: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] uint8 (kept) or float in [0, 1] (scaled, rounded) -> uint8 [F, H, W, 3]."""
    if video.dtype == np.uint8:
        return np.ascontiguousarray(video)
    if not np.issubdtype(video.dtype, np.floating):
        raise ValueError(f"a video [F, H, W, 3] must be uint8 (0..255) or float (0..1); got dtype {video.dtype}")
    low, high = float(video.min()), float(video.max())
    # A small tolerance: float pipelines land a hair outside [0, 1]; anything larger is a range mix-up
    # (e.g. [-1, 1] or [0, 255] floats) that would silently produce a wrong video.
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"a float video [F, H, W, 3] must hold values in [0, 1]; found [{low:.4g}, {high:.4g}]. "
            "Pass uint8 for 0..255, or a torch tensor [3, F, H, W] for [-1, 1]."
        )
    return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _array_to_uint8(video: np.ndarray | torch.Tensor, layout: str | None) -> np.ndarray:
    """A 4-D (or batch-of-1 5-D) array or tensor in either layout -> uint8 [F, H, W, 3]."""
    is_tensor = isinstance(video, torch.Tensor)
    shape = tuple(video.shape)
    if len(shape) == 5:
        if shape[0] != 1:
            raise ValueError(f"a 5-D video must have a batch of 1; got shape {list(shape)}. {_LAYOUT_HELP}")
        video, shape = video[0], shape[1:]
    if len(shape) != 4:
        raise ValueError(f"cannot read a video of shape {list(shape)}. {_LAYOUT_HELP}")
    if _layout_of(shape, layout, is_tensor) == "CFHW":
        return _tensor_to_uint8(video if is_tensor else torch.from_numpy(np.asarray(video)))
    if is_tensor:
        video = video.detach().cpu()
        video = video.numpy() if video.dtype == torch.uint8 else video.float().numpy()
    return _channels_last_to_uint8(np.asarray(video))


def video_to_uint8(frames: VideoLike, layout: str | None = None) -> np.ndarray:
    """Any supported video input -> uint8 array [F, H, W, 3] (see `save_video` for the accepted forms)."""
    if isinstance(frames, (torch.Tensor, np.ndarray)):
        return _array_to_uint8(frames, layout)
    if layout is not None:
        raise ValueError("layout= is for an array or a tensor; a frame list holds [H, W, 3] frames")
    if len(frames) == 0:
        raise ValueError("save_video got an empty frame list")
    return _frames_to_uint8(frames)
