"""CogVideoX 1.5 LoRA post-training step at its native size: plain bf16 against the 24 GiB switches.

One GPU, random full-size CogVideoX1.5-5B weights (``--model cogvideox1.5-5b-i2v`` for the I2V model), batch 1,
ExVideo's LoRA layout (rank 64 on all eight Linear layers), the trainer's own step (``CogLoRAModule``: the
latents padded to whole temporal patches, gradient checkpointing, v-prediction loss, clipping, the optimizer),
each variant built fresh in one process, baseline first (``bench_train.bench_switch``). Variants as in
``bench_train.py``: ``baseline`` (bf16 base, AdamW) and ``recipe`` = ``fp8+stream+adam8bit``, the switches of
``train/cogvideox15_81f_24gb.json``; any ``+``-joined switch list works.

Goal (issue 23): 81 frames at 768x1360 (44,880 video tokens) within 24 GiB peak at <= 1.3x the plain bf16
step (the official LoRA recipe needs 35 GB); ``--frames 161`` (85,680 tokens) measures whether the switches fit
one 80 GB GPU. Random weights show memory and time, never quality. Written: ``$OUT/bench_train_15_<frames>f.json``.

    python benchmarks/bench_train_15.py                       # 81 frames: baseline, recipe
    python benchmarks/bench_train_15.py --frames 161 --variants recipe
    python benchmarks/bench_train_15.py --smoke               # CPU, tiny 1.5 model, int8 for fp8
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import bench_train  # noqa: E402
from common import write_json  # noqa: E402
from tiny_models import PRESET_FLAGS, TINY_DIT  # noqa: E402

from diffsynth_cog.configs import DiTConfig, dit_preset  # noqa: E402
from diffsynth_cog.pipeline.sampling import latent_plan  # noqa: E402
from diffsynth_cog.training import memory  # noqa: E402

logger = logging.getLogger("bench_train_15")

GOAL_PEAK_GIB = 24.0  # at 81 frames
GOAL_STEP_RATIO = 1.3
GOAL_CARD_GIB = 80e9 / 2**30  # at 161 frames: what the allocator holds fits one 80 GB card (74.5 GiB)
NOTE = "random full-size weights: memory and step time only, no quality; the loss values mean nothing"


def latent_batch(config: DiTConfig, frames: int, height: int, width: int, device: torch.device, dtype) -> dict:
    """What the latent cache gives the step: the clip's latents unpadded (21 frames at 81), prompt embeddings and,
    for I2V, the first frame's latent."""
    plan = latent_plan(config, frames, height, width)
    _, c, padded, h, w = plan.shape
    g = torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(1, c, padded - plan.padding, h, w, generator=g),
        "prompt_emb": torch.randn(1, config.max_text_seq_length, config.text_embed_dim, generator=g),
    }
    if config.family.is_i2v:
        batch["image_latents"] = torch.randn(1, c, 1, h, w, generator=g)
    return {k: v.to(device, dtype) for k, v in batch.items()}


def judge(run: dict[str, Any], base: dict[str, Any] | None, device: torch.device, frames: int) -> None:
    """Adds the ratio to the baseline's step and, on a GPU, issue 23's goal checks for ``frames``, to ``run``: at 81
    frames <= 24 GiB peak at <= 1.3x the baseline's step; at more, that the allocator's peak fits an 80 GB card."""
    if base is not None:
        run["step_vs_baseline"] = round(run["median_step_s"] / base["median_step_s"], 3)
    if device.type != "cuda" or run is base:
        return
    if frames > 81:
        run["goal_fits_80GB_card"] = run["peak_reserved_GiB"] <= GOAL_CARD_GIB
        return
    run["goal_peak_le_24GiB"] = run["peak_GiB"] <= GOAL_PEAK_GIB
    if "step_vs_baseline" in run:
        run["goal_step_le_1.3x_baseline"] = run["step_vs_baseline"] <= GOAL_STEP_RATIO


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("cogvideox1.5-5b", "cogvideox1.5-5b-i2v"), default="cogvideox1.5-5b")
    parser.add_argument("--variants", nargs="+", default=["baseline", "recipe"])
    parser.add_argument("--layout", choices=sorted(bench_train.LAYOUTS), default="r64_all8")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1360)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--smoke", action="store_true", help="CPU run on the tiny 1.5 model (fp8 -> int8)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.frames, args.height, args.width = 9, 32, 48
        args.variants = [v.replace("recipe", "int8+stream+adam8bit").replace("fp8", "int8") for v in args.variants]
    if "baseline" in args.variants:  # first: the others are compared with it
        args.variants = ["baseline", *[v for v in args.variants if v != "baseline"]]
    for variant in args.variants:
        bench_train.variant_changes(variant)  # unknown names fail before anything runs
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.smoke:
        device = torch.device("cpu")
        config = DiTConfig.from_dict({**TINY_DIT, **PRESET_FLAGS[args.model]})
        torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a shared machine
        memory.OFFLOAD_MIN_BYTES = 0  # offload even tiny tensors, to run the hooks
        bench_train.LAYOUTS[args.layout] = {t: (4, 4.0) for t in bench_train.LAYOUTS[args.layout]}
        env = {"device": "cpu (smoke run, tiny model)", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke for the CPU smoke run")
        device = torch.device("cuda")
        config = dit_preset(args.model)
        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = latent_batch(config, args.frames, args.height, args.width, device, dtype)
    plan = latent_plan(config, args.frames, args.height, args.width)
    patches = plan.shape[2] // config.temporal_patch * (plan.shape[3] // config.patch_size)
    video_tokens = patches * (plan.shape[4] // config.patch_size)
    result: dict[str, Any] = {**env, "model": args.model, "frames": args.frames, "size": [args.height, args.width]}
    result.update(latent_frames=plan.shape[2], video_tokens=video_tokens, layout=args.layout, note=NOTE, runs={})
    for variant in args.variants:
        run = bench_train.bench_switch(config, variant, args.layout, batch, args.steps, device)
        result["runs"][variant] = run
        judge(run, result["runs"].get("baseline"), device, args.frames)
        logger.info("%s: %s", variant, run)
        write_json(f"bench_train_15_{args.frames}f.json", result)
    return result


if __name__ == "__main__":
    main()
