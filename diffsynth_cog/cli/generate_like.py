"""``diffsynth-cog generate --like VIDEO``: the options a video was made with, from the settings it carries.

Every option the command line did not give is filled from VIDEO's settings (``io.settings.read_settings``: the
container's metadata, else the sidecar ``.json``); the options given win. The generation's options come back
through ``pipeline.settings.generation_keywords``; the run's own (model, LoRA, dtype, quantization, the video
continued) from the ``command`` entry that ``generate`` adds to the settings it writes (:func:`command_settings`).
Runs first, before the other checks: a video without settings is refused before anything loads.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from diffsynth_cog.cli.checks import DTYPES, OptionError

logger = logging.getLogger(__name__)

# The run's own options that ``generate`` records under settings["command"] (argparse destinations).
COMMAND_OPTIONS = (
    "model",
    "lora",
    "lora_alpha",
    "dtype",
    "quantize",
    "input_video",
    "input_image",
    "extend_by",
    "context_frames",
    "color_match",
    "quality",
)


def command_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's own options (:data:`COMMAND_OPTIONS`) as ``generate`` writes them into a video's settings."""
    return {name: getattr(args, name, None) for name in COMMAND_OPTIONS}


def _destinations(keywords: dict[str, Any]) -> dict[str, Any]:
    """Pipeline keywords -> the command line's destinations (the parts that are values on one side and several
    options on the other: attention masks, windows, RIFLEx, the step cache, DiT tiles)."""
    from diffsynth_cog.denoise.masks import parse_attention

    values = dict(keywords)
    if "attention" in values:
        spec = values.pop("attention")
        values["sparse_attention" if not isinstance(parse_attention(spec), str) else "attention"] = spec
    if (windows := values.pop("windows", None)) is not None:
        values["window_frames"], values["window_overlap"] = windows.frames, windows.overlap
    if (riflex := values.pop("riflex", None)) is not None:
        values["riflex"] = list(riflex)
    if (step_cache := values.pop("step_cache", None)) is not None:
        values["step_cache"], values["step_cache_method"] = step_cache.threshold, step_cache.method
    if (tiles := values.pop("dit_tiled", None)) is not None:
        logger.info("--like: DiT tiles of %s px become --dit-tiled (the model's default tiles)", list(tiles.size))
        values["dit_tiled"] = True
    return values


def apply_like(args: argparse.Namespace) -> dict[str, Any]:
    """Fills the options of ``args`` that the command line did not give (``args.given_options``) from the
    settings of ``args.like``; returns those settings. OptionError when the video has none."""
    from diffsynth_cog.io.settings import read_settings
    from diffsynth_cog.pipeline.settings import generation_keywords

    like = args.like
    settings = read_settings(like)
    if settings is None:
        raise OptionError(
            f"--like {like}: {'no such file' if not _exists(like) else 'the video carries no settings'} (videos "
            "made by diffsynth-cog generate carry them in their metadata, or in a .json beside them with "
            "--save-settings); give the options yourself"
        )
    if args.prompts is not None:
        raise OptionError("--like reproduces one video: drop --prompts (or --like)")
    given = getattr(args, "given_options", frozenset())
    command = dict(settings.get("command") or {})
    if "command" not in settings:  # made by the library: its model folder, and no LoRA unless it says one
        command["model"] = (settings.get("model") or {}).get("path")
        command["lora"] = "none" if not settings.get("lora") else None
    if command.get("dtype") not in DTYPES:
        dtype = str((settings.get("model") or {}).get("dtype"))
        command["dtype"] = next((name for name, torch_name in DTYPES.items() if torch_name == dtype), None)
    try:
        values = {**command, **_destinations(generation_keywords(settings))}
    except (KeyError, TypeError, ValueError) as error:
        raise OptionError(f"--like {like}: its settings cannot be read back ({error})") from None
    if settings.get("fps") is not None:
        values["fps"] = settings["fps"]
    if settings.get("prompt") is None and "prompt" not in given:
        raise OptionError(f"--like {like}: the video was made from prompt embeddings; give --prompt")
    filled = []
    for name, value in values.items():
        if name in given or value is None or not hasattr(args, name):
            continue
        setattr(args, name, value)
        filled.append(name)
    logger.info("--like %s: %d options from its settings (%s)", like, len(filled), ", ".join(sorted(filled)))
    return settings


def _exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).expanduser().exists()
