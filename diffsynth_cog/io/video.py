"""Reading and writing videos (H.264 mp4 through the ffmpeg binary bundled with imageio-ffmpeg).

The frames' forms (frame lists, video tensors in [-1, 1], uint8 arrays) and the conversions between them are
:mod:`diffsynth_cog.io.frames`; ``video_to_tensor`` and ``tensor_to_frames`` are importable from here too.

`save_video` writes yuv420p H.264, the pixel format every player accepts. yuv420p stores colour at
half resolution, so both sides of a frame must be even: odd-sized frames are padded by repeating
their last row and/or column (the saved video is then one pixel taller/wider; nothing is lost).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from diffsynth_cog.configs import check_number
from diffsynth_cog.errors import DiffSynthCogError, WriteError
from diffsynth_cog.io.atomic import atomic_path
from diffsynth_cog.io.frames import (  # noqa: F401  (tensor_to_frames, video_to_tensor, LAYOUTS: re-exported)
    LAYOUTS,
    VideoLike,
    tensor_to_frames,
    video_to_tensor,
    video_to_uint8,
)
from diffsynth_cog.io.settings import metadata_arguments, write_settings
from diffsynth_cog.validators import number

logger = logging.getLogger(__name__)

_MIN_QUALITY, _MAX_QUALITY = 1, 10
# Containers that hold the H.264 (yuv420p) stream save_video writes.
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov")


class VideoReadError(DiffSynthCogError, OSError):
    """A video file is missing, unreadable or corrupt (ffmpeg could not decode it)."""


class VideoWriteError(DiffSynthCogError, OSError):
    """ffmpeg could not write a complete, readable video (the target was left as it was)."""


class VideoTooShortError(DiffSynthCogError, ValueError):
    """A video holds fewer frames than the requested start / count / interval need."""


class ImageReadError(DiffSynthCogError, OSError):
    """An image file is missing or cannot be decoded."""


def _pad_to_even(video: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] -> [F, H', W', 3] with H', W' even, repeating the last row/column (yuv420p needs even sides)."""
    height, width = video.shape[1:3]
    pad_h, pad_w = height % 2, width % 2
    if pad_h == 0 and pad_w == 0:
        return video
    logger.warning(
        "frame size %dx%d (WxH) is odd; yuv420p needs even sides, so the video is saved at %dx%d "
        "with the last row/column repeated",
        width,
        height,
        width + pad_w,
        height + pad_h,
    )
    return np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


# --------------------------------------------------------------------------------------------- writing
def save_video(
    frames: VideoLike,
    path: str | os.PathLike[str],
    fps: float = 8,
    quality: float = 5,
    progress: bool = False,
    *,
    layout: str | None = None,
    settings: Mapping[str, Any] | None = None,
    sidecar: bool = False,
) -> Path:
    """Write a video as H.264 (libx264, yuv420p) and return its path.

    Args:
        frames: one of
            - a list of PIL images (converted to RGB) or of uint8 arrays `[H, W, 3]`;
            - a numpy array or torch tensor `[F, H, W, 3]` (or `[1, F, H, W, 3]`): uint8 in 0..255, or float
              in [0, 1];
            - a float tensor `[3, F, H, W]` or `[1, 3, F, H, W]` in [-1, 1] (the VAE's output range;
              values outside are clipped).
            The layout is read from where the 3 channels are; a tensor with 3 both first and last (e.g.
            `[3, 32, 48, 3]`) is refused unless `layout` says which it is.
        path: output file; the container follows the suffix (use `.mp4`).
        fps: frames per second (CogVideoX models are trained at 8).
        quality: 1 (smallest file) .. 10 (near lossless), imageio-ffmpeg's scale: it maps to x264
            `crf = int((1 - quality / 10) * 51)`, so 5 -> crf 25 and 10 -> crf 0.
        progress: show a tqdm bar over frames.
        layout: "FHWC" or "CFHW", for a tensor whose layout the shape does not tell.
        settings: the settings the video was made with (JSON values, see `diffsynth_cog.io.settings`),
            stored in the container's metadata; `read_settings(path)` gives them back.
        sidecar: also write the settings to `<stem>.json` beside the video.

    The video is encoded into a temporary file in the same folder and renamed into place only when
    ffmpeg finished, so an interrupted or failed write never leaves a half-written file at `path`.
    Odd frame sizes are padded to even (see the module docstring).
    """
    number(_MIN_QUALITY, _MAX_QUALITY).require("quality", quality)
    check_number(fps, name="fps", low=0, low_open=True)
    target = check_video_path(path)
    if sidecar and settings is None:
        raise ValueError("sidecar=True writes the settings beside the video; pass settings= as well")
    extra_arguments = metadata_arguments(settings) if settings is not None else []  # checked before encoding
    video = _pad_to_even(video_to_uint8(frames, layout))  # [F, H, W, 3] uint8
    num_frames, height, width = video.shape[:3]

    import imageio_ffmpeg  # imported on use: the library must import on machines without ffmpeg

    replacing = target.is_file()
    # The temporary file keeps the suffix: ffmpeg picks the container from it.
    with atomic_path(target) as partial:
        _encode(imageio_ffmpeg.write_frames, video, partial, target, fps, quality, extra_arguments, progress)
        # ffmpeg may exit 0 with a truncated or empty file (e.g. "Error writing trailer" on a full disk): the
        # file replaces the target only once it reads back whole.
        _verify_written(partial, target, num_frames)
    if sidecar and settings is not None:
        logger.info("settings written to %s", write_settings(target, settings))
    logger.info(
        "saved %d frames (%dx%d, %s fps) to %s%s",
        num_frames,
        width,
        height,
        fps,
        target,
        " (replacing the file that was there)" if replacing else "",
    )
    return target


def _encode(
    write_frames: Callable[..., Generator[Any, Any, None]],
    video: np.ndarray,
    partial: Path,
    target: Path,
    fps: float,
    quality: float,
    output_params: list[str],
    progress: bool,
) -> None:
    """Encodes `video` ([F, H, W, 3] uint8, even sizes) into `partial` with imageio-ffmpeg's `write_frames`;
    a failing ffmpeg raises VideoWriteError naming `target`."""
    num_frames, height, width = video.shape[:3]
    writer = write_frames(
        str(partial),
        (width, height),
        pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p",
        fps=float(fps),
        quality=float(quality),
        codec="libx264",
        macro_block_size=2,  # sizes are already even; 2 stops imageio-ffmpeg from rescaling to multiples of 16
        ffmpeg_log_level="error",
        output_params=output_params,
    )
    try:
        writer.send(None)  # start ffmpeg
        for frame in tqdm(video, total=num_frames, desc="save_video", unit="frame", disable=not progress):
            writer.send(np.ascontiguousarray(frame))
    except OSError as error:  # ffmpeg stopped (full disk, bad container): its own words, not a traceback
        if isinstance(error, WriteError):
            raise
        raise VideoWriteError(f"ffmpeg failed writing {target}: {_ffmpeg_reason(error)}") from error
    finally:
        writer.close()  # waits for ffmpeg to finish the file


def check_video_path(path: str | os.PathLike[str]) -> Path:
    """The path as a Path, if :func:`save_video` can write its container; else a ValueError naming the suffix.

    save_video writes H.264 (yuv420p), which ``.mp4``, ``.mkv`` and ``.mov`` hold. A GIF or a WebM needs
    another encoder: convert the mp4 afterwards (``ffmpeg -i video.mp4 video.gif``).
    """
    target = Path(path).expanduser()
    if target.suffix.lower() not in VIDEO_SUFFIXES:
        got = f"{target.suffix!r}" if target.suffix else "no suffix"
        raise ValueError(
            f"cannot write {target}: videos are written as H.264 in {', '.join(VIDEO_SUFFIXES)} files; got {got}. "
            "Write an .mp4 and convert it afterwards if you need another format (e.g. ffmpeg -i video.mp4 video.gif)"
        )
    return target


def _verify_written(partial: Path, target: Path, num_frames: int) -> None:
    """Raises VideoWriteError unless ``partial`` decodes to ``num_frames`` frames."""
    import imageio_ffmpeg

    try:
        found, _ = imageio_ffmpeg.count_frames_and_secs(str(partial))
    except (OSError, RuntimeError) as error:
        found, reason = None, _ffmpeg_reason(error)
    else:
        reason = f"it holds {found} frames"
    if found != num_frames:
        full = shutil.disk_usage(partial.parent).free < 1024 * 1024
        raise VideoWriteError(
            f"ffmpeg did not write {target} completely ({reason}; expected {num_frames} frames)"
            + ("; the disk is full: free some space or write somewhere else" if full else "")
            + f"; {'the existing file was left as it was' if target.exists() else 'nothing was written'}"
        )


# --------------------------------------------------------------------------------------------- reading
def _resize_cover_crop(image: Image.Image, height: int | None, width: int | None) -> Image.Image:
    """Resize keeping the aspect ratio so the image covers height x width, then centre-crop to it.

    With only one of height/width given, the image is scaled to that side (aspect kept, no crop);
    with neither, it is returned unchanged.
    """
    src_w, src_h = image.size
    if height is None and width is None:
        return image
    if height is None or width is None:
        scale = (width / src_w) if width is not None else (height / src_h)
        new_size = (max(1, round(src_w * scale)), max(1, round(src_h * scale)))
        return image if new_size == image.size else image.resize(new_size, Image.Resampling.LANCZOS)
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive; got height={height}, width={width}")
    scale = max(height / src_h, width / src_w)
    # max() with the target guards against rounding down to one pixel short of covering it.
    new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def _ffmpeg_reason(error: BaseException) -> str:
    """The most telling line of an imageio-ffmpeg error (its message embeds ffmpeg's whole stderr)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    tail = [line for line in lines if not line.startswith(("ffmpeg version", "built with", "configuration", "lib"))]
    first = lines[0]
    last = tail[-1] if tail else lines[-1]
    return first if first == last else f"{first} ({last})"


def _iter_decoded(path: Path, meta: dict | None = None) -> Iterator[tuple[int, int, bytes]]:
    """Yield (width, height, rgb24 bytes) for each frame; ffmpeg failures become VideoReadError.

    ``meta``, when given, receives ffmpeg's stream metadata (``fps``, ``size``, ...) before the first frame."""
    if not path.is_file():
        raise VideoReadError(f"video file not found: {path}")
    try:
        import imageio_ffmpeg

        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        found = next(reader)
    except (OSError, RuntimeError, StopIteration) as error:
        raise VideoReadError(f"cannot read video {path}: {_ffmpeg_reason(error)}") from error
    if meta is not None:
        meta.update(found)
    width, height = (int(v) for v in found["size"])
    try:
        for raw in reader:
            yield width, height, raw
    except (OSError, RuntimeError) as error:
        raise VideoReadError(f"video {path} is corrupt or truncated: {_ffmpeg_reason(error)}") from error
    finally:
        reader.close()


def load_video_array(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Every frame of a video as a uint8 array [F, H, W, 3] at the file's size, and its frame rate."""
    source = Path(path).expanduser()
    meta: dict = {}
    frames = [
        np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
        for width, height, raw in _iter_decoded(source, meta)
    ]
    if not frames:
        raise VideoTooShortError(f"video {source} holds no frames")
    fps = float(meta.get("fps") or 0.0)
    return np.stack(frames), fps if fps > 0 else 8.0


def load_video(
    path: str | os.PathLike[str],
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    frame_interval: int = 1,
    start_frame: int = 0,
) -> list[Image.Image]:
    """Read frames `start_frame, start_frame + frame_interval, ...` of a video as RGB images.

    Args:
        path: video file (anything ffmpeg decodes).
        height, width: output size. Each frame is resized keeping its aspect ratio so that it covers
            height x width, then centre-cropped to exactly that. Give neither to keep the file's size.
        num_frames: frames to return; None returns every sampled frame to the end of the file.
        frame_interval: step between sampled frames (1 = consecutive).
        start_frame: index of the first frame returned (0-based).

    Raises:
        VideoReadError: the file is missing or ffmpeg cannot decode it.
        VideoTooShortError: the file has fewer than `start_frame + (num_frames - 1) * frame_interval + 1`
            frames (the message names the file, the frames it has and the frames needed).
    """
    if frame_interval < 1:
        raise ValueError(f"frame_interval must be >= 1; got {frame_interval}")
    if start_frame < 0:
        raise ValueError(f"start_frame must be >= 0; got {start_frame}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 or None; got {num_frames}")
    source = Path(path)
    last_needed = None if num_frames is None else start_frame + (num_frames - 1) * frame_interval

    frames: list[Image.Image] = []
    available = 0
    decoded = _iter_decoded(source)
    try:
        for index, (frame_w, frame_h, raw) in enumerate(decoded):
            available = index + 1
            if index >= start_frame and (index - start_frame) % frame_interval == 0:
                array = np.frombuffer(raw, dtype=np.uint8).reshape(frame_h, frame_w, 3)
                frames.append(_resize_cover_crop(Image.fromarray(array), height, width))
            if last_needed is not None and index >= last_needed:
                break  # stop decoding: the rest of the file is not needed
    finally:
        decoded.close()  # stops ffmpeg now rather than whenever the generator is collected

    if last_needed is not None and available <= last_needed:
        raise VideoTooShortError(
            f"video {source} has {available} frames, but start_frame={start_frame}, num_frames={num_frames}, "
            f"frame_interval={frame_interval} need {last_needed + 1}"
        )
    if not frames:
        raise VideoTooShortError(f"video {source} has {available} frames; start_frame={start_frame} is past the end")
    return frames


def load_image(
    path_or_image: str | os.PathLike[str] | Image.Image,
    height: int | None = None,
    width: int | None = None,
) -> Image.Image:
    """Load an image (or take a PIL image) as RGB, resized to cover height x width and centre-cropped.

    Used for the conditioning frame of image-to-video models.
    """
    if isinstance(path_or_image, Image.Image):
        image = path_or_image
    else:
        source = Path(path_or_image)
        if not source.is_file():
            raise ImageReadError(f"image file not found: {source}")
        try:
            with Image.open(source) as opened:
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, OSError) as error:
            raise ImageReadError(f"cannot read image {source}: {error}") from error
    return _resize_cover_crop(image.convert("RGB"), height, width)
