"""Step caching (first-block residual reuse) at full CogVideoX-5B size: time and error vs the exact path.

A ``CogVideoPipeline`` with only the DiT (random weights, bf16; no text encoder, no VAE): random
prompt embeddings [1, 226, 4096] for the prompt and the negative prompt, CFG 7 (batch 2 per step),
DDIM, ``output_type="latent"``. One exact generation (no cache), then one per threshold from the
same initial noise; each is timed once (a generation is ~20 x 1.7 s on an H200, steady enough).
Reports, per threshold: steps computed / skipped, wall time, speed-up over the exact run, and the
relative error ||cached - exact|| / ||exact|| of the final latents.

RANDOM WEIGHTS: the step-to-step change of block 0's residual under random weights has nothing to do
with a trained model's, so the skip counts per threshold (and the errors) say nothing about the
quality trade-off on real checkpoints; the timings per skipped step do carry over. The threshold-0
run's per-step distances are printed, and an extra threshold derived from them (``--auto``, on by
default) makes sure some steps are skipped even where the fixed thresholds skip none.

    python benchmarks/bench_step_cache.py                      # 49 frames, 20 steps, 0 / 0.05 / 0.1 / 0.2
    python benchmarks/bench_step_cache.py --thresholds 0 0.1 --steps 10

About 6 generations x 20 steps x 1.7 s + setup: under 4 minutes on one H200.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, peak_gib, rel_err, reset_peak, write_json  # noqa: E402

from diffsynth_cog.configs import dit_preset  # noqa: E402
from diffsynth_cog.denoise.step_cache import StepCache  # noqa: E402
from diffsynth_cog.models.dit import CogDiT  # noqa: E402
from diffsynth_cog.pipeline.cog_video import CogVideoPipeline  # noqa: E402

logger = logging.getLogger("bench_step_cache")

RANDOM_WEIGHTS_NOTE = (
    "NOTE: random weights. Their step-to-step change statistics are unlike a trained model's, so the skip "
    "counts and errors per threshold do not predict a real checkpoint's; the time saved per skipped step does."
)


def build_pipeline(device: str, dtype: torch.dtype, num_layers: int | None, seed: int) -> CogVideoPipeline:
    """The 5B DiT with random weights (``num_layers`` overrides the depth, for smoke tests) in a DiT-only pipeline."""
    config = dit_preset("cogvideox-5b")
    if num_layers is not None:
        config = dataclasses.replace(config, num_layers=num_layers)
    torch.manual_seed(seed)
    with torch.device(device):
        dit = CogDiT(config).to(dtype).eval().requires_grad_(False)
    return CogVideoPipeline(dit, None, None, None, device=device, torch_dtype=dtype)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_benchmark(
    steps: int = 20,
    frames: int = 49,
    height: int = 480,
    width: int = 720,
    thresholds: Sequence[float] = (0.0, 0.05, 0.1, 0.2),
    warmup: int = 2,
    auto: bool = True,
    seed: int = 0,
    device: str = "cuda",
    num_layers: int | None = None,
    json_name: str | None = "bench_step_cache.json",
) -> dict[str, Any]:
    """Times the exact path and each threshold; logs a table; writes JSON to $OUT/``json_name`` (if given).

    Returns ``{"settings": ..., "exact": {...}, "runs": [{"threshold", "computed", "skipped",
    "skipped_steps", "time_s", "speedup", "rel_err", "bitwise_equal"}, ...], "distances": ...}``.
    """
    dtype = torch.bfloat16
    pipe = build_pipeline(device, dtype, num_layers, seed)
    text_dim, text_len = pipe.dit.config.text_embed_dim, pipe.dit.config.max_text_seq_length
    g = torch.Generator().manual_seed(seed)
    prompt_emb = torch.randn(1, text_len, text_dim, generator=g).to(device, dtype)  # [1, 226, 4096]
    negative_emb = torch.randn(1, text_len, text_dim, generator=g).to(device, dtype)

    def generate(n_steps: int, cache: StepCache | None) -> tuple[torch.Tensor, float]:
        _sync(device)
        start = time.perf_counter()
        latents = pipe(
            prompt_emb=prompt_emb,
            negative_prompt_emb=negative_emb,
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=n_steps,
            cfg_scale=7.0,
            seed=seed,
            output_type="latent",
            progress_bar=False,
            step_cache=cache,
        )
        _sync(device)
        return latents, time.perf_counter() - start

    generate(2, StepCache(0.0))  # warm-up: kernels, allocator (the cached path runs the same kernels)
    if torch.device(device).type == "cuda":
        reset_peak()
    exact, exact_s = generate(steps, None)
    result: dict[str, Any] = {
        **(environment() if torch.device(device).type == "cuda" else {"device": device}),
        "settings": {
            "preset": "cogvideox-5b",
            "num_layers": pipe.dit.config.num_layers,
            "frames": frames,
            "latent_frames": exact.shape[2],
            "size": [height, width],
            "steps": steps,
            "cfg_batch": 2,
            "sampler": "ddim",
            "warmup_steps": warmup,
            "dtype": "bfloat16",
        },
        "note": RANDOM_WEIGHTS_NOTE,
        "exact": {"time_s": round(exact_s, 2), "step_s": round(exact_s / steps, 3)},
        "runs": [],
    }

    pending = [float(t) for t in thresholds]
    done: set[float] = set()
    while pending:
        threshold = pending.pop(0)
        if threshold in done:
            continue
        done.add(threshold)
        cache = StepCache(threshold, warmup=warmup)
        latents, seconds = generate(steps, cache)
        stats = cache.stats()
        run = {
            "threshold": threshold,
            "computed": stats["computed"],
            "skipped": stats["skipped"],
            "skipped_steps": stats["skipped_steps"],
            "time_s": round(seconds, 2),
            "speedup": round(exact_s / seconds, 3),
            "rel_err": rel_err(latents, exact),
            "bitwise_equal": bool(torch.equal(latents, exact)),
            "finite": bool(torch.isfinite(latents).all()),
        }
        result["runs"].append(run)
        logger.info("threshold %g: %s", threshold, run)
        if threshold == 0.0:
            distances = [d for d in stats["distances"] if d is not None]
            result["distances"] = {
                "per_step": [round(d, 5) for d in distances],
                "median": statistics.median(distances) if distances else None,
                "min": min(distances, default=None),
                "max": max(distances, default=None),
            }
            if auto and distances:
                # About one skip per two or three steps: the sum of ~2 median distances reaches it.
                derived = float(f"{2.5 * statistics.median(distances):.3g}")
                result["auto_threshold"] = derived
                pending.append(derived)
        if json_name:
            write_json(json_name, result)
    if torch.device(device).type == "cuda":
        result["peak_GiB"] = round(peak_gib(), 2)

    log_table(result)
    if json_name:
        path = write_json(json_name, result)
        logger.info("wrote %s", path)
    return result


def log_table(result: dict[str, Any]) -> None:
    s = result["settings"]
    lines = [
        f"step cache, CogVideoX-5B DiT ({s['num_layers']} blocks), {s['frames']} frames ({s['latent_frames']} latent) "
        f"{s['size'][0]}x{s['size'][1]}, {s['steps']} DDIM steps, CFG batch 2, bf16",
        RANDOM_WEIGHTS_NOTE,
    ]
    if "distances" in result and result["distances"]["median"] is not None:
        d = result["distances"]
        lines.append(
            f"per-step distance of block 0's residual (threshold-0 run): median {d['median']:.4f}, "
            f"min {d['min']:.4f}, max {d['max']:.4f}"
            + (f"; auto threshold {result['auto_threshold']:g}" if "auto_threshold" in result else "")
        )
    lines.append(f"{'threshold':>10} {'computed':>8} {'skipped':>7} {'time s':>7} {'speedup':>7} {'rel err':>9}  exact")
    lines.append(
        f"{'no cache':>10} {s['steps']:>8} {0:>7} {result['exact']['time_s']:>7.2f} {1.0:>7.2f} {0.0:>9.2e}  yes"
    )
    for r in result["runs"]:
        lines.append(
            f"{r['threshold']:>10g} {r['computed']:>8} {r['skipped']:>7} {r['time_s']:>7.2f} {r['speedup']:>7.2f} "
            f"{r['rel_err']:>9.2e}  {'yes' if r['bitwise_equal'] else 'no'}"
        )
    logger.info("\n%s", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2])
    parser.add_argument("--warmup", type=int, default=2, help="first steps always computed")
    parser.add_argument("--no-auto", action="store_true", help="no extra threshold derived from the distances")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-layers", type=int, default=None, help="override the depth (smoke tests only)")
    parser.add_argument("--json", default="bench_step_cache.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_benchmark(
        steps=args.steps,
        frames=args.frames,
        height=args.height,
        width=args.width,
        thresholds=args.thresholds,
        warmup=args.warmup,
        auto=not args.no_auto,
        seed=args.seed,
        device=args.device,
        num_layers=args.num_layers,
        json_name=args.json,
    )


if __name__ == "__main__":
    main()
