"""diffsynth-cog: long-video extension toolkit for CogVideoX.

Public API (DiffSynth-Studio's names)::

    from diffsynth_cog import ModelManager, CogVideoPipeline, save_video, load_video, download_models

The names are imported on first use (PEP 562), so that ``import diffsynth_cog`` and the command line's
``--help`` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CogVideoPipeline": "diffsynth_cog.pipeline.cog_video",
    "ModelManager": "diffsynth_cog.pipeline.model_manager",
    "StepCache": "diffsynth_cog.denoise.step_cache",
    "TeaCache": "diffsynth_cog.denoise.teacache",
    "WindowSpec": "diffsynth_cog.denoise.windows",
    "download_models": "diffsynth_cog.hub.downloads",
    "load_video": "diffsynth_cog.io.video",
    "quantize_dit": "diffsynth_cog.quantization",
    "save_video": "diffsynth_cog.io.video",
}

if TYPE_CHECKING:
    from diffsynth_cog.denoise.step_cache import StepCache
    from diffsynth_cog.denoise.teacache import TeaCache
    from diffsynth_cog.denoise.windows import WindowSpec
    from diffsynth_cog.hub.downloads import download_models
    from diffsynth_cog.io.video import load_video, save_video
    from diffsynth_cog.pipeline.cog_video import CogVideoPipeline
    from diffsynth_cog.pipeline.model_manager import ModelManager
    from diffsynth_cog.quantization import quantize_dit


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffsynth_cog' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "CogVideoPipeline",
    "ModelManager",
    "StepCache",
    "TeaCache",
    "WindowSpec",
    "download_models",
    "load_video",
    "quantize_dit",
    "save_video",
    "__version__",
]
