"""What the command line checks before any download starts or any model loads, and what it picks by itself.

The checks the commands share (``generate``'s own, its plan, are ``cli.generate_checks``): every number (NaN and
out-of-range values included), the output file (container, a folder in the way, a read-only place, an
existing file without ``--overwrite``, a full disk), the input image / video, the model (a local folder with
every part it needs, or a download preset), the LoRA (a readable LoRA file, or a preset; ``auto`` decided
from the model's family) and the device. Only then does :func:`fetch_models` download what is missing (the
model and the LoRA together, so an offline machine is told every missing file at once) or, with
``--no-download``, check the local copies.

A new ``generate`` option is checked by one line in :data:`GENERATE_CHECKS`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffsynth_cog.configs import (
    DIT_PRESETS,
    DiTConfig,
    check_cfg_scale,
    check_num_frames,
    check_number,
    dit_family,
)
from diffsynth_cog.errors import DiffSynthCogError
from diffsynth_cog.families import get_family

if TYPE_CHECKING:
    from diffsynth_cog.loading.model_folder import ModelFolder

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "CogVideoX-5B"
# --dtype choices of every command (generate, prepare, export-lora) -> torch dtype names
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_LORA = "ExVideo-CogVideoX-LoRA-129f-v1"
# The long-video LoRA ``--lora auto`` merges, per model family, beyond the family's trained clip length.
LONG_VIDEO_LORAS = {"cogvideox-5b": DEFAULT_LORA}
# The model folder parts a text-to-video generation reads (the tokenizer beside the text encoder).
GENERATE_PARTS = ("transformer", "text_encoder", "tokenizer", "vae")


class OptionError(DiffSynthCogError, ValueError):
    """A command-line value that cannot work; the message names the option, the valid values and what to do."""


# --------------------------------------------------------------------------------------------- numbers
Check = Callable[[Any, str], None]


def number(**limits: Any) -> Check:
    """A check of one numeric option (see :func:`~diffsynth_cog.configs.check_number` for ``limits``)."""
    return lambda value, option: check_number(value, name=option, **limits)


# attribute of the parsed arguments -> its check (an option this command does not have is skipped).
GENERATE_CHECKS: dict[str, Check] = {
    "num_frames": lambda value, option: check_num_frames(value, name=option),
    "num_inference_steps": number(low=1, integer=True),
    "cfg_scale": lambda value, option: check_cfg_scale(value, name=option),
    "lora_alpha": number(),
    "denoising_strength": number(low=0, high=1, low_open=True),
    "seed": number(low=-1, high=2**64 - 1, integer=True, hint="-1 = a random seed"),
    "fps": number(low=0, low_open=True),
    "quality": number(low=1, high=10),
    "step_cache": number(low=0),
}


def option_name(attribute: str) -> str:
    """The option that sets ``attribute``: a generation option's first flag (``--steps`` for
    ``num_inference_steps``), else the attribute's own spelling."""
    from diffsynth_cog.pipeline.options import cli_flags

    names = {flag.dest: flag.names[0] for flag in cli_flags()}
    return names.get(attribute, "--" + attribute.replace("_", "-"))


def check_options(args: argparse.Namespace, checks: dict[str, Check]) -> None:
    """Runs each check on its option's value (an option not given, None, is skipped); all problems are reported
    together."""
    problems = []
    for attribute, check in checks.items():
        if getattr(args, attribute, None) is None:
            continue
        try:
            check(getattr(args, attribute), option_name(attribute))
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise OptionError("\n".join(problems))


# --------------------------------------------------------------------------------------------- device
def resolve_device(name: str | None, option: str = "--device") -> str:
    """The device to run on: ``auto`` (or None) picks the GPU when torch sees one (``cuda:$LOCAL_RANK`` under a
    launcher), else the CPU, and says so; an explicit device is checked (a typo, no CUDA, a GPU index that
    is not there) with a message instead of torch's traceback later."""
    import torch

    if name in (None, "auto"):
        if torch.cuda.is_available():
            local_rank = os.environ.get("LOCAL_RANK")
            device = f"cuda:{local_rank}" if local_rank not in (None, "") else "cuda"
            logger.info("device: %s (%s)", device, torch.cuda.get_device_name(torch.device(device)))
            return device
        logger.warning(
            "no CUDA GPU found (torch.cuda.is_available() is False; torch %s, CUDA build %s): running on the CPU, "
            "which takes hours for the real models. Pass %s cpu to choose it explicitly",
            torch.__version__,
            torch.version.cuda or "none",
            option,
        )
        return "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise OptionError(f"{option} {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(
                f"{option} {name}: this machine has no CUDA GPU that torch can use (torch.cuda.is_available() is "
                f"False; torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}). Use {option} auto "
                f"(picks the CPU here) or {option} cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise OptionError(f"{option} {name}: there are {count} CUDA device(s) here, cuda:0..cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"{option} {name}: the MPS backend is not available here; use {option} auto or cpu")
    return name


# --------------------------------------------------------------------------------------------- models
def looks_like_path(text: str) -> bool:
    """Whether a model / LoRA argument is meant as a path rather than a preset name."""
    return (
        os.sep in text
        or "/" in text
        or text.startswith((".", "~"))
        or Path(text).suffix.lower() in (".safetensors", ".json", ".bin", ".pt", ".ckpt")
    )


@dataclass(frozen=True)
class ModelChoice:
    """The model to generate with: a local model folder, or a download preset (fetched by :func:`fetch_models`)."""

    local: Path | None
    preset: str | None
    family: str
    config: DiTConfig | None = None  # the transformer's config (the preset's, or the local folder's)

    @property
    def base_frames(self) -> int:
        """The longest clip the model was trained on (1.0: its config's 49; 1.5: 161, beyond its config's 81)."""
        sample_frames = self.config.sample_frames if self.config is not None else get_family(self.family).default_frames
        return get_family(self.family).trained_length(sample_frames)


@dataclass(frozen=True)
class LoRAChoice:
    """The LoRA to merge: a local file, a download preset, or none; ``reason`` says why (for ``auto``)."""

    local: Path | None = None
    preset: str | None = None
    reason: str = ""


def check_model_folder(folder: ModelFolder, parts: tuple[str, ...] = GENERATE_PARTS) -> None:
    """Raises OptionError unless ``folder`` has every part in ``parts``; reads and type-checks its VAE and
    scheduler configs (the transformer's was read by the resolver). Config files and headers only."""
    from diffsynth_cog.configs import VAEConfig
    from diffsynth_cog.loading.state_dict import read_config
    from diffsynth_cog.schedulers import SchedulerConfig

    missing = []
    for part in parts:
        try:
            folder.require(part)
        except FileNotFoundError as error:
            missing.append(str(error))
    if missing:
        raise OptionError("the model is incomplete:\n  " + "\n  ".join(missing))
    found = read_config(folder.vae) if folder.vae is not None else None
    if found is not None:
        VAEConfig.from_dict(found[0], source=str(found[1]))
    if folder.scheduler_config is not None:
        SchedulerConfig.from_file(folder.scheduler_config)


def choose_model(model: str, parts: tuple[str, ...] = GENERATE_PARTS) -> ModelChoice:
    """``--model``: a local model folder (or its transformer folder / file: the folder around it), checked for
    ``parts``; else a download preset. A path that does not exist is reported as such, not as a preset."""
    from diffsynth_cog.hub.presets import PRESETS, get_preset
    from diffsynth_cog.loading.model_folder import resolve_model_folder

    models = [name for name, preset in PRESETS.items() if preset.family is not None]
    local = Path(model).expanduser()
    if local.exists():
        folder = resolve_model_folder(local, part="transformer")
        check_model_folder(folder, parts)
        config = folder.require_dit_config()
        root = folder.root or folder.require("transformer")
        family = dit_family(config)
        return ModelChoice(local=root, preset=None, family=family, config=config)
    if looks_like_path(model):
        raise OptionError(
            f"--model {model}: no such folder ({local.resolve()}). Pass a CogVideoX model folder (text_encoder/, "
            f"tokenizer/, transformer/, vae/) or a download preset: {', '.join(models)}"
        )
    try:
        preset = get_preset(model)
    except KeyError as error:
        raise OptionError(f"--model: {error}; or the path of a local model folder") from None
    if preset.family is None:
        raise OptionError(f"--model {model} is not a model preset ({preset.description or 'a LoRA'})")
    family = preset.family
    config = DIT_PRESETS[family]
    return ModelChoice(local=None, preset=model, family=family, config=config)


def choose_lora(lora: str, model: ModelChoice, num_frames: int, models_dir: str | os.PathLike[str]) -> LoRAChoice:
    """``--lora``: ``none``; ``auto`` (the family's long-video LoRA beyond its trained clip length: from
    ``models_dir`` when it is there, else a download); a LoRA file (its header is read and checked); or a
    preset. Says what ``auto`` decided."""
    from diffsynth_cog.hub.downloads import local_status
    from diffsynth_cog.hub.presets import get_preset, preset_names

    if lora == "none":
        return LoRAChoice()
    if lora == "auto":
        if num_frames <= model.base_frames:
            return LoRAChoice(reason=f"--lora auto: no LoRA at {num_frames} frames (the model is trained on those)")
        name = LONG_VIDEO_LORAS.get(model.family)
        if name is None:
            logger.warning(
                "--lora auto: no long-video LoRA is known for %s; %d frames run on the base model, trained on %d "
                "(pass --lora <file> to merge one)",
                model.family,
                num_frames,
                model.base_frames,
            )
            return LoRAChoice(reason=f"no long-video LoRA for {model.family}")
        preset = get_preset(name)
        state = local_status(preset, models_dir).state
        where = "found in " + str(models_dir) if state != "absent" else "to be downloaded"
        reason = f"--lora auto: {name} ({where}) for {num_frames} frames with {model.family}"
        logger.info("%s; --lora none runs the base model instead", reason)
        return LoRAChoice(preset=name, reason=reason)
    path = Path(lora).expanduser()
    if path.exists():
        from diffsynth_cog.lora.files import open_lora

        try:
            open_lora(path)  # the header: a safetensors LoRA, no pickle (its fit is checked when merged)
        except (ValueError, OSError) as error:
            raise OptionError(f"--lora {lora}: {error}") from None
        return LoRAChoice(local=path)
    if looks_like_path(lora):
        raise OptionError(
            f"--lora {lora}: no such file ({path.resolve()}). Pass a LoRA .safetensors file, a preset "
            f"({', '.join(preset_names())}), auto or none"
        )
    try:
        get_preset(lora)
    except KeyError as error:
        raise OptionError(f"--lora: {error}; or a LoRA .safetensors file, auto or none") from None
    return LoRAChoice(preset=lora)


def fetch_models(
    model: ModelChoice, lora: LoRAChoice, *, models_dir: str | os.PathLike[str], download: bool, progress: bool
) -> tuple[Path, Path | None]:
    """The model folder and the LoRA file on disk: presets are downloaded together (offline, one message lists
    every missing file of both) or, without ``download``, checked locally; a downloaded model folder is
    checked for every part."""
    from diffsynth_cog.hub.downloads import DownloadError, check_local, download_models

    names = [name for name in (model.preset, lora.preset) if name is not None]
    paths: dict[str, Path] = {}
    if names:
        try:
            found = (
                download_models(names, models_dir=models_dir, progress=progress)
                if download
                else check_local(names, models_dir)
            )
        except DownloadError as error:
            hint = ""
            if lora.preset is not None and lora.reason:
                hint = f"\n({lora.reason}; pass --lora none to generate without it)"
            raise DownloadError(str(error) + hint, missing=error.missing, failed=error.failed) from None
        paths = dict(zip(names, found, strict=True))
    model_dir = model.local
    if model.preset is not None:
        from diffsynth_cog.loading.model_folder import resolve_model_folder

        model_dir = paths[model.preset]
        check_model_folder(resolve_model_folder(model_dir))
    lora_path = lora.local if lora.preset is None else paths[lora.preset]
    assert model_dir is not None
    return model_dir, lora_path
