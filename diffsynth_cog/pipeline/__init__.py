"""Generation: the model manager, a call's options and checks, sampling, continuation and memory modes, composed
by :class:`CogVideoPipeline` (``cog_video``).

``CogVideoPipeline`` is imported on first use, so that ``pipeline.options`` (read by the command line's parser)
imports no torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CogVideoPipeline"]


def __getattr__(name: str) -> Any:
    if name == "CogVideoPipeline":
        from diffsynth_cog.pipeline.cog_video import CogVideoPipeline

        return CogVideoPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
