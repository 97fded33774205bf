"""diffsynth-cog: long-video extension toolkit for CogVideoX.

Public API (DiffSynth-Studio's names)::

    from diffsynth_cog import ModelManager, CogVideoPipeline, save_video, load_video, download_models
"""

from diffsynth_cog.denoise.step_cache import StepCache
from diffsynth_cog.denoise.teacache import TeaCache
from diffsynth_cog.denoise.windows import WindowSpec
from diffsynth_cog.hub.downloads import download_models
from diffsynth_cog.io.video import load_video, save_video
from diffsynth_cog.pipeline.cog_video import CogVideoPipeline
from diffsynth_cog.pipeline.model_manager import ModelManager
from diffsynth_cog.quantization import quantize_dit

__version__ = "0.1.0"

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
