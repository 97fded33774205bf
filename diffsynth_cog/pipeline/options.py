"""The options of one generation, as one frozen value: :class:`GenerationOptions`.

``CogVideoPipeline.__call__`` keeps DiffSynth-Studio's keyword API and builds these once
(:meth:`GenerationOptions.from_keywords`); ``pipeline.checks.check_call`` validates them, the cross-rank check
fingerprints them, and the command line (``cli/generate.py``) and the web UI construct them from their own
fields. Parts are values, parsed once where they enter: a step-cache threshold is a :class:`StepCacheSpec`, an
attention string is a kernel name or a mask part (``denoise.masks.parse_attention``), windows a ``WindowSpec``,
DiT tiles a ``TileSpec``.

This module is the table: which options there are, in which group, with which default. Each field carries its
help text (the pipeline's docstring is built from it) and either the command-line options that set it
(:class:`Flag`, from which ``diffsynth-cog generate`` builds its parser) or the reason it has none
(``python_only``); a test fails for a field with neither. What a field is (``Flag``, ``option``, the registries
of valid values, the values parsed where they enter) lives in ``pipeline.option_fields``; its names are
re-exported here. Neither module imports torch (the command line's ``--help`` stays fast).
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diffsynth_cog.pipeline.option_fields import (
    ATTENTION_BACKENDS,
    CONVENTION_NAMES,
    SAMPLERS,
    STEP_SKIPPERS,
    Flag,
    Registry,
    StepCacheSpec,
    attention_value,
    flag,
    option,
    step_cache_value,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from diffsynth_cog.denoise.denoiser import AttentionPart, StepSkipper
    from diffsynth_cog.denoise.windows import WindowSpec
    from diffsynth_cog.models.tiling import TileSpec
    from diffsynth_cog.pipeline.sampling import Conventions


__all__ = [
    "ATTENTION_BACKENDS",
    "CONVENTION_NAMES",
    "FIELD_GROUPS",
    "Flag",
    "GROUPS",
    "GenerationOptions",
    "Inputs",
    "LongVideo",
    "Memory",
    "Output",
    "RANDOM_SEED",
    "Registry",
    "SAMPLERS",
    "STEP_SKIPPERS",
    "Sampling",
    "StepCacheSpec",
    "attention_value",
    "cli_flags",
    "fields_of",
    "flag",
    "keywords_doc",
    "option",
    "option_fields",
    "step_cache_value",
]

RANDOM_SEED = -1  # seed=-1: a fresh random seed, logged as the seed used (CogVideo's demo's convention)


# --------------------------------------------------------------------------------------------- the groups
@dataclass(frozen=True)
class Inputs:
    """What the video is made from."""

    prompt: str = option(
        "",
        "what the video shows (or pass ``prompt_emb``); one string: a list is refused (one video per call)",
        flag(
            "--prompt",
            dest="prompt",
            help="what the video shows (T5 reads about 226 tokens of it); required unless --prompts (default: none)",
        ),
    )
    negative_prompt: str = option(
        "",
        "what guidance steers away from (or pass ``negative_prompt_emb``)",
        flag(
            "--negative-prompt",
            dest="negative_prompt",
            default="",
            help="what guidance steers away from (default: empty)",
        ),
    )
    input_image: Image.Image | str | None = option(
        None,
        "the image to animate (image-to-video; needs an I2V transformer, 2 x latent channels in)",
        flag("--input-image", dest="input_image", help="image to animate (needs CogVideoX-5B-I2V; default: none)"),
    )
    input_video: Sequence[Image.Image] | torch.Tensor | None = option(
        None,
        "frames to edit (video-to-video; PIL frames or pixels [1, 3, F, H, W] in [-1, 1]), exactly "
        "``num_frames`` of ``height`` x ``width``",
        flag(
            "--input-video",
            dest="input_video",
            help="video to edit (video-to-video), or to continue with "
            "--extend-by; opened and measured before any model loads (default: none)",
        ),
    )
    height: int = option(
        480,
        "pixels, a multiple of 16",
        flag(
            "--height",
            dest="height",
            type=int,
            default=None,
            help="pixels, a multiple of 16 (default: the model's: 480 on CogVideoX 1.0, 768 on 1.5)",
        ),
    )
    width: int = option(
        720,
        "pixels, a multiple of 16",
        flag(
            "--width",
            dest="width",
            type=int,
            default=None,
            help="pixels, a multiple of 16 (default: the model's: 720 on CogVideoX 1.0, 1360 on 1.5)",
        ),
    )
    num_frames: int = option(
        49,
        "8k+1 frames (49; 129 with the ExVideo LoRA)",
        flag(
            "--num-frames",
            dest="num_frames",
            type=int,
            default=None,
            help="8k+1 frames (default: 129 on CogVideoX 1.0, with the ExVideo LoRA; 81 on 1.5, which also makes 161)",
        ),
    )
    keep_frames: int = option(
        0,
        "with ``input_video``: its first ``keep_frames`` (4k+1) frames are kept, their latents pinned to the encoded "
        "video at every step (video continuation; see ``extend_video``)",
        python_only="set by extend_video (the command line's --extend-by / --context-frames)",
    )
    latents: torch.Tensor | None = option(
        None, "initial noise [B, C, T, H/8, W/8] instead of drawing it", python_only="a tensor"
    )
    prompt_emb: torch.Tensor | None = option(
        None, "T5 embeddings of the prompt [1, L, D] instead of encoding it", python_only="a tensor"
    )
    negative_prompt_emb: torch.Tensor | None = option(
        None, "T5 embeddings of the negative prompt", python_only="a tensor"
    )


@dataclass(frozen=True)
class Sampling:
    """How the noise is drawn and walked back to a video."""

    sampler: str = option(
        "ddim",
        "``ddim`` (deterministic), ``dpm`` (stochastic: its noise comes from the generator) or ``diffsynth``: "
        "DiffSynth-Studio 1.1.x's DDIM timesteps, and its conventions unless ``conventions`` says otherwise",
        flag(
            "--sampler",
            dest="sampler",
            default="ddim",
            metavar="NAME",
            registry=SAMPLERS,
            help="ddim, dpm, or diffsynth: DiffSynth-Studio 1.1.x's own DDIM and its conventions (noise, guidance, "
            "frame conversion); the samplers of diffsynth_cog.schedulers",
        ),
    )
    conventions: str | Conventions | None = option(
        None,
        "how a reference samples, so that a seed reproduces its videos: ``diffusers`` or ``diffsynth`` "
        "(DiffSynth-Studio's noise drawn on a CPU generator in the pipeline's dtype, two-call guidance, frames "
        "truncated to uint8), or a ``sampling.Conventions``; None: ``diffsynth`` with ``sampler='diffsynth'``, "
        "else ``diffusers``",
        flag(
            "--conventions",
            dest="conventions",
            metavar="NAME",
            registry=CONVENTION_NAMES,
            help="diffusers or diffsynth: whose noise, "
            "guidance and frame conversion a seed reproduces (default: diffsynth with --sampler diffsynth, else "
            "diffusers)",
        ),
    )
    num_inference_steps: int = option(
        50,
        "denoising steps",
        flag(
            "--steps",
            "--num-inference-steps",
            dest="num_inference_steps",
            type=int,
            metavar="N",
            default=50,
            help="denoising steps (DiffSynth's ExVideo example uses 100)",
        ),
    )
    cfg_scale: float = option(
        7.0,
        "classifier-free guidance (<= 1 disables it: one DiT pass per step)",
        flag(
            "--cfg-scale",
            dest="cfg_scale",
            type=float,
            default=7.0,
            help="classifier-free guidance, >= 0 (<= 1 turns it off)",
        ),
    )
    use_dynamic_cfg: bool = option(
        False,
        "guidance growing over the steps (diffusers' formula)",
        flag(
            "--dynamic-cfg",
            "--use-dynamic-cfg",
            dest="use_dynamic_cfg",
            action="store_true",
            help="guidance growing over the steps",
        ),
    )
    seed: int | None = option(
        None,
        "seed of the initial noise (and of DPM's per-step noise), drawn on a CPU generator so that results do not "
        "depend on the device; None or -1: a fresh random seed, logged as 'seed used' (with DiffSynth's "
        "conventions None is torch's global RNG, as there)",
        flag(
            "--seed",
            dest="seed",
            type=int,
            default=0,
            help="seed of the initial noise; -1 = a random seed, logged as 'seed used'",
        ),
    )
    denoising_strength: float = option(
        1.0,
        "with ``input_video``, in (0, 1]: how much of the schedule runs (1.0 = from pure noise)",
        flag(
            "--denoising-strength",
            dest="denoising_strength",
            type=float,
            help="for --input-video, in (0, 1]: how much of the schedule runs (default: 0.7 with --input-video, 1.0 "
            "with --extend-by; refused without a video)",
        ),
    )


@dataclass(frozen=True)
class Memory:
    """Memory against speed (offload and quantization are the pipeline's and the model's settings)."""

    tiled: bool = option(
        False,
        "spatially tiled VAE (bounded decode memory)",
        flag(
            "--tiled-vae",
            dest="tiled",
            action="store_true",
            default=True,
            help="decode with spatial tiling (less memory; default: on)",
        ),
        flag("--no-tiled-vae", dest="tiled", action="store_false", help="decode without spatial tiling (more memory)"),
    )
    dit_tiled: bool | TileSpec = option(
        False,
        "the DiT on overlapping spatial tiles (True: tiles of the family's default size, 480x720 on CogVideoX 1.0, "
        "overlapping by half; or a ``tiling.TileSpec``), for resolutions above the model's base grid",
        flag(
            "--dit-tiled",
            dest="dit_tiled",
            action="store_true",
            help="run the DiT on overlapping tiles of the model's default size (480x720 on CogVideoX 1.0; for larger "
            "resolutions)",
        ),
    )


@dataclass(frozen=True)
class LongVideo:
    """Parts for videos past the trained length (README "Longer videos")."""

    attention: str | AttentionPart | None = option(
        None,
        "this call's attention: a kernel (``models.attention.BACKENDS``), a block-sparse mask (``window:W``: +-W "
        "latent frames; ``radial``; ``:token`` appended for the token-exact mask, ``:frame`` for a window computed "
        "frame by frame with the dense kernel; ``denoise.masks``) or a part",
        flag(
            "--attention",
            dest="attention",
            default="auto",
            metavar="NAME",
            help="attention kernel (models.attention.BACKENDS: auto picks FlashAttention-3 on Hopper when "
            "installed, else cuDNN; fa3-fp8 and sage are approximations), or a mask as --sparse-attention takes",
        ),
        flag(
            "--sparse-attention",
            dest="sparse_attention",
            metavar="SPEC",
            help="block-sparse attention mask (FlexAttention): window:W (+-W latent frames, text global, first "
            "frame a sink), window:W:nosink, radial, radial:DECAY, decided per 128-token block; append :token for "
            "the token-exact mask, e.g. window:2:token, or :frame for a window token-exact and frame by frame with the "
            "dense kernel, e.g. window:2:frame (default: dense attention)",
        ),
    )
    step_cache: StepSkipper | StepCacheSpec | None = option(
        None,
        "skip the DiT's blocks on steps whose output should barely change, reusing the last residual: a threshold "
        "(TeaCache where the model has a calibration, else the first-block cache; 0 = exact), a "
        "``StepCacheSpec``, ``'teacache:0.2'`` / ``'first-block:0.1'``, or a part whose ``stats()`` you read "
        "afterwards (reset at the start of every call)",
        flag(
            "--step-cache",
            dest="step_cache",
            type=float,
            default=0.0,
            help="skip DiT steps whose output should barely change, below this threshold (0 = off, exact); "
            "TeaCache (0.1-0.3) on CogVideoX-5B, else the first-block cache (0.05-0.2)",
        ),
        flag(
            "--step-cache-method",
            dest="step_cache_method",
            default="auto",
            metavar="NAME",
            registry=STEP_SKIPPERS,
            help="auto (TeaCache where the model has a calibration, CogVideoX-5B), or a method of "
            "denoise.STEP_SKIPPERS: teacache, first-block",
        ),
    )
    windows: bool | WindowSpec | None = option(
        None,
        "denoise overlapping temporal windows (``WindowSpec``; True: windows of the model's trained length), "
        "with FreeNoise rescheduling: any length at the memory of one window",
        flag(
            "--window-frames",
            "--windows",
            dest="window_frames",
            type=int,
            metavar="F",
            help="denoise overlapping windows of F (4k+1) frames: any length at the memory of one window "
            "(default: no windows)",
        ),
        flag(
            "--window-overlap",
            dest="window_overlap",
            type=float,
            default=0.25,
            help="fraction of a window shared with the next",
        ),
    )
    riflex: bool | tuple[int, int] | None = option(
        None,
        "RIFLEx temporal RoPE (True: the model's published (k, N_k), 5B; or a pair (k, N_k))",
        flag(
            "--riflex",
            dest="riflex",
            type=int,
            nargs="*",
            metavar="K N_K",
            help="RIFLEx temporal RoPE (5B): alone = the published setting (k=2, N_k=20), or give K N_K (default: off)",
        ),
    )


@dataclass(frozen=True)
class Output:
    """What the call returns."""

    output_type: str = option(
        "pil",
        "``pil`` (a list of frames), ``np`` (float array [F, H, W, 3] in [0, 1]) or ``latent`` (the final latents "
        "[B, C, T, h, w])",
        python_only="the command line writes a video file (--output)",
    )
    progress_bar: bool = option(
        True,
        "tqdm progress bars (``callback(i, t, latents)`` runs after every step either way)",
        flag(
            "--no-progress",
            dest="progress_bar",
            action="store_false",
            help="no progress bars (default: progress bars on)",
        ),
    )


GROUPS: dict[str, type] = {
    "inputs": Inputs,
    "sampling": Sampling,
    "memory": Memory,
    "long_video": LongVideo,
    "output": Output,
}


@dataclass(frozen=True)
class GenerationOptions:
    """Everything one generation is asked for, grouped; see each group's fields for what they mean."""

    inputs: Inputs = field(default_factory=Inputs)
    sampling: Sampling = field(default_factory=Sampling)
    memory: Memory = field(default_factory=Memory)
    long_video: LongVideo = field(default_factory=LongVideo)
    output: Output = field(default_factory=Output)

    @classmethod
    def from_keywords(cls, **keywords: Any) -> GenerationOptions:
        """From ``CogVideoPipeline.__call__``'s keywords (any subset; unknown ones are refused, naming them).
        Strings are parsed here, once: ``step_cache`` into a :class:`StepCacheSpec`, ``attention`` into a
        kernel name or a mask part."""
        unknown = sorted(set(keywords) - set(FIELD_GROUPS))
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; valid: {sorted(FIELD_GROUPS)}")
        if "step_cache" in keywords:
            keywords["step_cache"] = step_cache_value(keywords["step_cache"])
        if "attention" in keywords:
            keywords["attention"] = attention_value(keywords["attention"])
        grouped: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        for name, value in keywords.items():
            grouped[FIELD_GROUPS[name]][name] = value
        return cls(**{group: GROUPS[group](**values) for group, values in grouped.items()})

    def flat(self) -> dict[str, Any]:
        """Every field by its keyword name (the names are unique across the groups)."""
        return {f.name: getattr(getattr(self, g), f.name) for g, group in GROUPS.items() for f in fields_of(group)}

    def replace(self, **keywords: Any) -> GenerationOptions:
        """A copy with some fields changed (by keyword name, parsed as in :meth:`from_keywords`)."""
        return GenerationOptions.from_keywords(**{**self.flat(), **keywords})


def fields_of(group: type) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(group)


FIELD_GROUPS: dict[str, str] = {f.name: g for g, group in GROUPS.items() for f in fields_of(group)}


def option_fields() -> Iterator[tuple[str, dataclasses.Field]]:
    """(group name, field) of every option, in declaration order."""
    for name, group in GROUPS.items():
        for f in fields_of(group):
            yield name, f


def cli_flags() -> Iterator[Flag]:
    """Every command-line option the fields declare, in declaration order."""
    for _, f in option_fields():
        yield from f.metadata["flags"]


def keywords_doc(indent: str = "    ", width: int = 116) -> str:
    """The keyword arguments' documentation from the fields' help (``CogVideoPipeline.__call__``'s docstring):
    one entry per field, wrapped; the first line without ``indent`` (it replaces a placeholder already indented)."""
    entries = [
        textwrap.fill(
            f"{f.name}: {f.metadata['help']}.", width, initial_indent=indent, subsequent_indent=indent + "    "
        )
        for _, f in option_fields()
    ]
    return "\n".join(entries)[len(indent) :]
