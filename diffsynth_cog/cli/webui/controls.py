"""What the page offers, read from the one home of each option: the ``generate`` command's parser (itself built
from ``pipeline.options``' fields and their registries). This module holds only the page's own knowledge: which
options it shows, in which section, under which label; the kind of control, its default, help and choices come
from the parser's action (and the field's registry), so a new option or sampler appears here as it appears in
the CLI. It also turns the library's messages (which name command-line flags) into the page's words.

Imports no torch and no gradio.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

# (section title, open at start, ((parser dest, label), ...)): the page's layout, grouped as a user thinks.
SECTIONS: tuple[tuple[str, bool, tuple[tuple[str, str], ...]], ...] = (
    ("Size and frames", True, (("height", "Height"), ("width", "Width"), ("num_frames", "Frames"), ("fps", "FPS"))),
    (
        "Sampling",
        True,
        (
            ("num_inference_steps", "Steps"),
            ("cfg_scale", "CFG scale"),
            ("use_dynamic_cfg", "Dynamic CFG"),
            ("sampler", "Sampler"),
            ("seed", "Seed"),
            ("conventions", "Conventions"),
        ),
    ),
    (
        "Long video",
        False,
        (
            ("window_frames", "Window frames"),
            ("window_overlap", "Window overlap"),
            ("sparse_attention", "Sparse attention mask"),
            ("riflex", "RIFLEx"),
            ("step_cache", "Step skipping threshold"),
            ("step_cache_method", "Step skipping method"),
            ("extend_by", "Extend the input video by"),
            ("context_frames", "Context frames"),
        ),
    ),
    (
        "Image and video inputs",
        False,
        (("input_image", "Input image"), ("input_video", "Input video"), ("denoising_strength", "Denoising strength")),
    ),
    (
        "Memory and speed",
        False,
        (
            ("offload", "Offload"),
            ("quantize", "Quantization"),
            ("attention", "Attention kernel"),
            ("tiled", "Tiled VAE"),
            ("dit_tiled", "Tiled DiT"),
        ),
    ),
    ("LoRA", False, (("lora", "LoRA"), ("lora_alpha", "LoRA alpha"))),
)
TOP = (("model", "Model"), ("prompt", "Prompt"), ("negative_prompt", "Negative prompt"))
# Page words for the run's own flags that have no control here (the server's command line sets them).
SERVER_FLAGS = {"--no-download": "the server's --no-download", "--models-dir": "the server's models folder"}
# Command-line flags with no meaning in the page (a batch of prompts): the clause naming one is left out.
CLI_ONLY_FLAGS = ("--prompts",)


@dataclass(frozen=True)
class Control:
    """One control: ``kind`` is text, int, float, bool, choice, image or video."""

    dest: str
    label: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()


@cache
def generate_parser() -> argparse.ArgumentParser:
    from diffsynth_cog.cli.generate import add_generate_command

    sub = argparse.ArgumentParser().add_subparsers()
    add_generate_command(sub)
    return sub.choices["generate"]


def generate_defaults() -> argparse.Namespace:
    """The ``generate`` command's defaults (what the CLI would run with no options)."""
    return generate_parser().parse_args([])


def labels() -> dict[str, str]:
    return dict(TOP) | {dest: label for _, _, fields in SECTIONS for dest, label in fields}


def flag_labels() -> dict[str, str]:
    """Every command-line flag of ``generate`` that the page shows -> its control's label."""
    names = labels()
    return {
        flag: names[action.dest]
        for action in generate_parser()._actions
        if action.dest in names
        for flag in action.option_strings
    }


def _registries() -> dict[str, Any]:
    from diffsynth_cog.pipeline.options import cli_flags

    return {flag.dest: flag.registry for flag in cli_flags() if flag.registry is not None}


def control(dest: str, label: str, choices: dict[str, tuple[str, ...]] | None = None) -> Control:
    """The control of one option, from its parser action; ``choices`` overrides what the parser offers (the
    models and LoRAs found on disk, the attention kernels that work here)."""
    actions = [a for a in generate_parser()._actions if a.dest == dest]
    if not actions:
        raise KeyError(f"the generate command has no option {dest!r}")
    action, default = actions[0], generate_defaults().__dict__[dest]
    offered = (choices or {}).get(dest)
    registry = _registries().get(dest)
    if offered is None and action.choices is not None:
        offered = tuple(action.choices)
    if offered is None and registry is not None:
        offered = registry.names()
    if dest in ("input_image", "input_video"):
        kind = dest.removeprefix("input_")
    elif isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        kind = "bool"
    elif offered is not None:
        kind = "choice"
    elif action.type in (int, float) and action.nargs is None:
        kind = action.type.__name__
    else:
        kind = "text"
    return Control(dest, label, kind, default, page_words((action.help or "").replace("%%", "%")), tuple(offered or ()))


def page_words(message: str) -> str:
    """A library or CLI message in the page's words: ``--lora none`` becomes ``LoRA "none"``, ``--riflex`` becomes
    ``RIFLEx``; the server's own flags say they are the server's."""
    known = flag_labels()
    for flag in CLI_ONLY_FLAGS:
        message = re.sub(rf";\s*[^;()]*{flag}\b", "", message)

    def replace(match: re.Match[str]) -> str:
        flag, value = match.group(1), match.group(2)
        if flag in known:
            return f'{known[flag]} "{value}"' if value else known[flag]
        name = SERVER_FLAGS.get(flag, flag)
        return f"{name} {value}" if value else name

    return re.sub(r"(--[a-z][a-z0-9-]*)(?: (none|auto|on|off|\d[\w.:]*))?", replace, message)
