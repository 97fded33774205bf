"""Whole CogVideoX 1.5 videos, end to end (T5 encode, 50 denoising steps, VAE decode), on random full-size weights.

Issue 23's goals on one H100: an 81-frame 1360x768 video exact in <= 300 s (the official figure is about 550 s),
with fp8 + ``window:2`` + TeaCache 0.2 in <= 120 s; a 161-frame one with ``window:2`` in <= 7 min. Each run is
timed from the prompt to the decoded frames (wall clock, synchronised), with its parts: text encoding, the
denoising (steps computed vs skipped), the decode, peak memory. The exact run is the reference of the
approximate ones: their output's error against it is reported (random weights cannot show quality).

Runs (``--runs``, in order; one JSON ``bench_video_15.json`` under $OUT, rewritten after each):
  * ``exact_81``: bf16, per-block ``torch.compile``, the fastest exact attention (FA3 where installed);
  * ``fast_81``: fp8 linears + the ``window:2`` mask + TeaCache 0.2 (compiled); ``fast_81_frame``: the same with the
    window computed frame by frame (``window:2:frame``);
  * ``window_161``: 161 frames with ``window:2`` (compiled, bf16); ``window_161_frame``: the same window token-exact,
    computed frame by frame with the dense kernel (``window:2:frame``).

    python benchmarks/bench_video_15.py [--runs exact_81 fast_81 fast_81_frame window_161 window_161_frame] [--steps 50]
    python benchmarks/bench_video_15.py --runs exact_81 --warmup   # the compiler's first step outside the clock
    python benchmarks/bench_video_15.py --smoke     # CPU, tiny 1.5 model, every run (tests/test_bench_15.py)

The exact and an approximate run may take two processes (two device calls of 10 minutes): ``--save-latents`` writes
each run's final latents (``latents_<run>.safetensors`` beside the JSON, ~11 MB at 81 f); a later process given them
with ``--compare FILE...`` decodes them with its own VAE (the same seed builds the same random weights) after
``exact_81`` and reports their video's error against the exact one, under ``compared``:

    python benchmarks/bench_video_15.py --runs fast_81_frame --warmup --save-latents
    python benchmarks/bench_video_15.py --runs exact_81 --compare latents_fast_81_frame.safetensors
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the offline tokenizer of the tests
from common import out_dir, rel_err, write_json  # noqa: E402

from diffsynth_cog.configs import dit_preset, vae_preset  # noqa: E402
from diffsynth_cog.denoise.masks import parse_attention  # noqa: E402
from diffsynth_cog.denoise.teacache import make_step_skipper  # noqa: E402
from diffsynth_cog.io.atomic import save_safetensors_atomic  # noqa: E402
from diffsynth_cog.loading.state_dict import load_state_dict  # noqa: E402
from diffsynth_cog.models.dit import CogDiT  # noqa: E402
from diffsynth_cog.models.text_encoder import CogTextEncoder  # noqa: E402
from diffsynth_cog.models.vae import CogVAE  # noqa: E402
from diffsynth_cog.pipeline.cog_video import CogVideoPipeline  # noqa: E402

logger = logging.getLogger("bench_video_15")
PROMPT = "a lighthouse at dusk, waves rolling in, the beam sweeping over the sea"
NOTE = "random weights: time and agreement only, no quality"
# name -> (frames, DiT linears, attention mask, step skipping)
RUNS: dict[str, tuple[int, str, str | None, float | None]] = {
    "exact_81": (81, "none", None, None),
    "fast_81": (81, "fp8", "window:2", 0.2),
    "fast_81_frame": (81, "fp8", "window:2:frame", 0.2),
    "window_161": (161, "none", "window:2", None),
    "window_161_frame": (161, "none", "window:2:frame", None),
}


def build_pipeline(smoke: bool, quantize: str, compile_blocks: bool) -> CogVideoPipeline:
    """The 1.5 T2V pipeline on random weights: full size on the GPU, or the tests' tiny model on the CPU."""
    from tiny_text import make_tiny_tokenizer

    from diffsynth_cog.loading.text_encoder_loader import load_tokenizer

    tokenizer = load_tokenizer(make_tiny_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer"))
    if smoke:
        from tiny_models import save_tiny_model_folder

        from diffsynth_cog import ModelManager

        folder = save_tiny_model_folder(Path(tempfile.mkdtemp()), "cogvideox1.5-5b", seed=0)
        manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
        pipe = CogVideoPipeline.from_model_manager(manager)
    else:
        from bench_generate import t5_xxl_encoder

        dtype = torch.bfloat16
        torch.manual_seed(0)
        with torch.device("cuda"):
            dit = CogDiT(dit_preset("cogvideox1.5-5b")).to(dtype).eval().requires_grad_(False)
            vae = CogVAE(vae_preset("cogvideox1.5-5b")).to(dtype).eval().requires_grad_(False)
        text_encoder = CogTextEncoder(t5_xxl_encoder("cuda", dtype), tokenizer)
        pipe = CogVideoPipeline(dit, text_encoder, vae.encoder, vae.decoder, device="cuda", torch_dtype=dtype)
    if quantize != "none":
        from diffsynth_cog.quantization.swap import quantize_dit

        quantize_dit(pipe.dit, quantize)
    if compile_blocks:
        pipe.dit.compile_blocks()
    return pipe


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def warm_up(pipe: CogVideoPipeline, frames: int, size: tuple[int, int], mask: str | None) -> float:
    """Seconds of one untimed denoising step at the run's shape and mask: the compiler's work, done before the clock."""
    emb = pipe.encode_prompt(PROMPT)
    sync()
    start = time.perf_counter()
    pipe(
        prompt_emb=emb, negative_prompt_emb=emb, height=size[0], width=size[1], num_frames=frames,
        num_inference_steps=1, cfg_scale=6.0, seed=0, output_type="latent",
        attention=parse_attention(mask) if mask else None, progress_bar=False,
    )  # fmt: skip
    sync()
    return time.perf_counter() - start


def whole_video(pipe: CogVideoPipeline, frames: int, size: tuple[int, int], steps: int, mask: str | None,
                threshold: float | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:  # fmt: skip
    """One video from the prompt: its final latents, its frames (float, [F, H, W, C]) and its timings."""
    computed: list[int] = []
    # TeaCache on the released 1.5 transformer (its published calibration); first-block on the smoke model
    step_cache = make_step_skipper(threshold, "auto", pipe.dit) if threshold else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    emb, neg = pipe.encode_prompt(PROMPT), pipe.encode_prompt("")
    sync()
    text_s = time.perf_counter() - start

    def progress(i: int) -> None:  # a line every 10 steps: a run cut off by a time limit still shows its rate
        computed.append(i)
        if (i + 1) % 10 == 0:
            logger.info("  step %d/%d at %.1f s", i + 1, steps, time.perf_counter() - start)

    latents = pipe(
        prompt_emb=emb, negative_prompt_emb=neg, height=size[0], width=size[1], num_frames=frames,
        num_inference_steps=steps, cfg_scale=6.0, use_dynamic_cfg=True, seed=0, output_type="latent",
        attention=parse_attention(mask) if mask else None, step_cache=step_cache, progress_bar=False,
        callback=lambda i, t, x: progress(i),
    )  # fmt: skip
    sync()
    denoise_s = time.perf_counter() - start - text_s
    video = pipe.decode_latents(latents, tiled=True, progress=False)
    sync()
    total = time.perf_counter() - start
    settings = pipe.last_settings or {}
    timing = {
        "total_s": round(total, 2),
        "text_encode_s": round(text_s, 2),
        "denoise_s": round(denoise_s, 2),
        "decode_s": round(total - text_s - denoise_s, 2),
        "steps": steps,
        "step_cache": settings.get("step_cache"),
        "steps_computed": step_cache.stats()["computed"] if step_cache is not None else steps,
        "mask": (settings.get("mask") or {}).get("spec"),
    }
    if step_cache is not None:
        timing["step_cache_signal"] = signal_summary(step_cache.stats())
    if torch.cuda.is_available():
        timing["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return latents, video.float().cpu(), timing


def signal_summary(stats: dict[str, Any]) -> dict[str, float]:
    """The median raw change and rescaled estimate a step-skipper saw per step: why it skipped what it skipped.

    On random weights TeaCache's 1.5 signal (the timestep embedding's relative L1 change) is large (a random time MLP
    decorrelates neighbouring steps: ~0.85 a step, where the polynomial reaches 0.2 at 0.11), so it may skip nothing."""
    summary: dict[str, float] = {}
    for key in ("changes", "estimates"):
        values = [v for v in stats.get(key, []) if v is not None]
        if values:
            summary[f"median_{key.removesuffix('s')}"] = round(statistics.median(values), 5)
    return summary


def saved_latents(paths: list[str]) -> dict[str, torch.Tensor]:
    """The runs' latents saved by ``--save-latents`` in another process, by run name; checked before any model."""
    found: dict[str, torch.Tensor] = {}
    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"--compare: {path} is not a file (give the latents_<run>.safetensors of --save-latents)")
        tensors = load_state_dict(path)  # the package's checked reader: a truncated file is named
        if set(tensors) != {"latents"}:
            raise SystemExit(f"--compare: {path} holds {sorted(tensors)}, expected one tensor 'latents'")
        found[Path(path).stem.removeprefix("latents_")] = tensors["latents"]
    return found


def compare_saved(pipe: CogVideoPipeline, compared: dict[str, torch.Tensor], exact: torch.Tensor) -> dict[str, Any]:
    """Each saved run's video (decoded here) against this process's exact video."""
    errors: dict[str, Any] = {}
    for name, latents in compared.items():
        video = pipe.decode_latents(latents, tiled=True, progress=False).float().cpu()  # moved and cast there
        if video.shape != exact.shape:
            errors[name] = {"error": f"video {tuple(video.shape)} is not the exact one's {tuple(exact.shape)}"}
        else:
            errors[name] = {"rel_err_vs_exact": rel_err(video, exact)}
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=list(RUNS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="eager blocks (the default compiles them)")
    parser.add_argument(
        "--warmup", action="store_true", help="one untimed step at each run's shape first (compile outside the clock)"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny 1.5 model, tiny sizes, 2 steps")
    parser.add_argument("--json", default="bench_video_15.json")
    parser.add_argument("--save-latents", action="store_true", help="write each run's final latents beside the JSON")
    parser.add_argument(
        "--compare", nargs="+", default=[], metavar="FILE",
        help="latents saved by --save-latents in another process: decoded and held against exact_81",
    )  # fmt: skip
    args = parser.parse_args()
    if args.compare and "exact_81" not in args.runs:
        parser.error("--compare needs exact_81 in --runs (the video the saved latents are held against)")
    compared = saved_latents(args.compare)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    size, steps = ((768, 1360), args.steps) if not args.smoke else ((32, 48), 2)
    result: dict[str, Any] = {"note": NOTE, "size": size, "runs": {}}
    if torch.cuda.is_available() and not args.smoke:
        result |= {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    exact: torch.Tensor | None = None
    pipe, built = None, None  # one pipeline at a time: fp8 linears are built anew (never two copies of the DiT)
    for name in args.runs:
        frames, quantize, mask, threshold = RUNS[name]
        if args.smoke:  # 81 -> 17, 161 -> 25 frames; fp8 needs a GPU: int8 stands in
            frames, quantize = (frames - 1) // 64 * 8 + 9, "int8" if quantize == "fp8" else quantize
        if quantize != built:
            pipe = None  # the previous pipeline's memory goes first
            pipe = build_pipeline(args.smoke, quantize, compile_blocks=not args.no_compile and not args.smoke)
            built = quantize
        warmup_s = warm_up(pipe, frames, size, mask) if args.warmup else None
        latents, video, timing = whole_video(pipe, frames, size, steps, mask, threshold)
        if args.save_latents:
            path = Path(args.json).with_name(f"latents_{name}.safetensors")
            # in the dtype the decode casts to (bf16: 11 MB at 81 f, under the device's 16 MiB a file; fp32 is 23 MB)
            latents = latents.detach().to(pipe.torch_dtype).cpu()
            save_safetensors_atomic(out_dir() / path, {"latents": latents})
        timing["frames"] = frames
        if warmup_s is not None:  # the first video of a process pays this once more (the compiler's work)
            timing["untimed_warmup_step_s"] = round(warmup_s, 3)
        if name == "exact_81":
            exact = video
        elif exact is not None and video.shape == exact.shape:
            timing["rel_err_vs_exact"] = rel_err(video, exact)
        result["runs"][name] = timing
        logger.info("%s: %s", name, timing)
        if name == "exact_81" and compared:
            result["compared"] = compare_saved(pipe, compared, exact)
            logger.info("compared: %s", result["compared"])
        write_json(args.json, result)


if __name__ == "__main__":
    main()
