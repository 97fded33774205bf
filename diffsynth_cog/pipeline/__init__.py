"""Generation: the model manager, a call's checks, sampling, continuation and memory modes, composed by
:class:`CogVideoPipeline` (``cog_video``)."""

from diffsynth_cog.pipeline.cog_video import CogVideoPipeline

__all__ = ["CogVideoPipeline"]
