"""The training job: one frozen :class:`TrainConfig`, read from a JSON file and validated up front.

A job file (see ``train/*.json``) holds the fields below by name. Unknown keys are rejected (a
misspelt ``learnig_rate`` must not silently train at the default) and every value is checked when
the config is built, so a bad value fails before any model is loaded, with a message naming the
field, the valid range and what was found.

Defaults follow ExVideo's CogVideoX recipe: LoRA rank 64 on all eight Linear layers of every
block, AdamW at lr 1e-5, bf16 base weights with fp32 LoRA parameters, gradient checkpointing.
Relative paths are taken relative to the current directory (where the job is launched).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffsynth_cog.configs import check_num_frames, check_side
from diffsynth_cog.denoise.masks import parse_attention
from diffsynth_cog.errors import DiffSynthCogError
from diffsynth_cog.io.json_files import read_json
from diffsynth_cog.lora import BLOCK_LINEAR_TARGETS
from diffsynth_cog.validators import (
    BOOLEAN,
    NON_EMPTY_PATH,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    STRING,
    Check,
    divisors,
    integer,
    is_int,
    number,
    one_of,
    pair,
    sequence_of,
    table_problems,
)

STRATEGIES = ("auto", "deepspeed_stage_2")
PRECISIONS = ("auto", "bf16", "fp32")
ACCELERATORS = ("auto", "cpu", "gpu")
EXPORT_DTYPES = ("fp32", "bf16", "fp16")
BASE_QUANTIZATIONS = ("none", "fp8", "int8")
ACTIVATION_OFFLOADS = ("none", "stream", "save_on_cpu")
OPTIMIZERS = ("adamw", "adamw8bit")
NUM_TRAIN_TIMESTEPS = 1000  # CogVideoX's schedule length; the loaded scheduler config is checked again in setup


class TrainConfigError(DiffSynthCogError, ValueError):
    """A training config field is missing, unknown or out of range (the message names it)."""


# A per-target LoRA setting as JSON gives it: a rank, [rank, alpha] or {"rank": r, "alpha": a}.
TargetSetting = int | tuple[int, float] | Mapping[str, Any]


@dataclass(frozen=True)
class TrainConfig:
    """A long-video LoRA post-training job.

    Paths:
        model: a CogVideoX model folder (``transformer/``, ``scheduler/``, and for validation videos
            ``text_encoder/``, ``tokenizer/``, ``vae/``), or a ``transformer/`` folder / weights file.
        cache_dir: the latent cache written by ``diffsynth-cog prepare``.
        output_dir: checkpoints (``checkpoints/``), logs (``logs/``), the exported LoRA (``lora/``)
            and validation videos (``validation/``).

    LoRA:
        lora_targets: Linear layer names (suffixes such as ``"attn1.to_q"``, ``"ff.0"``), each at
            ``lora_rank``; or a dict target -> rank, [rank, alpha] or {"rank": r, "alpha": a}.
        lora_rank, lora_alpha: defaults for targets without their own; alpha None = rank (scale 1).

    Optimisation:
        learning_rate, weight_decay (AdamW), warmup_steps (linear from 0, then constant),
        max_steps (optimizer steps), grad_clip (max global grad norm, 0 = off), batch_size (per
        device), grad_accumulation, seed, timestep_range (inclusive [min, max] of t ~ U{min..max}).

    Hardware:
        precision: "bf16" (base weights bf16, LoRA fp32), "fp32", or "auto" (bf16 on GPUs, fp32 on
            CPU). strategy: "auto" (one device, or DDP) or "deepspeed_stage_2" (ZeRO-2: optimizer
            states and gradients sharded; CUDA only). offload_optimizer: ZeRO-Offload of the
            optimizer to the CPU (DeepSpeed only). accelerator, devices (per node), num_nodes,
            gradient_checkpointing, num_workers (data loading processes).

    Memory switches (single-GPU low-memory training; see ``training/memory.py``):
        base_quantization: "none", "fp8" (e4m3 matmuls; CUDA compute capability >= 8.9) or "int8"
            (weights only): the frozen block Linear weights of the base, the LoRA stays fp32.
        activation_offload: "none", "stream" (checkpointed block inputs in pinned CPU memory, copied
            on a side stream with prefetch) or "save_on_cpu" (PyTorch's hooks, copies on the compute stream).
        optimizer: "adamw" or "adamw8bit" (bitsandbytes, 8-bit moments).

    Image-to-video (a DiT with in_channels = 2 x latent channels, a cache prepared with first-frame latents):
        image_noise: noise added to the first-frame latent per sample, sigma = exp(N(mean, std)) as
            [mean, std] (CogVideoX's I2V trainers: [-3.0, 0.5]); null = none. image_dropout:
            probability of zeroing a sample's image latent (no image condition).

    Long clips (see ``training/sequence.py``):
        sequence_parallel: the Ulysses degree: each sample's tokens are split over this many ranks
            (forward and backward), groups of them train different samples (data parallel); it must
            divide the DiT's attention heads and the number of ranks (devices x num_nodes).
        attention: train under a block-sparse mask, e.g. ``"window:2"``, ``"radial"`` or ``"radial:token"``
            (``sparse_attention.parse_attention``; a dense kernel name also works); null = dense. The
            exported LoRA records it (``diffsynth_cog_attention``): generate with ``--sparse-attention``
            and the same spec to run it as trained.

    Logs: tensorboard (a TensorBoard run in ``<output_dir>/logs/tensorboard`` with the losses and the
        validation videos) beside the CSV logs.

    Schedule:
        checkpoint_every_n_steps, log_every_n_steps, validation_every_n_steps (0 = no validation
        videos) with validation_prompts and the generation settings (None = the cache's clip size);
        validation_images: one input image per prompt, for an image-to-video model.
    """

    model: str
    cache_dir: str
    output_dir: str
    lora_targets: tuple[str, ...] | Mapping[str, TargetSetting] = BLOCK_LINEAR_TARGETS
    lora_rank: int = 64
    lora_alpha: float | None = None
    learning_rate: float = 1e-5
    weight_decay: float = 0.01  # torch AdamW's default, which ExVideo's trainer keeps
    warmup_steps: int = 0
    max_steps: int = 1000
    grad_clip: float = 1.0
    batch_size: int = 1
    grad_accumulation: int = 1
    seed: int = 0
    timestep_range: tuple[int, int] = (0, NUM_TRAIN_TIMESTEPS - 1)
    precision: str = "auto"
    gradient_checkpointing: bool = True
    strategy: str = "auto"
    offload_optimizer: bool = False
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    num_workers: int = 2
    checkpoint_every_n_steps: int = 250
    log_every_n_steps: int = 10
    validation_every_n_steps: int = 0
    validation_prompts: tuple[str, ...] = field(default_factory=tuple)
    validation_negative_prompt: str = ""
    validation_num_frames: int | None = None
    validation_height: int | None = None
    validation_width: int | None = None
    validation_num_inference_steps: int = 50
    validation_cfg_scale: float = 7.0
    validation_fps: int = 8
    validation_images: tuple[str, ...] = field(default_factory=tuple)
    export_dtype: str = "fp32"
    base_quantization: str = "none"
    activation_offload: str = "none"
    optimizer: str = "adamw"
    image_noise: tuple[float, float] | None = (-3.0, 0.5)
    image_dropout: float = 0.0
    tensorboard: bool = True
    sequence_parallel: int = 1
    attention: str | None = None

    def __post_init__(self) -> None:
        problems = table_problems(self, FIELD_CHECKS)
        problems += [message for rule in _RULES for message in rule(self)]
        problems += _target_problems(self.lora_targets)
        if problems:
            raise TrainConfigError("invalid training config: " + "; ".join(problems))

    # -- derived values ------------------------------------------------------------------------

    def lora_spec(self) -> dict[str, tuple[int, float]]:
        """Target -> (rank, alpha) for :func:`~diffsynth_cog.lora.inject_lora` (alpha None -> rank)."""
        spec: dict[str, tuple[int, float]] = {}
        if isinstance(self.lora_targets, Mapping):
            for target, setting in self.lora_targets.items():
                if isinstance(setting, Mapping):
                    rank, alpha = int(setting["rank"]), setting.get("alpha", self.lora_alpha)
                elif isinstance(setting, (tuple, list)):
                    rank, alpha = int(setting[0]), setting[1]
                else:
                    rank, alpha = int(setting), self.lora_alpha
                spec[target] = (rank, float(rank if alpha is None else alpha))
        else:
            alpha = float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)
            spec = {target: (self.lora_rank, alpha) for target in self.lora_targets}
        return spec

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser()

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_path / "checkpoints"

    @property
    def lora_dir(self) -> Path:
        return self.output_path / "lora"

    # -- (de)serialisation ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "training config") -> TrainConfig:
        """Builds a config from JSON-style values; unknown keys and missing required ones are errors."""
        if not isinstance(values, Mapping):
            raise TrainConfigError(f"{source}: expected a JSON object, found {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in fields and not str(k).startswith("_"))
        if unknown:
            raise TrainConfigError(f"{source}: unknown field(s) {unknown}; valid fields: {sorted(fields)}")
        required = [n for n, f in fields.items() if _is_required(f)]
        missing = [n for n in required if n not in values]
        if missing:
            raise TrainConfigError(f"{source}: missing required field(s) {missing}")
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key.startswith("_"):  # "_comment" and the like
                continue
            if key in ("timestep_range", "validation_prompts", "validation_images", "image_noise") and isinstance(
                value, list
            ):
                value = tuple(value)
            elif key == "lora_targets":
                if isinstance(value, list):
                    value = tuple(value)
                elif isinstance(value, Mapping):
                    value = {t: tuple(s) if isinstance(s, list) else s for t, s in value.items()}
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except TrainConfigError as error:
            raise TrainConfigError(f"{source}: {error}") from error

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> TrainConfig:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"training config not found: {p}")
        return cls.from_dict(read_json(p, TrainConfigError), source=str(p))

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible values (tuples as lists); ``from_dict(to_dict())`` gives the same config."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["timestep_range"] = list(self.timestep_range)
        values["validation_prompts"] = list(self.validation_prompts)
        values["validation_images"] = list(self.validation_images)
        values["image_noise"] = None if self.image_noise is None else list(self.image_noise)
        if isinstance(self.lora_targets, Mapping):
            values["lora_targets"] = {
                t: list(s) if isinstance(s, tuple) else dict(s) if isinstance(s, Mapping) else s
                for t, s in self.lora_targets.items()
            }
        else:
            values["lora_targets"] = list(self.lora_targets)
        for name in ("model", "cache_dir", "output_dir"):
            values[name] = str(values[name])
        return values

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


_VALIDATION_SIZE = POSITIVE_INT.or_none().described("a positive integer or null (= the cache's clip size)")

# Every field's own check (the expectation each refusal names); rules across fields follow below.
FIELD_CHECKS: dict[str, Check] = {
    "model": NON_EMPTY_PATH,
    "cache_dir": NON_EMPTY_PATH,
    "output_dir": NON_EMPTY_PATH,
    "lora_rank": POSITIVE_INT,
    "lora_alpha": number(0, low_open=True).or_none().described("a positive number or null (= the rank)"),
    "learning_rate": number(0, 1, low_open=True),
    "weight_decay": number(0, 1, high_open=True),
    "warmup_steps": NON_NEGATIVE_INT,
    "max_steps": POSITIVE_INT,
    "grad_clip": number(0).described("a number >= 0 (0 = no clipping)"),
    "batch_size": POSITIVE_INT,
    "grad_accumulation": POSITIVE_INT,
    "seed": NON_NEGATIVE_INT,
    "timestep_range": pair(
        integer(),
        f"[min, max] integers with 0 <= min <= max <= {NUM_TRAIN_TIMESTEPS - 1}",
        lambda t: 0 <= t[0] <= t[1] < NUM_TRAIN_TIMESTEPS,
    ),
    "precision": one_of(PRECISIONS),
    "gradient_checkpointing": BOOLEAN,
    "strategy": one_of(STRATEGIES),
    "offload_optimizer": BOOLEAN,
    "accelerator": one_of(ACCELERATORS),
    "devices": Check("an integer >= 1 or 'auto'", lambda v: POSITIVE_INT(v) or v == "auto"),
    "num_nodes": POSITIVE_INT,
    "num_workers": NON_NEGATIVE_INT,
    "checkpoint_every_n_steps": POSITIVE_INT,
    "log_every_n_steps": POSITIVE_INT,
    "validation_every_n_steps": NON_NEGATIVE_INT,
    "validation_prompts": sequence_of(STRING, "a list of strings"),
    "validation_negative_prompt": STRING,
    "validation_num_frames": _VALIDATION_SIZE,
    "validation_height": _VALIDATION_SIZE,
    "validation_width": _VALIDATION_SIZE,
    "validation_num_inference_steps": POSITIVE_INT,
    "validation_cfg_scale": number(0),
    "validation_fps": POSITIVE_INT,
    "validation_images": sequence_of(
        STRING, "a list of image paths (one per validation prompt, image-to-video models)"
    ),
    "export_dtype": one_of(EXPORT_DTYPES),
    "base_quantization": one_of(BASE_QUANTIZATIONS),
    "activation_offload": one_of(ACTIVATION_OFFLOADS),
    "optimizer": one_of(OPTIMIZERS),
    "image_noise": pair(number(), "[mean, std]", lambda n: n[1] >= 0)
    .or_none()
    .described("[mean, std] of ln(sigma) with std >= 0 (e.g. [-3.0, 0.5]), or null"),
    "image_dropout": number(0, 1, high_open=True),
    "tensorboard": BOOLEAN,
    "sequence_parallel": POSITIVE_INT.described("an integer >= 1 (the Ulysses degree; 1 = off)"),
    "attention": STRING.or_none().described(
        "a mask spec such as 'window:2' or 'radial', a kernel name, or null (dense)"
    ),
}


def _hardware_rules(c: TrainConfig) -> list[str]:
    """Combinations of the hardware and memory switches that cannot run."""
    rules = [
        (
            c.offload_optimizer and c.strategy != "deepspeed_stage_2",
            "offload_optimizer: needs strategy 'deepspeed_stage_2' (ZeRO-Offload)",
        ),
        (
            c.offload_optimizer and c.optimizer == "adamw8bit",
            "optimizer: 'adamw8bit' cannot be combined with offload_optimizer (DeepSpeed's CPU Adam)",
        ),
        (
            c.base_quantization in ("fp8", "int8") and c.strategy == "deepspeed_stage_2",
            "base_quantization: not with strategy 'deepspeed_stage_2' (DeepSpeed's checkpoints would hold "
            "every quantized base weight: it excludes frozen parameters, not buffers); use strategy 'auto'",
        ),
        (
            c.base_quantization == "fp8" and c.accelerator == "cpu",
            "base_quantization: 'fp8' runs on CUDA GPUs (compute capability >= 8.9); use 'int8' on a CPU",
        ),
        (
            c.strategy == "deepspeed_stage_2" and c.accelerator == "cpu",
            "strategy: 'deepspeed_stage_2' is only supported on CUDA GPUs, but accelerator is 'cpu'",
        ),
    ]
    return [message for broken, message in rules if broken]


def _sequence_parallel_rule(c: TrainConfig) -> list[str]:
    """The Ulysses degree divides the ranks (devices x num_nodes) when both are known."""
    if not (is_int(c.sequence_parallel) and c.sequence_parallel >= 1 and is_int(c.devices) and is_int(c.num_nodes)):
        return []
    ranks = c.devices * c.num_nodes
    if ranks % c.sequence_parallel == 0:
        return []
    return [
        f"sequence_parallel: {c.sequence_parallel} does not divide the {ranks} ranks (devices x num_nodes); "
        f"valid: {divisors(ranks)}"
    ]


def _attention_rule(c: TrainConfig) -> list[str]:
    """The mask spec parses (the message of the parser names the valid specs)."""
    if not isinstance(c.attention, str):
        return []
    try:
        parse_attention(c.attention)
    except ValueError as error:
        return [f"attention: {error}"]
    return []


def _validation_rules(c: TrainConfig) -> list[str]:
    """Validation videos: sizes the model can generate, prompts when asked for videos, one image per prompt."""
    problems = []
    for name, check in (
        ("validation_num_frames", check_num_frames),
        ("validation_height", check_side),
        ("validation_width", check_side),
    ):
        value = getattr(c, name)
        if POSITIVE_INT(value):
            try:
                check(value, name=name)
            except ValueError as error:
                problems.append(f"{name}: {error}")
    prompts_ok = FIELD_CHECKS["validation_prompts"](c.validation_prompts)
    if (
        prompts_ok
        and is_int(c.validation_every_n_steps)
        and c.validation_every_n_steps > 0
        and not c.validation_prompts
    ):
        problems.append("validation_prompts: validation_every_n_steps > 0 needs at least one prompt")
    images = c.validation_images
    if FIELD_CHECKS["validation_images"](images) and images and prompts_ok and len(images) != len(c.validation_prompts):
        problems.append(
            f"validation_images: {len(images)} images for {len(c.validation_prompts)} validation_prompts; "
            "give one per prompt"
        )
    return problems


_RULES: tuple[Callable[[TrainConfig], list[str]], ...] = (
    _hardware_rules,
    _sequence_parallel_rule,
    _attention_rule,
    _validation_rules,
)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _target_problems(targets: Any) -> list[str]:
    if isinstance(targets, Mapping):
        if not targets:
            return ["lora_targets: expected at least one target, got an empty dict"]
        problems = []
        for target, setting in targets.items():
            where = f"lora_targets[{target!r}]"
            if not isinstance(target, str) or not target:
                problems.append(f"lora_targets: target names must be non-empty strings, got {target!r}")
                continue
            if isinstance(setting, Mapping):
                rank, alpha = setting.get("rank"), setting.get("alpha")
                extra = sorted(set(setting) - {"rank", "alpha"})
                if extra:
                    problems.append(f"{where}: unknown key(s) {extra}; expected 'rank' and optionally 'alpha'")
            elif isinstance(setting, (tuple, list)) and len(setting) == 2:
                rank, alpha = setting
            else:
                rank, alpha = setting, None
            if not POSITIVE_INT(rank):
                problems.append(
                    f"{where}: expected a rank >= 1, [rank, alpha] or {{'rank': r, 'alpha': a}}, got {setting!r}"
                )
            elif alpha is not None and not number(0, low_open=True)(alpha):
                problems.append(f"{where}: alpha must be a positive number, got {alpha!r}")
        return problems
    if isinstance(targets, (tuple, list)):
        if not targets or not all(isinstance(t, str) and t for t in targets):
            return [f"lora_targets: expected a non-empty list of layer names, got {targets!r}"]
        return []
    return [f"lora_targets: expected a list of layer names or a dict target -> rank, got {targets!r}"]
