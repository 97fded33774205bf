"""Longer than 129 frames on one GPU, CogVideoX-5B at full size (random weights), 480x720, CFG batch 2, bf16.

Sections (each selectable, so a run can take a subset):

* ``--modes`` at ``--frames`` (pixel frames): per-step time (one denoiser call on a CFG batch of 2) and peak
  memory of each mode, and its relative error against the exact dense call at the same length (where that
  ran). Modes: ``dense`` (the exact path), ``window:W`` / ``radial`` (block-sparse FlexAttention masks, with the
  mask's block density, its share of full blocks and build time; ``:token`` appended: token granularity),
  ``windowed`` (temporal windows of ``--window-frames``, dense inside), ``windowed+SPEC`` (windows with a mask
  inside). Dense at 513 frames is skipped unless ``--dense-513``.
* ``--fast-path``: the 129-frame opt-in fast path (fp8 linears + ``--fast-attention`` mask + TeaCache) against
  the diffusers eager reference measured in the same process on the same weights: the reference's step, our
  computed step and skipped step, a ``--fast-steps`` run through the pipeline (average step, steps skipped),
  its per-call error against our exact bf16 call, and the 50-step average projected for skip fractions.
* ``--vae``: tiled VAE decode time and peak memory at ``--vae-frames`` (temporal chunks bound the memory).
* ``--checks``: each mode's output decoded by the (random) VAE and judged by ``diffsynth_cog.evaluate`` beside
  the exact dense one: temporal flicker, the windows' joins (spike score, warping error against elsewhere),
  colour drift and the events found. On random weights these figures test the pipeline (the checks run on what
  each mode makes, joins where the settings would record them), not the quality of any mode.

RANDOM WEIGHTS: speeds and memory carry over to trained weights; errors against the exact path and the steps
TeaCache skips do NOT (random weights' outputs and step-to-step changes are unlike a trained model's). The
fast path's projection uses a skip fraction from TeaCache's published figures and says so.

    python benchmarks/bench_long.py --frames 129 257 --modes dense window:2 radial windowed
    python benchmarks/bench_long.py --frames 513 --modes window:2 windowed --vae --vae-frames 513
    python benchmarks/bench_long.py --frames --fast-path
    python benchmarks/bench_long.py --smoke      # tiny model on the CPU: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dit import build_pair, reference_rope  # noqa: E402
from common import rel_err, write_json  # noqa: E402

from diffsynth_cog.configs import DiTConfig, VAEConfig, dit_preset, vae_preset  # noqa: E402
from diffsynth_cog.denoise.denoiser import Denoiser  # noqa: E402
from diffsynth_cog.denoise.masks import parse_attention  # noqa: E402
from diffsynth_cog.denoise.teacache import TeaCache  # noqa: E402
from diffsynth_cog.denoise.windows import WindowSpec  # noqa: E402
from diffsynth_cog.models.dit import CogDiT  # noqa: E402
from diffsynth_cog.models.tokens import TokenLayout  # noqa: E402
from diffsynth_cog.pipeline.cog_video import CogVideoPipeline  # noqa: E402

logger = logging.getLogger("bench_long")
NOTE = (
    "random weights: times and memory carry over to trained weights; errors vs the exact path and TeaCache's "
    "skipped steps do not; the checks' flicker / seam / drift figures test the pipeline, not any mode's quality"
)
TEACACHE_PUBLISHED_SKIP = 1 - 1 / 1.8  # 1.8x at threshold 0.2 (TeaCache on CogVideoX1.5, 50 steps): 44 % skipped
IDENTITY = (1.0, 0.0)


@dataclasses.dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype
    config: DiTConfig
    vae_config: VAEConfig
    smoke: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def make_setup(smoke: bool) -> Setup:
    if not smoke:
        return Setup(
            torch.device("cuda"), torch.bfloat16, dit_preset("cogvideox-5b"), vae_preset("cogvideox-5b"), False
        )
    tiny = dict(num_attention_heads=2, attention_head_dim=16, time_embed_dim=16, text_embed_dim=32, num_layers=2)
    tiny |= dict(sample_height=4, sample_width=6, sample_frames=9, max_text_seq_length=7)
    vae = VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4)
    return Setup(torch.device("cpu"), torch.float32, DiTConfig(**tiny), vae, True)


def sync(setup: Setup) -> None:
    if setup.cuda:
        torch.cuda.synchronize()


def reset_peak(setup: Setup) -> None:
    """Frees what is no longer referenced (a failed run's tensors can sit in reference cycles until the cycle
    collector runs: they would count in the next run's peak), then starts a new peak."""
    gc.collect()
    if setup.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(setup: Setup) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if setup.cuda else None


def seconds(setup: Setup, fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median wall time of ``repeat`` runs (synchronized) and the last result."""
    times, out = [], None
    for _ in range(repeat):
        sync(setup)
        start = time.perf_counter()
        out = fn()
        sync(setup)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def build_dit(setup: Setup, seed: int = 0) -> CogDiT:
    torch.manual_seed(seed)
    with torch.device(setup.device):
        return CogDiT(setup.config).to(setup.dtype).eval().requires_grad_(False)


def latent_frames(frames: int) -> int:
    return (frames - 1) // 4 + 1


def inputs(setup: Setup, frames: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = setup.config
    g = torch.Generator(setup.device).manual_seed(seed)
    shape = (2, c.in_channels, latent_frames(frames), c.sample_height, c.sample_width)
    x = torch.randn(shape, generator=g, device=setup.device, dtype=setup.dtype)
    context = torch.randn(2, c.max_text_seq_length, c.text_embed_dim, generator=g, device=setup.device)
    return x, context.to(setup.dtype)


def layout(setup: Setup, latent: int) -> TokenLayout:
    c = setup.config
    p = c.patch_size
    return TokenLayout(c.max_text_seq_length, (latent, c.sample_height // p, c.sample_width // p))


def make_mode(mode: str, args: argparse.Namespace) -> tuple[Any, WindowSpec | None]:
    """A mode name -> (attention choice, windows)."""
    windows = None
    spec = mode
    if mode.startswith("windowed"):
        windows = WindowSpec(args.window_frames, args.window_overlap)
        spec = mode.partition("+")[2] or "dense"
    attention = None if spec == "dense" else parse_attention(spec)
    return attention, windows


def build_vae_decoder(setup: Setup):  # noqa: ANN201
    from diffsynth_cog.models.vae import CogVAE

    torch.manual_seed(0)
    with torch.device(setup.device):
        return CogVAE(setup.vae_config, parts=("decoder",)).to(setup.dtype).eval().requires_grad_(False).decoder


def video_checks(setup: Setup, decoder, latents: torch.Tensor, joins: list[int]) -> dict:  # noqa: ANN001
    """A mode's output [B, C, T, h, w] (its first batch row) decoded and judged by ``diffsynth_cog.evaluate``:
    flicker, the joins' scores, colour drift, the events found (random weights: the pipeline, not quality)."""
    from diffsynth_cog.evaluate import evaluate_frames

    with torch.no_grad():
        video = decoder.decode(latents[:1].to(setup.dtype), tiled=True)[0].float().clamp(-1, 1)
    frames = ((video + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    report = evaluate_frames(frames, 8.0, joins=joins)
    summary = report.summary()
    return {
        "flicker": round(float(summary["temporal_flickering"]), 5),
        "warping_error": round(float(summary["warping_error"]), 3),
        "unexplained_color_drift": round(float(summary["unexplained_color_drift"]), 3),
        "joins": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in join.items()} for join in report.joins],
        "events": sorted({e.kind for e in report.events}),
    }


def mode_joins(args: argparse.Namespace, windows: WindowSpec | None, t: int) -> list[int]:
    """Where a mode's windows join, in pixel frames (what a generated video's settings record)."""
    from diffsynth_cog.families import get_family
    from diffsynth_cog.pipeline.settings import window_joins

    return window_joins(get_family("cogvideox-5b"), windows, t) if windows is not None else []


def measure_modes(setup: Setup, args: argparse.Namespace, result: dict) -> None:
    dit = build_dit(setup)
    decoder = build_vae_decoder(setup) if args.checks else None
    if args.compile:
        dit.compile_blocks(dynamic=False)
    result["weights_GiB"] = round(sum(p.numel() * p.element_size() for p in dit.parameters()) / 2**30, 2)
    for frames in args.frames:
        x, context = inputs(setup, frames, seed=frames)
        t = latent_frames(frames)
        exact = None
        for mode in args.modes:
            key = f"{frames}f_{mode}"
            if key in args.skip:
                result["runs"][key] = {"skipped": "--skip"}
                continue
            if mode == "dense" and frames > 257 and not args.dense_513:
                result["runs"][key] = {"skipped": "dense beyond 257 frames: pass --dense-513"}
                continue
            if mode.startswith("windowed") and WindowSpec(args.window_frames, args.window_overlap).plan(t).single:
                result["runs"][key] = {"skipped": "one window covers the video: the same call without windows"}
                continue
            try:
                entry = measure_one(setup, dit, mode, x, context, t, args, first=not result["runs"])
            except Exception as e:  # a failure is a result to report, not a reason to lose the other runs
                logger.exception("%s failed", key)
                result["runs"][key] = {"error": repr(e)[:500]}
                write_json(args.json, result)
                continue
            out = entry.pop("output")
            if decoder is not None:
                entry["checks"] = video_checks(setup, decoder, out, mode_joins(args, make_mode(mode, args)[1], t))
            if mode == "dense":
                exact = out
            elif exact is not None:
                entry["rel_err_vs_dense"] = round(rel_err(out, exact), 5)
            del out
            entry.update(frames=frames, latent_frames=t, tokens=layout(setup, t).n_tokens)
            result["runs"][key] = entry
            logger.info("%s: %s", key, entry)
            write_json(args.json, result)
        del exact, x, context
    del dit, decoder
    reset_peak(setup)


def measure_one(
    setup: Setup, dit: CogDiT, mode: str, x, context, t: int, args: argparse.Namespace, first: bool
) -> dict:
    """One mode at one length. A warm-up call precedes the timed ones where something compiles (blocks, or the
    FlexAttention kernel of a mask) and for the process's first measurement; eager dense calls are timed cold."""
    attention, windows = make_mode(mode, args)
    entry: dict[str, Any] = {"mode": mode}
    if windows is not None:
        plan = windows.plan(t)
        entry["windows"] = {"count": len(plan), "latent_frames": plan.size, "starts": list(plan.starts)}
    if attention is not None:
        call_latent = windows.plan(t).size if windows is not None else t
        lay = layout(setup, call_latent)
        sync(setup)
        start = time.perf_counter()
        masked = attention.build(lay, setup.device)
        sync(setup)
        block_mask = masked.block_masks[lay.n_tokens]
        entry["mask"] = {
            "name": attention.name,
            "build_s": round(time.perf_counter() - start, 2),
            "block_density": round(float(block_mask.to_dense().float().mean()), 4),
            # tiles FlexAttention runs without evaluating the mask (the rest of the kept ones are partial)
            "full_block_fraction": round(float(block_mask.full_kv_num_blocks.sum()) / block_mask.to_dense().numel(), 4),
        }
    denoiser = Denoiser(dit, attention=attention, windows=windows)
    with torch.no_grad():
        if args.compile or attention is not None or windows is not None or first:
            warm = seconds(setup, lambda: denoiser(x, 500, context), 1)[0]  # compiles
            entry["first_call_s"] = round(warm, 1)
        reset_peak(setup)
        step, out = seconds(setup, lambda: denoiser(x, 500, context), args.repeat)
    entry.update(step_s=round(step, 3), peak_GiB=peak_gib(setup), output=out)
    return entry


def fast_path(setup: Setup, args: argparse.Namespace, result: dict) -> None:
    """The 129-frame opt-in fast path against the diffusers eager reference, same process, same weights."""
    frames = args.fast_frames
    t = latent_frames(frames)
    x, context = inputs(setup, frames, seed=7)
    timestep = torch.full((2,), 500, device=setup.device)
    c = setup.config
    torch.manual_seed(0)
    ref, ours = build_pair(c, setup.dtype, setup.device)
    entry: dict[str, Any] = {"frames": frames, "attention": args.fast_attention, "quantize": args.fast_quantize}
    rope = reference_rope(ref, t, c.sample_height, c.sample_width, setup.device)
    with torch.no_grad():

        def run_ref():
            out = ref(
                hidden_states=x.transpose(1, 2),
                encoder_hidden_states=context,
                timestep=timestep,
                image_rotary_emb=rope,
                return_dict=False,
            )
            return out[0].transpose(1, 2)

        seconds(setup, run_ref, 1)
        reset_peak(setup)
        entry["reference_eager_step_s"], _ = seconds(setup, run_ref, args.repeat)
        entry["reference_peak_GiB"] = peak_gib(setup)
        _, exact = seconds(setup, lambda: Denoiser(ours)(x, 500, context), 1)  # our exact bf16 call
    ref = rope = None  # free the reference's weights before ours are quantized and compiled
    reset_peak(setup)

    if args.fast_quantize != "none":
        from diffsynth_cog.quantization import quantize_dit

        quantize_dit(ours, args.fast_quantize)
    if args.compile:
        ours.compile_blocks(dynamic=False)
    attention = parse_attention(args.fast_attention)
    coefficients = IDENTITY if setup.smoke else None  # None: CogVideoX-5B's published polynomial
    with torch.no_grad():
        computed = Denoiser(ours, attention=attention)
        seconds(setup, lambda: computed(x, 500, context), 1)  # compiles
        reset_peak(setup)
        entry["computed_step_s"], out = seconds(setup, lambda: computed(x, 500, context), args.repeat)
        entry["peak_GiB"] = peak_gib(setup)
        entry["rel_err_vs_exact_call"] = round(rel_err(out, exact), 5)
        # A skipped step alone: a TeaCache that skips everything it may (identity polynomial, huge threshold).
        skipping = Denoiser(ours, attention=attention, step_skip=TeaCache(1e9, coefficients=IDENTITY))
        skipping.start(3)
        skipping(x, 500, context)
        skipping.end_step()
        entry["skipped_step_s"] = seconds(setup, lambda: skipping(x, 490, context), 1)[0]
        skipping.end_step()
        assert skipping.step_skip.skipped_steps == [1], skipping.step_skip.stats()
    del out, exact

    # A short run through the pipeline with TeaCache at the chosen threshold (random weights decide the skips).
    pipe = CogVideoPipeline(ours, None, None, None, device=setup.device, torch_dtype=setup.dtype)
    cache = TeaCache(args.fast_threshold, coefficients=coefficients)
    g = torch.Generator().manual_seed(1)
    prompt, negative = (torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g) for _ in range(2))
    h, w = c.sample_height * 8, c.sample_width * 8
    kwargs = dict(
        prompt_emb=prompt.to(setup.device, setup.dtype), negative_prompt_emb=negative.to(setup.device, setup.dtype)
    )
    kwargs |= dict(height=h, width=w, num_frames=frames, cfg_scale=6.0, seed=0, output_type="latent")

    def run():
        return pipe(
            num_inference_steps=args.fast_steps, attention=attention, step_cache=cache, progress_bar=False, **kwargs
        )

    total, _ = seconds(setup, run, 1)
    stats = cache.stats()
    changes = [round(v, 4) for v in stats["changes"] if v is not None]
    entry["short_run"] = {
        "steps": args.fast_steps,
        "threshold": args.fast_threshold,
        "total_s": round(total, 2),
        "average_step_s": round(total / args.fast_steps, 3),
        "computed": stats["computed"],
        "skipped": stats["skipped"],
        "teacache_changes": changes,
        "note": "random weights: which steps TeaCache skips says nothing about a trained model",
    }
    t_c, t_s, t_ref = entry["computed_step_s"], entry["skipped_step_s"], entry["reference_eager_step_s"]
    projections = {}
    for label, fraction in (
        ("measured_skip_fraction", stats["skipped"] / args.fast_steps),
        ("teacache_published_0.2", TEACACHE_PUBLISHED_SKIP),
        ("no_skipping", 0.0),
    ):
        avg = (1 - fraction) * t_c + fraction * t_s
        projections[label] = {"skip_fraction": round(fraction, 3), "average_step_s": round(avg, 3)}
        projections[label]["speedup_vs_reference_eager"] = round(t_ref / avg, 2)
    entry["projected_50_steps"] = projections
    for k in ("reference_eager_step_s", "computed_step_s", "skipped_step_s"):
        entry[k] = round(entry[k], 3)
    result["fast_path"] = entry
    logger.info("fast path: %s", entry)
    write_json(args.json, result)
    reset_peak(setup)


def vae_decode(setup: Setup, args: argparse.Namespace, result: dict) -> None:
    decoder = build_vae_decoder(setup)
    c = setup.config
    runs = {}
    for frames in args.vae_frames:
        z = torch.randn(1, setup.vae_config.latent_channels, latent_frames(frames), c.sample_height, c.sample_width)
        z = z.to(setup.device, setup.dtype)
        reset_peak(setup)
        with torch.no_grad():
            s, video = seconds(setup, lambda z=z: decoder.decode(z, tiled=True), 1)
        runs[f"{frames}f_tiled"] = {"s": round(s, 2), "peak_GiB": peak_gib(setup), "frames_out": video.shape[2]}
        logger.info("VAE decode %d frames: %s", frames, runs[f"{frames}f_tiled"])
        del video, z
        result["vae_decode"] = runs
        write_json(args.json, result)
    reset_peak(setup)


def goals(result: dict) -> dict:
    """The issue's goals, from whatever this run measured (each needs its baseline in the same run)."""
    runs, out = result["runs"], {}
    base = runs.get("129f_dense", {})
    if "step_s" in base:
        for key, run in runs.items():
            if key.startswith("257f_") and "step_s" in run:
                out[f"{key}_step_vs_129f_dense (goal <= 2.2)"] = round(run["step_s"] / base["step_s"], 2)
        if base.get("peak_GiB"):
            for key, run in runs.items():
                if key.startswith("513f_windowed") and run.get("peak_GiB"):
                    out[f"{key}_peak_vs_129f_dense (goal <= 1.3)"] = round(run["peak_GiB"] / base["peak_GiB"], 2)
    fast = result.get("fast_path")
    if fast:
        for label, p in fast["projected_50_steps"].items():
            out[f"fast_path_{label} (goal <= 2.5 s and >= 3x)"] = [p["average_step_s"], p["speedup_vs_reference_eager"]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="*", default=[129, 257, 513], help="pixel frames (4k+1)")
    parser.add_argument("--modes", nargs="*", default=["dense", "window:2", "window:4", "radial", "windowed"])
    parser.add_argument("--skip", nargs="*", default=[], help="runs to leave out, e.g. 257f_dense 513f_window:2")
    parser.add_argument("--dense-513", action="store_true", help="also run dense beyond 257 frames (minutes)")
    parser.add_argument("--window-frames", type=int, default=129, help="window length of the windowed modes")
    parser.add_argument("--window-overlap", type=float, default=0.25)
    parser.add_argument("--repeat", type=int, default=1, help="timed calls per measurement (after one warm-up)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager blocks")
    parser.add_argument("--fast-path", action="store_true", help="the 129-frame fast path vs the diffusers reference")
    parser.add_argument("--fast-frames", type=int, default=129)
    parser.add_argument("--fast-attention", default="window:2")
    parser.add_argument("--fast-quantize", choices=["fp8", "int8", "none"], default="fp8")
    parser.add_argument("--fast-threshold", type=float, default=0.2, help="TeaCache threshold of the short run")
    parser.add_argument("--fast-steps", type=int, default=8)
    parser.add_argument("--vae", action="store_true", help="tiled VAE decode at --vae-frames")
    parser.add_argument("--vae-frames", type=int, nargs="*", default=[129, 513])
    parser.add_argument(
        "--checks", action="store_true", help="decode each mode's output and judge it (diffsynth_cog.evaluate)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script only)")
    parser.add_argument("--json", default="bench_long.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setup = make_setup(args.smoke)
    if args.smoke:
        args.compile = False
        args.fast_quantize = "none" if args.fast_quantize == "fp8" else args.fast_quantize
        args.window_frames = min(args.window_frames, 9)
    import torch._dynamo.config as dynamo_config

    for name, value in (("cache_size_limit", 64), ("recompile_limit", 64), ("accumulated_cache_size_limit", 1024)):
        if hasattr(dynamo_config, name):  # one graph per length and mask; the names moved between releases
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), value))
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if setup.cuda else "cpu (smoke)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "note": NOTE,
        "settings": {
            "model": "cogvideox-5b (random weights)" if not args.smoke else "tiny (smoke)",
            "size": [setup.config.sample_height * 8, setup.config.sample_width * 8],
            "cfg_batch": 2,
            "dtype": str(setup.dtype),
            "compiled": args.compile,
            "window_frames": args.window_frames,
            "window_overlap": args.window_overlap,
        },
        "runs": {},
    }
    if args.frames and args.modes:
        measure_modes(setup, args, result)
    if args.fast_path:
        fast_path(setup, args, result)
    if args.vae:
        vae_decode(setup, args, result)
    result["goals"] = goals(result)
    logger.info("goals: %s", result["goals"])
    path = write_json(args.json, result)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
