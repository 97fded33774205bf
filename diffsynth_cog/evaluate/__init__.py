"""Judge a video offline, without model weights: flicker, warping error, colour drift, jumps and seams,
frozen stretches, sharpness, and frame-by-frame comparison of two videos (``diffsynth-cog evaluate``).

Needs the ``evaluate`` extras (OpenCV, scikit-image, matplotlib): ``pip install 'diffsynth-cog[evaluate]'``.
"""

from diffsynth_cog.evaluate.color import match_color
from diffsynth_cog.evaluate.compare import compare_frames, compare_videos
from diffsynth_cog.evaluate.report import VideoReport, evaluate_frames, evaluate_video

__all__ = ["VideoReport", "compare_frames", "compare_videos", "evaluate_frames", "evaluate_video", "match_color"]
