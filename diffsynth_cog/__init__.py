"""diffsynth-cog: long-video extension toolkit for CogVideoX.

Public API (DiffSynth-Studio's names)::

    from diffsynth_cog import ModelManager, CogVideoPipeline, save_video, load_video, download_models
"""

from diffsynth_cog.downloads import download_models
from diffsynth_cog.model_manager import ModelManager
from diffsynth_cog.pipeline import CogVideoPipeline
from diffsynth_cog.quantization import quantize_dit
from diffsynth_cog.step_cache import StepCache
from diffsynth_cog.teacache import TeaCache
from diffsynth_cog.video_io import load_video, save_video
from diffsynth_cog.windows import WindowSpec

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
