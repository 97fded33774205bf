"""LoRA post-training step: the memory switches at full CogVideoX-5B size, loss curves, and diffusers + peft.

Every run goes through the trainer's own module (``CogLoRAModule``: frozen base, fp32 LoRA, gradient
checkpointing per block, the v-prediction loss, the job's optimizer) on random weights at the 5B
config, batch 1, AdamW lr as given, grad-norm clipping 1.0: the step ``diffsynth-cog train`` runs,
without Lightning's loop around it.

Modes (``--mode``, several allowed; each writes its JSON into $OUT, after every variant):

* ``switches`` (default): peak GPU memory and step time of each variant at ``--frames`` (129),
  baseline first, in one process. A variant is ``baseline`` or switches joined by ``+``:
  ``fp8`` / ``int8`` (frozen base quantized), ``stream`` / ``save_on_cpu`` (activation offload),
  ``adam8bit`` (bitsandbytes AdamW8bit); ``recipe`` = ``fp8+stream+adam8bit`` (train/exvideo_129f_24gb.json).
  Written: bench_train_switches.json.
* ``curve``: ``--curve-steps`` (200) optimizer steps per variant on a fixed synthetic-latent fixture at
  a small size (full-width 5B blocks, ``--curve-layers`` of them, ``--curve-frames`` frames at
  ``--curve-size``), every variant seeing the same samples, timesteps and noise at every step; plus a
  fixed evaluation batch before and after. Written: bench_train_curve.json (summary: per-step relative
  difference to the baseline's loss, final losses) and bench_train_curve.csv (step, variant, loss).
* ``reference``: diffusers + peft at REFERENCE.md's recipe (rank 128 on q/k/v/out), for comparison with
  ours at the same layout (``--layouts r128_qkvo``). Written: bench_train_reference.json.

``--tiny``: a CPU smoke run of every mode at a tiny size (fp8 variants are skipped: they need CUDA;
the activation hooks offload even tiny tensors), so the script is proven before it reaches a GPU.

    python benchmarks/bench_train.py --mode switches --variants baseline recipe int8+stream+adam8bit
    python benchmarks/bench_train.py --mode curve --variants baseline fp8 int8 recipe
    python benchmarks/bench_train.py --tiny --mode switches curve
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import logging
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import out_dir, write_json  # noqa: E402
from tiny_models import PRESET_FLAGS, TINY_DIT  # noqa: E402

from diffsynth_cog.configs import DiTConfig, dit_preset  # noqa: E402
from diffsynth_cog.lora import BLOCK_LINEAR_TARGETS, lora_parameters  # noqa: E402
from diffsynth_cog.models.dit import CogDiT  # noqa: E402
from diffsynth_cog.schedulers import scheduler_preset  # noqa: E402
from diffsynth_cog.training import memory  # noqa: E402
from diffsynth_cog.training.config import TrainConfig  # noqa: E402
from diffsynth_cog.training.module import CogLoRAModule  # noqa: E402

logger = logging.getLogger("bench_train")

LAYOUTS = {
    "r128_qkvo": {t: (128, 128.0) for t in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out")},
    "r64_all8": {t: (64, 64.0) for t in BLOCK_LINEAR_TARGETS},  # ExVideo's
}
SWITCHES: dict[str, dict[str, str]] = {
    "fp8": {"base_quantization": "fp8"},
    "int8": {"base_quantization": "int8"},
    "stream": {"activation_offload": "stream"},
    "save_on_cpu": {"activation_offload": "save_on_cpu"},
    "adam8bit": {"optimizer": "adamw8bit"},
}
ALIASES = {"recipe": "fp8+stream+adam8bit"}
STEP_ANCHOR_S = 17.30  # today's 129 f ExVideo step on one H200 (bf16 base, AdamW): the goal is <= 1.3x
GOAL_PEAK_GIB = 24.0
# The tests' tiny 5B-like config (RoPE, qk-norm, two streams) for the CPU smoke run.
TINY = {**TINY_DIT, **PRESET_FLAGS["cogvideox-5b"]}


# --------------------------------------------------------------------------------------------- variants
def variant_changes(name: str) -> dict[str, str]:
    """TrainConfig fields of a variant name ('baseline', 'recipe', 'fp8+stream', ...)."""
    name = ALIASES.get(name, name)
    changes: dict[str, str] = {}
    if name == "baseline":
        return changes
    for switch in name.split("+"):
        if switch not in SWITCHES:
            raise SystemExit(f"unknown switch {switch!r} in variant {name!r}; switches: {sorted(SWITCHES)} or 'recipe'")
        for key, value in SWITCHES[switch].items():
            if key in changes:
                raise SystemExit(f"variant {name!r} sets {key} twice")
            changes[key] = value
    return changes


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build(dit_config: DiTConfig, variant: str, layout: str, device: torch.device, lr: float, **changes: Any) -> tuple:
    """(module, optimizer, LoRA parameters) of one variant on random weights (seed 0: every variant and every rank
    builds the same); ``changes``: further TrainConfig fields."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):  # initialised in the base dtype: no fp32 5B copy
        dit = CogDiT(dit_config)
    config = TrainConfig(
        model="benchmark",
        cache_dir="benchmark",
        output_dir="benchmark",
        lora_targets=LAYOUTS[layout],
        learning_rate=lr,
        precision="bf16" if device.type == "cuda" else "fp32",
        accelerator="gpu" if device.type == "cuda" else "cpu",
        seed=0,
        **{**variant_changes(variant), **changes},
    )
    module = CogLoRAModule(config, dit=dit, scheduler_config=scheduler_preset(dit_config.family.scheduler)).to(device)
    del dit
    module.setup("fit")
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    return module, optimizer, lora_parameters(module.dit)


def train_step(module: CogLoRAModule, optimizer, params, batch: dict[str, torch.Tensor], step: int) -> float:
    loss = module.batch_loss(batch, step=step)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def host_rss_gib() -> float:
    """Resident memory of this process now (pinned offload buffers, cached by PyTorch once allocated, show
    here); the process's peak where /proc is missing."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def latent_batch(dit_config: DiTConfig, frames: int, height: int, width: int, device: torch.device, dtype) -> dict:
    t = (frames - 1) // dit_config.temporal_compression_ratio + 1
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, dit_config.out_channels, t, height // 8, width // 8, generator=g)
    emb = torch.randn(1, dit_config.max_text_seq_length, dit_config.text_embed_dim, generator=g)
    return {"latents": x0.to(device, dtype), "prompt_emb": emb.to(device, dtype)}


# --------------------------------------------------------------------------------------------- switches
def bench_switch(
    dit_config: DiTConfig, variant: str, layout: str, batch: dict, steps: int, device: torch.device
) -> dict[str, Any]:
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    host_before = host_rss_gib()
    start = time.perf_counter()
    module, optimizer, params = build(dit_config, variant, layout, device, lr=1e-5)
    sync(device)
    built_s = time.perf_counter() - start
    model_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(1 + steps):  # step 0 warms up (pinned buffers, kernels, optimizer states appear)
        sync(device)
        t0 = time.perf_counter()
        losses.append(float(train_step(module, optimizer, params, batch, i)))
        sync(device)
        times.append(time.perf_counter() - t0)
    host_after = host_rss_gib()
    result: dict[str, Any] = {
        "config": variant_changes(variant),
        "build_s": round(built_s, 2),
        "step_times_s": [round(t, 3) for t in times],
        "median_step_s": round(statistics.median(times[1:]), 3),
        "losses": [round(v, 5) for v in losses],
        "lora_params": sum(p.numel() for p in params),
        "optimizer_state_GiB": round(memory.optimizer_state_bytes(optimizer) / 2**30, 3),
        "host_rss_GiB_before": round(host_before, 2),
        "host_rss_GiB_after_steps": round(host_after, 2),
    }
    if device.type == "cuda":
        result["model_GiB"] = round(model_gib, 2)
        result["peak_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_reserved_GiB"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    del module, optimizer, params
    release(device)
    return result


def run_switches(args: argparse.Namespace, dit_config: DiTConfig, device: torch.device, env: dict) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = latent_batch(dit_config, args.frames, args.height, args.width, device, dtype)
    t = (args.frames - 1) // 4 + 1
    tokens = t * (args.height // 16) * (args.width // 16) + dit_config.max_text_seq_length
    result = {**env, "mode": "switches", "frames": args.frames, "size": [args.height, args.width], "tokens": tokens}
    result["layout"], result["runs"] = args.layout, {}
    for variant in args.variants:
        if args.tiny and "fp8" in ALIASES.get(variant, variant):
            logger.info("%s: skipped on the CPU (fp8 needs torch._scaled_mm on a CUDA GPU)", variant)
            continue
        run = bench_switch(dit_config, variant, args.layout, batch, args.steps, device)
        result["runs"][variant] = run
        logger.info("switches %s: %s", variant, run)
        base = result["runs"].get("baseline")
        if base is not None:
            run["step_vs_baseline"] = round(run["median_step_s"] / base["median_step_s"], 3)
        if device.type == "cuda" and args.frames == 129 and args.layout == "r64_all8":
            run["goal_peak_le_24GiB"] = run["peak_GiB"] <= GOAL_PEAK_GIB
            run["step_vs_17.30s_anchor"] = round(run["median_step_s"] / STEP_ANCHOR_S, 3)
        write_json(args.prefix + "_switches.json", result)
    return result


# --------------------------------------------------------------------------------------------- curve
def curve_fixture(dit_config: DiTConfig, args: argparse.Namespace, device: torch.device, dtype) -> list[dict]:
    """``--curve-samples`` fixed samples: smooth latents (low-resolution noise, trilinearly upsampled and
    normalised: learnable, unlike white noise) and random prompt embeddings."""
    g = torch.Generator().manual_seed(1234)
    t = (args.curve_frames - 1) // 4 + 1
    h, w = args.curve_size[0] // 8, args.curve_size[1] // 8
    samples = []
    for _ in range(args.curve_samples):
        coarse = torch.randn(1, dit_config.out_channels, t, max(1, h // 4), max(1, w // 4), generator=g)
        x0 = F.interpolate(coarse, size=(t, h, w), mode="trilinear", align_corners=False)
        x0 = x0 / x0.std()
        emb = torch.randn(1, dit_config.max_text_seq_length, dit_config.text_embed_dim, generator=g)
        samples.append({"latents": x0.to(device, dtype), "prompt_emb": emb.to(device, dtype)})
    return samples


@torch.no_grad()
def eval_loss(module: CogLoRAModule, samples: list[dict]) -> float:
    """Mean loss over every sample at four fixed timesteps with fixed noise (the same for every variant)."""
    was = module.dit.training
    module.dit.eval()
    total = []
    for i, sample in enumerate(samples):
        x0 = sample["latents"].float()
        for t in (100, 400, 700, 950):
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(10_000 * i + t)).to(x0.device)
            tt = torch.full((1,), t, device=x0.device, dtype=torch.long)
            total.append(module.v_loss(x0, sample["prompt_emb"], tt, noise).item())
    module.dit.train(was)
    return sum(total) / len(total)


def run_curve(args: argparse.Namespace, dit_config: DiTConfig, device: torch.device, env: dict) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    small = DiTConfig.from_dict({**dit_config.to_dict(), "num_layers": args.curve_layers})
    samples = curve_fixture(small, args, device, dtype)
    result: dict[str, Any] = {**env, "mode": "curve", "steps": args.curve_steps, "lr": args.curve_lr}
    result.update(layers=args.curve_layers, frames=args.curve_frames, size=list(args.curve_size))
    result["samples"], result["layout"], result["runs"] = args.curve_samples, args.layout, {}
    rows: list[tuple[int, str, float]] = []
    for variant in args.variants:
        if args.tiny and "fp8" in ALIASES.get(variant, variant):
            logger.info("%s: skipped on the CPU (fp8 needs torch._scaled_mm on a CUDA GPU)", variant)
            continue
        release(device)
        module, optimizer, params = build(small, variant, args.layout, device, lr=args.curve_lr)
        before = eval_loss(module, samples)
        start = time.perf_counter()
        losses = [train_step(module, optimizer, params, samples[i % len(samples)], i) for i in range(args.curve_steps)]
        losses = [float(v) for v in losses]  # one synchronisation at the end
        seconds = time.perf_counter() - start
        after = eval_loss(module, samples)
        run = {"eval_loss_before": before, "eval_loss_after": after, "seconds": round(seconds, 2)}
        run["mean_loss_last_20"] = sum(losses[-20:]) / len(losses[-20:])
        base = result["runs"].get("baseline")
        if base is not None:
            reference = base["losses"]
            rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference, strict=True)]
            run["rel_diff_per_step_mean"] = sum(rel) / len(rel)
            run["rel_diff_per_step_max"] = max(rel)
            run["eval_after_vs_baseline"] = after / base["eval_loss_after"]
        run["losses"] = losses
        result["runs"][variant] = run
        rows += [(i, variant, v) for i, v in enumerate(losses)]
        logger.info("curve %s: %s", variant, {k: v for k, v in run.items() if k != "losses"})
        del module, optimizer, params
        write_json(args.prefix + "_curve.json", result)
        out = out_dir() / (args.prefix + "_curve.csv")
        with out.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "variant", "loss"])
            writer.writerows(rows)
    return result


# --------------------------------------------------------------------------------------------- reference
def run_reference(args: argparse.Namespace, dit_config: DiTConfig, device: torch.device, env: dict) -> dict:
    """diffusers + peft, rank 128 on to_q/to_k/to_v/to_out.0, autocast bf16 (REFERENCE.md's recipe)."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from peft import LoraConfig

    cfg = {k: v for k, v in dit_config.to_dict().items() if k != "rope_theta"}
    release(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = CogVideoXTransformer3DModel(**cfg).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=128, lora_alpha=128, init_lora_weights=True, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = latent_batch(dit_config, args.frames, args.height, args.width, device, dtype)
    x = batch["latents"].transpose(1, 2)
    gh, gw = args.height // 16, args.width // 16  # the full base grid at 480x720: no crop
    rope = get_3d_rotary_pos_embed(
        dit_config.attention_head_dim, ((0, 0), (gh, gw)), (gh, gw), x.shape[1], device=device
    )
    ts = torch.full((1,), 500, device=device, dtype=torch.long)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(
                hidden_states=x,
                encoder_hidden_states=batch["prompt_emb"],
                timestep=ts,
                image_rotary_emb=rope,
                return_dict=False,
            )[0]
        out.float().pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(1 + args.steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    run = {"step_times_s": [round(t, 3) for t in times], "median_step_s": round(statistics.median(times[1:]), 3)}
    if device.type == "cuda":
        run["peak_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    result = {**env, "mode": "reference", "frames": args.frames, "runs": {"diffusers_peft_r128_qkvo": run}}
    logger.info("reference: %s", run)
    write_json(args.prefix + "_reference.json", result)
    return result


# --------------------------------------------------------------------------------------------- main
MODES: dict[str, Callable[..., dict]] = {"switches": run_switches, "curve": run_curve, "reference": run_reference}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", nargs="+", choices=sorted(MODES), default=["switches"])
    parser.add_argument("--variants", nargs="+", default=None, help="default: baseline + each switch + recipe")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="r64_all8")
    parser.add_argument("--frames", type=int, default=129)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--curve-steps", type=int, default=200)
    parser.add_argument("--curve-lr", type=float, default=1e-4)
    parser.add_argument("--curve-layers", type=int, default=8)
    parser.add_argument("--curve-frames", type=int, default=9)
    parser.add_argument("--curve-size", type=int, nargs=2, default=[256, 384], metavar=("H", "W"))
    parser.add_argument("--curve-samples", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run at a tiny size")
    parser.add_argument("--prefix", default="bench_train", help="output file names: PREFIX_switches.json, ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.variants is None:
        # On the CPU fp8 cannot run: int8 stands in for it in the combined variant.
        args.variants = ["baseline", *SWITCHES, "int8+stream+adam8bit" if args.tiny else "recipe"]
    if args.variants[0] != "baseline" and "baseline" in args.variants:
        args.variants.remove("baseline")
        args.variants.insert(0, "baseline")  # first: the others are compared with it
    for variant in args.variants:
        variant_changes(variant)  # unknown names fail before anything runs
    if args.tiny:
        device = torch.device("cpu")
        dit_config = DiTConfig.from_dict(TINY)
        args.frames, args.height, args.width = 9, 32, 48
        args.curve_layers, args.curve_frames, args.curve_size = 2, 9, [32, 48]
        args.curve_steps = min(args.curve_steps, 10)
        args.curve_lr = 1e-2
        torch.set_num_threads(1)  # tiny tensors: one thread is fastest, two stall each other on 2 cores
        memory.OFFLOAD_MIN_BYTES = 0  # tiny tensors: offload them anyway, to run the hooks
        env = {"device": "cpu (tiny smoke run)", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        layouts = {t: (4, 4.0) for t in LAYOUTS[args.layout]}
        LAYOUTS[args.layout] = layouts
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny for the CPU smoke run")
        device = torch.device("cuda")
        dit_config = dit_preset("cogvideox-5b")
        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    results = {}
    for mode in args.mode:
        results[mode] = MODES[mode](args, dit_config, device, env)
    return results


if __name__ == "__main__":
    main()
