"""Judge a video offline, without model weights: flicker, warping error, colour drift, jumps and seams,
frozen stretches, sharpness, and frame-by-frame comparison of two videos (``diffsynth-cog evaluate``).

Needs the ``evaluate`` extras (OpenCV, scikit-image, matplotlib): ``pip install 'diffsynth-cog[evaluate]'``.
The names below are imported on first use, so ``diffsynth_cog.evaluate.color`` (colour matching, OpenCV only)
does not pull scikit-image in.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "match_color": "color",
    "compare_frames": "compare",
    "compare_videos": "compare",
    "VideoReport": "report",
    "evaluate_frames": "report",
    "evaluate_video": "report",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
