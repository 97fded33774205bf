"""The settings a generated video was made with, as the JSON dict that ``io.settings`` stores in the video.

:func:`video_settings` builds it from a call's :class:`~diffsynth_cog.pipeline.options.GenerationOptions` and the
pipeline's state; every call of ``Pipeline.generate`` / ``extend_video`` leaves it in
``pipe.last_settings`` (pass it on: ``save_video(frames, path, fps=8, settings=pipe.last_settings)``).
:func:`generation_keywords` reads one back into the pipeline's keywords (``diffsynth-cog generate --like``).

Keys (a part that was off is absent, or None):

* ``version``: the package version; ``model``: ``{"family", "label", "path" (the transformer's, when loaded by
  a ModelManager), "dtype", "config" (the transformer's config)}``; ``lora``: the merged LoRAs, in merge
  order, each ``{"file", "sha256", "alpha"}``;
* ``prompt``, ``negative_prompt`` (None when embeddings were passed instead), ``seed`` (the seed actually drawn
  with, also for seed -1; None when the caller passed a generator or under DiffSynth's seedless global RNG),
  ``height``, ``width``, ``num_frames``, ``fps`` (the family's; a front end writing another fps sets it),
  ``steps``, ``sampler``, ``conventions``, ``cfg_scale``, ``dynamic_cfg``, ``denoising_strength`` (video to
  video only), ``tiled_vae``;
* the parts: ``mask`` (``{"name", "spec"}``: the block-sparse attention mask and the spec that makes it again),
  ``attention`` (a kernel name given to the call), ``windows`` (``{"frames", "overlap", "starts" (latent
  frames), "joins" (pixel frames)}``), ``riflex`` (``{"k", "n_k"}``), ``step_cache`` (``{"method",
  "threshold"}``), ``tiles`` (DiT tiles: ``{"size", "overlap"}``), ``quantization`` (``{"mode", "layers"}``),
  ``parallel`` (the layout's degrees), ``offload`` (the memory mode);
* ``continuation`` (``extend_video``): ``{"context_frames", "extend_by", "color_match", "source_frames"}``;
* ``joins``: every pixel frame where a window or a continuation joins the frames before it (the first frame after
  the join), which ``diffsynth-cog evaluate`` scores.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from diffsynth_cog.hub.downloads import sha256_of
from diffsynth_cog.io.settings import JOINS_KEY, package_version

if TYPE_CHECKING:
    from diffsynth_cog.denoise.windows import WindowSpec
    from diffsynth_cog.families import Family
    from diffsynth_cog.pipeline.checks import CheckedCall
    from diffsynth_cog.pipeline.options import GenerationOptions


class Pipeline(Protocol):
    """The pipeline as the settings and the extension read it (``CogVideoPipeline``; structural, so these
    modules do not import the module that imports them)."""

    dit: Any
    model_manager: Any
    offloader: Any
    parallel: Any
    torch_dtype: Any
    last_settings: dict[str, Any] | None

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


logger = logging.getLogger(__name__)

__all__ = ["continued_settings", "file_sha256", "generation_keywords", "video_settings", "window_joins"]


def window_joins(family: Family, windows: WindowSpec, latent_frames: int, padding: int = 0) -> list[int]:
    """The pixel frames where the windows after the first start (their joins), from the window plan over
    ``latent_frames`` latent frames (``padding`` of them added at the front, dropped before decoding)."""
    plan = windows.plan(latent_frames)
    if plan.single:
        return []
    joins = {family.first_pixel_frame(start - padding) for start in plan.starts[1:]}
    return sorted(j for j in joins if j >= 1)


@functools.lru_cache(maxsize=32)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_of(Path(path))


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """The sha256 of a file (hex), computed once per file version; None for a folder or a missing file."""
    p = Path(path)
    if not p.is_file():
        return None
    stat = p.stat()
    return _cached_sha256(str(p.resolve()), stat.st_size, stat.st_mtime_ns)


def _step_cache(step_cache: Any) -> dict | None:
    from diffsynth_cog.pipeline.options import StepCacheSpec

    if step_cache is None:
        return None
    if isinstance(step_cache, StepCacheSpec):
        return {"method": step_cache.method, "threshold": step_cache.threshold}
    threshold = getattr(step_cache, "threshold", None)
    return {"method": type(step_cache).__name__, "threshold": float(threshold) if threshold is not None else None}


def _model(pipe: Pipeline) -> dict:
    family, config = pipe.dit.family, pipe.dit.config
    record = pipe.model_manager.fetch_record("cog_dit") if pipe.model_manager is not None else None
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
    simple = (str, int, float, bool, type(None), list, tuple)
    return {
        "family": family.name,
        "label": family.label,
        "path": str(record.path) if record is not None else None,
        "dtype": str(pipe.torch_dtype).removeprefix("torch."),
        "config": {k: v for k, v in values.items() if isinstance(v, simple)},
    }


def _loras(pipe: Pipeline) -> list[dict]:
    loras = pipe.model_manager.loras if pipe.model_manager is not None else []
    return [{"file": lora.path.name, "sha256": file_sha256(lora.path), "alpha": lora.alpha} for lora in loras]


def _quantization(pipe: Pipeline) -> dict | None:
    modes = [m.mode for m in pipe.dit.modules() if isinstance(getattr(m, "mode", None), str) and m.mode]
    return {"mode": modes[0], "layers": len(modes)} if modes else None


def _parts(pipe: Pipeline, options: GenerationOptions, checked: CheckedCall) -> dict[str, Any]:
    """The long-video and memory parts of a call (absent when off)."""
    from diffsynth_cog.denoise.riflex import resolve_riflex

    long_video, config = options.long_video, pipe.dit.config
    parts: dict[str, Any] = {}
    attention = long_video.attention
    if isinstance(attention, str):
        parts["attention"] = attention
    elif attention is not None:
        parts["mask"] = {
            "name": getattr(attention, "name", type(attention).__name__),
            "spec": getattr(attention, "spec", None),
        }
    if checked.windows is not None:
        latent_frames = checked.latent_shape[2]
        parts["windows"] = {
            "frames": checked.windows.frames,
            "overlap": checked.windows.overlap,
            "starts": list(checked.windows.plan(latent_frames).starts),
            "joins": window_joins(config.family, checked.windows, latent_frames, checked.padding),
        }
    riflex = resolve_riflex(config, long_video.riflex)
    if riflex is not None:
        parts["riflex"] = {"k": int(riflex[0]), "n_k": int(riflex[1])}
    if (step_cache := _step_cache(long_video.step_cache)) is not None:
        parts["step_cache"] = step_cache
    if checked.tiles is not None:
        parts["tiles"] = {"size": list(checked.tiles.size), "overlap": list(checked.tiles.overlap)}
    if (quantization := _quantization(pipe)) is not None:
        parts["quantization"] = quantization
    if pipe.parallel is not None:
        parts["parallel"] = dataclasses.asdict(pipe.parallel.layout)
    if pipe.offloader.mode != "none":
        parts["offload"] = pipe.offloader.mode
    return parts


def video_settings(
    pipe: Pipeline, options: GenerationOptions, *, checked: CheckedCall, seed: int | None
) -> dict[str, Any]:
    """The settings dict of one generation (module docstring): ``options`` as the call was checked
    (``checked``), ``seed`` the seed it drew with."""
    inputs, sampling = options.inputs, options.sampling
    settings: dict[str, Any] = {
        "version": package_version(),
        "model": _model(pipe),
        "lora": _loras(pipe),
        "prompt": inputs.prompt if inputs.prompt_emb is None else None,
        "negative_prompt": inputs.negative_prompt if inputs.negative_prompt_emb is None else None,
        "seed": seed,
        "height": inputs.height,
        "width": inputs.width,
        "num_frames": inputs.num_frames,
        "fps": pipe.dit.family.fps,
        "steps": sampling.num_inference_steps,
        "sampler": sampling.sampler,
        "conventions": checked.conventions.name,
        "cfg_scale": float(sampling.cfg_scale),
        "dynamic_cfg": bool(sampling.use_dynamic_cfg),
        "tiled_vae": bool(options.memory.tiled),
    }
    if checked.video is not None:
        settings["denoising_strength"] = float(sampling.denoising_strength)
    settings.update(_parts(pipe, options, checked))
    settings[JOINS_KEY] = list(settings.get("windows", {}).get("joins", []))
    return settings


def continued_settings(
    settings: Mapping[str, Any], *, source_frames: int, context_frames: int, extend_by: int, color_match: bool
) -> dict[str, Any]:
    """The settings of an extended video (``extend_video``) from those of the clip it generated: the clip's
    frames start at ``source_frames - context_frames`` of the whole video, whose first new frame is a join."""
    offset = source_frames - context_frames
    out = dict(settings)
    out["num_frames"] = source_frames + extend_by
    out["continuation"] = {
        "context_frames": context_frames,
        "extend_by": extend_by,
        "color_match": color_match,
        "source_frames": source_frames,
    }
    window_joins_ = [offset + j for j in settings.get(JOINS_KEY, []) if offset + j > source_frames]
    out[JOINS_KEY] = sorted({source_frames, *window_joins_})
    return out


def generation_keywords(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline keywords (``GenerationOptions`` fields) that a settings dict records: what reproduces the
    video's generation (its model, LoRA, fps and continuation are the caller's to set up)."""
    from diffsynth_cog.denoise.windows import WindowSpec
    from diffsynth_cog.models.tiling import TileSpec
    from diffsynth_cog.pipeline.options import StepCacheSpec

    plain = {
        "prompt": "prompt",
        "negative_prompt": "negative_prompt",
        "seed": "seed",
        "height": "height",
        "width": "width",
        "num_frames": "num_frames",
        "steps": "num_inference_steps",
        "sampler": "sampler",
        "conventions": "conventions",
        "cfg_scale": "cfg_scale",
        "dynamic_cfg": "use_dynamic_cfg",
        "denoising_strength": "denoising_strength",
        "tiled_vae": "tiled",
    }
    keywords = {name: settings[key] for key, name in plain.items() if settings.get(key) is not None}
    if "continuation" in settings:
        keywords.pop("num_frames", None)  # the whole video's; extend_video sets the clip's
    mask = settings.get("mask")
    if mask:
        if not mask.get("spec"):
            raise ValueError(f"the attention mask {mask.get('name')!r} of these settings has no spec to rebuild it")
        keywords["attention"] = mask["spec"]
    elif settings.get("attention"):
        keywords["attention"] = settings["attention"]
    if windows := settings.get("windows"):
        keywords["windows"] = WindowSpec(int(windows["frames"]), float(windows["overlap"]))
    if riflex := settings.get("riflex"):
        keywords["riflex"] = (int(riflex["k"]), int(riflex["n_k"]))
    if step_cache := settings.get("step_cache"):
        keywords["step_cache"] = StepCacheSpec(float(step_cache["threshold"]), str(step_cache["method"]))
    if tiles := settings.get("tiles"):
        keywords["dit_tiled"] = TileSpec(tuple(tiles["size"]), tuple(tiles["overlap"]))
    return keywords
