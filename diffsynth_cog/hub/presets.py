"""What ``downloads`` can fetch: the model presets, with DiffSynth-Studio's names and folder layout.

A preset names one ModelScope repository, what to take from it (exact files or globs) and where it goes under
``models_dir``, plus what a complete local copy must hold when the listing cannot be fetched (offline).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from diffsynth_cog.errors import DiffSynthCogError
from diffsynth_cog.families import Family, get_family

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class UnknownPresetError(DiffSynthCogError, KeyError):
    """A preset name that is not in the registry (the message lists the valid names)."""

    def __str__(self) -> str:
        # KeyError would print the message in quotes.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelPreset:
    """One downloadable model: where it lives on ModelScope and where it goes under `models_dir`.

    Exactly one of `files` (exact repository paths) or `allow_patterns` (globs over repository paths,
    `*` crossing `/`) selects what to download. `required` lists what a complete local copy must hold
    when the repository listing cannot be fetched (offline): literal paths, or globs that at least one
    file must match. Shards named by any `*.index.json` found locally are required as well, so the
    list does not have to name each shard.
    """

    name: str
    model_id: str
    subfolder: str
    files: tuple[str, ...] = ()
    allow_patterns: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    description: str = ""
    family: str | None = None  # a model's family (families.FAMILIES), known before it is downloaded

    def __post_init__(self) -> None:
        if bool(self.files) == bool(self.allow_patterns):
            raise ValueError(f"preset {self.name!r}: give exactly one of files or allow_patterns")
        if not REPO_ID.match(self.model_id):
            raise ValueError(f"preset {self.name!r}: model_id must be 'owner/name'; got {self.model_id!r}")

    def local_dir(self, models_dir: str | os.PathLike[str]) -> Path:
        """Folder the repository paths are placed under."""
        return Path(models_dir) / self.subfolder

    def result_path(self, models_dir: str | os.PathLike[str]) -> Path:
        """What `download_models` returns: the file for a one-file preset, else the folder."""
        if len(self.files) == 1:
            return self.local_dir(models_dir) / self.files[0]
        return self.local_dir(models_dir)

    def selects(self, repo_path: str) -> bool:
        """Whether this preset downloads repository file `repo_path`."""
        if self.files:
            return repo_path in self.files
        return any(fnmatch.fnmatchcase(repo_path, pattern) for pattern in self.allow_patterns)

    def offline_requirements(self) -> tuple[str, ...]:
        return self.files or self.required

    def model_family(self) -> Family | None:
        """The family description (``families``) of a model preset; None for an add-on such as a LoRA."""
        return get_family(self.family) if self.family is not None else None

    def defaults(self) -> dict[str, int]:
        """A model's generation defaults (height, width, num_frames, fps) from its family; {} for an add-on."""
        family = self.model_family()
        return family.defaults() if family is not None else {}


# The diffusers layout of a CogVideoX repository (REFERENCE.md section 1). README, LICENSE and
# configuration.json are left out: nothing loads them.
_COGVIDEOX_PATTERNS = (
    "model_index.json",
    "scheduler/*",
    "text_encoder/*",
    "tokenizer/*",
    "transformer/*",
    "vae/*",
)
# model_index.json is downloaded (a diffusers pipeline reads the folder with it) but not required: our loader reads
# each part's own config, so a copy without it is complete.
_COGVIDEOX_REQUIRED = (
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/*.safetensors",
    "tokenizer/spiece.model",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/*.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)


def _cogvideox(name: str, repo: str, description: str) -> ModelPreset:
    return ModelPreset(
        name=name,
        model_id=f"ZhipuAI/{repo}",
        subfolder=f"CogVideo/{repo}",
        allow_patterns=_COGVIDEOX_PATTERNS,
        required=_COGVIDEOX_REQUIRED,
        description=description,
        family=name.lower(),
    )


PRESETS: Mapping[str, ModelPreset] = MappingProxyType(
    {
        preset.name: preset
        for preset in (
            _cogvideox("CogVideoX-2B", "CogVideoX-2b", "CogVideoX 2B text-to-video (diffusers layout)"),
            _cogvideox("CogVideoX-5B", "CogVideoX-5b", "CogVideoX 5B text-to-video (diffusers layout)"),
            _cogvideox("CogVideoX-5B-I2V", "CogVideoX-5b-I2V", "CogVideoX 5B image-to-video (diffusers layout)"),
            _cogvideox(
                "CogVideoX1.5-5B",
                "CogVideoX1.5-5B",
                "CogVideoX 1.5 5B text-to-video, 1360x768, 81/161 frames at 16 fps",
            ),
            _cogvideox(
                "CogVideoX1.5-5B-I2V",
                "CogVideoX1.5-5B-I2V",
                "CogVideoX 1.5 5B image-to-video, sides multiples of 16, 81/161 frames at 16 fps",
            ),
            ModelPreset(
                name="ExVideo-CogVideoX-LoRA-129f-v1",
                model_id="ECNU-CILab/ExVideo-CogVideoX-LoRA-129f-v1",
                subfolder="lora",
                files=("ExVideo-CogVideoX-LoRA-129f-v1.safetensors",),
                description="ExVideo LoRA extending CogVideoX-5B to 129 frames",
            ),
        )
    }
)


def preset_names(presets: Mapping[str, ModelPreset] | None = None) -> list[str]:
    return sorted(PRESETS if presets is None else presets)


def _spellings(preset: ModelPreset) -> tuple[str, ...]:
    """The names a preset answers to, compared case-insensitively: its name (``CogVideoX-5B``; in lower case
    also the family name the logs print, ``cogvideox-5b``), its repository (``ZhipuAI/CogVideoX-5b``) and the
    repository's own name (``CogVideoX-5b``, the folder it is downloaded to)."""
    return (preset.name, preset.model_id, preset.model_id.split("/")[-1])


def get_preset(name: str, presets: Mapping[str, ModelPreset] | None = None) -> ModelPreset:
    """Look a preset up by name, case-insensitively (``cogvideox-5b``, ``CogVideoX-5B`` and
    ``ZhipuAI/CogVideoX-5b`` are one preset); an unknown name raises `UnknownPresetError` listing the valid ones."""
    registry = PRESETS if presets is None else presets
    if name in registry:
        return registry[name]
    wanted = name.strip().casefold()
    found = {p.name: p for p in registry.values() if wanted in (s.casefold() for s in _spellings(p))}
    if len(found) == 1:
        return next(iter(found.values()))
    if len(found) > 1:
        raise UnknownPresetError(f"model preset {name!r} is ambiguous: it names {', '.join(sorted(found))}")
    raise UnknownPresetError(
        f"unknown model preset {name!r}; valid names (any case): {', '.join(preset_names(registry))}"
    )
