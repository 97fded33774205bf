"""The settings a video was made with, carried inside the video file and, on request, in a sidecar ``.json``.

A *settings dict* holds JSON values only (str, int, float, bool, None, lists and dicts of them). The keys the
toolkit writes (the pipeline fills them; any other key is kept as it is):

* ``model``, ``lora`` (a list of ``{"file", "sha256", "alpha"}``), ``prompt``, ``negative_prompt``, ``seed``,
  ``height``, ``width``, ``num_frames``, ``fps``, ``steps``, ``sampler``, ``cfg_scale``;
* one entry per part that was on: ``mask``, ``windows``, ``riflex``, ``step_cache``, ``tiles``, ``quantization``,
  ``parallel`` (each a dict of that part's options);
* ``joins``: the pixel frame indices where a window or a continuation joins the frames before it (the index of
  the first frame after the join), which ``diffsynth-cog evaluate`` scores against the rest of the video;
* ``version``: the package version (:func:`package_version`).

In an mp4 / mkv / mov the dict is the container's ``comment`` tag, as the JSON text ``{"diffsynth_cog": {...}}``
(so a comment written by anything else is not mistaken for settings). ffmpeg writes it while encoding
(:func:`metadata_arguments`, used by ``save_video(..., settings=...)``) and prints it back as an ffmetadata
file (:func:`read_settings`). The sidecar is the plain dict, pretty-printed, in ``<video stem>.json`` beside
the video.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from diffsynth_cog.errors import DiffSynthCogError
from diffsynth_cog.io.atomic import write_text_atomic
from diffsynth_cog.io.json_files import read_json

logger = logging.getLogger(__name__)

__all__ = [
    "JOINS_KEY",
    "SettingsError",
    "check_settings",
    "joins_of",
    "metadata_arguments",
    "package_version",
    "read_settings",
    "sidecar_path",
    "write_settings",
]

JOINS_KEY = "joins"
_WRAPPER_KEY = "diffsynth_cog"  # the comment tag holds {"diffsynth_cog": settings}
_MAX_CHARS = 100_000  # a command-line argument of ffmpeg; prompts are a few hundred characters


class SettingsError(DiffSynthCogError, ValueError):
    """A settings dict cannot be stored (a value that is not JSON), or a stored one is malformed."""


def package_version() -> str:
    """The installed diffsynth-cog version ("unknown" when run from a checkout that was never installed)."""
    try:
        return metadata.version("diffsynth-cog")
    except metadata.PackageNotFoundError:
        return "unknown"


def _find_bad_value(value: Any, where: str) -> str | None:
    """The dotted key of the first value JSON cannot hold exactly (None when every value is fine)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where}[{key!r}] (keys must be strings)"
            found = _find_bad_value(item, f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _find_bad_value(item, f"{where}[{index}]")
            if found:
                return found
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} = {value!r} (not finite)"
    if value is None or isinstance(value, (str, bool, int, float)):
        return None
    return f"{where} = {value!r} (a {type(value).__name__})"


def check_settings(settings: Mapping[str, Any]) -> str:
    """The settings as compact JSON text, or SettingsError naming the first key whose value JSON cannot hold
    (a tensor, a path object, NaN); also refuses a dict whose text would exceed 100,000 characters."""
    if not isinstance(settings, Mapping):
        raise SettingsError(f"settings must be a dict of JSON values; got a {type(settings).__name__}")
    bad = _find_bad_value(settings, "")
    if bad:
        raise SettingsError(
            f"settings cannot be stored: {bad}; use str, int, float, bool, None, lists and dicts (e.g. str(path))"
        )
    text = json.dumps({_WRAPPER_KEY: settings}, separators=(",", ":"), allow_nan=False)
    if len(text) > _MAX_CHARS:
        raise SettingsError(f"settings take {len(text)} characters as JSON; at most {_MAX_CHARS} fit in a video")
    joins_of(settings)
    return text


def joins_of(settings: Mapping[str, Any] | None) -> list[int]:
    """``settings["joins"]`` as a sorted list of frame indices ([] when absent); SettingsError when malformed."""
    if not settings or settings.get(JOINS_KEY) is None:
        return []
    joins = settings[JOINS_KEY]
    ok = isinstance(joins, (list, tuple)) and all(
        isinstance(j, int) and not isinstance(j, bool) and j >= 1 for j in joins
    )
    if not ok:
        raise SettingsError(
            f"settings[{JOINS_KEY!r}] must be a list of frame indices >= 1 (the first frame after each join); "
            f"got {joins!r}"
        )
    return sorted(set(joins))


def metadata_arguments(settings: Mapping[str, Any]) -> list[str]:
    """ffmpeg output arguments that store ``settings`` in the container's ``comment`` tag."""
    return ["-metadata", f"comment={check_settings(settings)}"]


def sidecar_path(video: str | os.PathLike[str]) -> Path:
    """Where the sidecar of ``video`` lives: ``clip.mp4`` -> ``clip.json``."""
    return Path(video).with_suffix(".json")


def write_settings(video: str | os.PathLike[str], settings: Mapping[str, Any]) -> Path:
    """Write ``settings`` as the sidecar ``.json`` of ``video`` (atomically) and return its path."""
    check_settings(settings)
    path = sidecar_path(video)
    return write_text_atomic(path, json.dumps(dict(settings), indent=2, allow_nan=False) + "\n")


def _unescape_ffmetadata(text: str) -> dict[str, str]:
    """key=value pairs of an ffmetadata file (global section only, keys lower-cased); a backslash escapes
    ``= ; # \\`` and newlines."""
    values: dict[str, str] = {}
    key: list[str] = []
    value: list[str] = []
    target, escaped = key, False
    for char in text.partition("\n")[2] + "\n":  # the first line is ";FFMETADATA1"
        if escaped:
            target.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "=" and target is key:
            target = value
        elif char == "\n":
            name = "".join(key)
            if name.startswith("["):  # a stream or chapter section: the global tags are over
                break
            if target is value and not name.startswith((";", "#")):
                values[name.lower()] = "".join(value)  # Matroska stores tag names in capitals
            key, value = [], []
            target = key
        else:
            target.append(char)
    return values


def _container_comment(path: Path) -> str | None:
    """The container's ``comment`` tag, read by the bundled ffmpeg (None if absent or unreadable)."""
    import imageio_ffmpeg

    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"]
    try:
        done = subprocess.run(command, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        logger.debug("ffmpeg could not read the metadata of %s: %s", path, error)
        return None
    if done.returncode != 0:
        logger.debug("ffmpeg could not read the metadata of %s: %s", path, done.stderr.decode(errors="replace"))
        return None
    return _unescape_ffmetadata(done.stdout.decode("utf-8", errors="replace")).get("comment")


def read_settings(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The settings of a video: from its container tag, else from its sidecar ``.json``; None when it has none.

    ``path`` may also name the sidecar itself. A sidecar that is not a JSON object raises SettingsError.
    """
    source = Path(path).expanduser()
    if source.suffix.lower() != ".json" and source.is_file():
        comment = _container_comment(source)
        if comment:
            try:
                stored = json.loads(comment)
            except json.JSONDecodeError:
                stored = None
            if isinstance(stored, dict) and isinstance(stored.get(_WRAPPER_KEY), dict):
                return stored[_WRAPPER_KEY]
    sidecar = source if source.suffix.lower() == ".json" else sidecar_path(source)
    if not sidecar.is_file():
        return None
    return read_json(sidecar, SettingsError)
