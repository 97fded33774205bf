"""CogVideoX 1.5 DiT step: ours beside diffusers' on the same random full-size bf16 weights (1.5 T2V config).

Sections (one JSON, ``bench_15.json`` under $OUT):
  * ``81f_dense[_compiled]``: 81 frames 1360x768 (22 latent frames after padding, 44,880 video tokens), CFG batch 2,
    diffusers' ``CogVideoXTransformer3DModel`` (RoPE sliced from its max grid, as its 1.5 pipeline builds it) and
    ours through the denoiser, eager and with per-block ``torch.compile`` (``--compile``); speedup and output
    difference;
  * ``161f_dense``, ``161f_window:2`` and ``161f_window:2:frame``: ours at 161 frames (42 latent frames, 85,680
    tokens), dense, with the ``window:2`` block-sparse mask (+-2 temporal patches, FlexAttention) and with the same
    window token-exact, frame by frame with the dense kernel (``:frame``); the ratio of each window step to the
    81-frame dense step (issue 23's goal: <= 1.5x), eager and (``--compile``) compiled.

Random weights cannot show quality: these figures are speed and agreement only.

    python benchmarks/bench_15.py [--compile] [--attention auto] [--repeat 3]
    python benchmarks/bench_15.py --compile --compiled-only --windows window:2:frame [--no-reference]  # the goal alone
    python benchmarks/bench_15.py --smoke      # CPU, tiny model, every section (what tests/test_bench_15.py runs)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import rel_err, write_json  # noqa: E402

from diffsynth_cog.configs import DiTConfig, dit_preset  # noqa: E402
from diffsynth_cog.denoise.denoiser import Denoiser  # noqa: E402
from diffsynth_cog.denoise.masks import parse_attention  # noqa: E402
from diffsynth_cog.loading.convert import convert_state_dict  # noqa: E402
from diffsynth_cog.loading.dit_loader import dit_rename  # noqa: E402
from diffsynth_cog.models import attention as attn  # noqa: E402
from diffsynth_cog.models.dit import CogDiT  # noqa: E402
from diffsynth_cog.pipeline.sampling import latent_plan  # noqa: E402

logger = logging.getLogger("bench_15")
NOTE = "random weights: speed and agreement only, no quality"
# --smoke: a tiny 1.5-structured DiT (temporal patches of 2, sliced RoPE) at tiny sizes on the CPU.
SMOKE_DIT = DiTConfig(
    num_attention_heads=2,
    attention_head_dim=16,
    time_embed_dim=16,
    text_embed_dim=32,
    num_layers=2,
    patch_size_t=2,
    patch_bias=False,
    sample_frames=9,
    sample_height=12,
    sample_width=14,
    max_text_seq_length=7,
)


def timed(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    """Median / min seconds of ``fn`` after one warm-up run (CUDA events on a GPU, wall clock on the CPU)."""
    cuda = torch.cuda.is_available()
    fn()
    times = []
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    out = {"median_s": statistics.median(times), "min_s": min(times), "runs": repeat}
    if cuda:
        out["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    return out


def build_pair(config: DiTConfig, dtype: torch.dtype, device: str):
    """diffusers' transformer and ours on one set of random weights (ours takes the reference's tensors)."""
    from diffusers import CogVideoXTransformer3DModel

    with torch.device(device):
        ref = CogVideoXTransformer3DModel(**{k: v for k, v in config.to_dict().items() if k != "rope_theta"})
    ref = ref.to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = CogDiT(config)
    ours.load_state_dict(convert_state_dict(ref.state_dict(), ours, dit_rename, source="random"), assign=True)
    return ref, ours.eval().requires_grad_(False)


def reference_rope(ref, t: int, h: int, w: int, device: str):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    c = ref.config
    p, pt = c.patch_size, c.patch_size_t
    max_size = (c.sample_height // p, c.sample_width // p)
    grid = (h // p, w // p)
    return get_3d_rotary_pos_embed(
        c.attention_head_dim, None, grid, t // pt, grid_type="slice", max_size=max_size, device=device
    )


def inputs(config: DiTConfig, frames: int, height: int, width: int, batch: int, dtype, device: str):
    """Latents at the padded length the pipeline runs, prompt embeddings, timesteps (a CFG batch of one step)."""
    shape = latent_plan(config, frames, height, width).shape
    g = torch.Generator(device).manual_seed(frames)
    latents = torch.randn(batch, config.in_channels, *shape[2:], device=device, dtype=dtype, generator=g)
    n_text = config.max_text_seq_length
    prompt = torch.randn(batch, n_text, config.text_embed_dim, device=device, dtype=dtype, generator=g)
    return latents, prompt, torch.full((batch,), 500, device=device)


def dense_vs_reference(ref, ours, frames: int, size: tuple[int, int], args, device: str, dtype) -> dict:
    c = ours.config
    latents, prompt, timestep = inputs(c, frames, *size, args.batch, dtype, device)
    rope = reference_rope(ref, *latents.shape[2:], device)
    denoiser = Denoiser(ours)

    def run_ref():
        out = ref(latents.transpose(1, 2), prompt, timestep, image_rotary_emb=rope, return_dict=False)[0]
        return out.transpose(1, 2)

    def run_ours():
        return denoiser(latents, 500, prompt)

    t, h, w = latents.shape[2:]
    tokens = t // c.temporal_patch * (h // c.patch_size) * (w // c.patch_size)
    entry: dict[str, Any] = {"latent_frames": t, "video_tokens": tokens}
    with torch.no_grad():
        entry["rel_diff_vs_reference"] = rel_err(run_ours(), run_ref())
        entry["reference"] = timed(run_ref, args.repeat)
        entry["ours"] = timed(run_ours, args.repeat)
    entry["speedup"] = entry["reference"]["median_s"] / entry["ours"]["median_s"]
    return entry


def ours_only(ours, frames: int, size: tuple[int, int], attention: str | None, args, device: str, dtype) -> dict:
    latents, prompt, _ = inputs(ours.config, frames, *size, args.batch, dtype, device)
    denoiser = Denoiser(ours, attention=parse_attention(attention) if attention else None)
    with torch.no_grad():
        entry = {"latent_frames": latents.shape[2], "ours": timed(lambda: denoiser(latents, 500, prompt), args.repeat)}
    entry["attention"] = attention or "dense"
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="2 = one CFG step (cond + uncond)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time both with per-block torch.compile")
    parser.add_argument("--attention", default="auto", choices=attn.BACKENDS, help="our attention backend")
    parser.add_argument("--windows", nargs="+", help="the 161-frame window specs (default: window:2 and its :frame)")
    parser.add_argument(
        "--compiled-only", action="store_true", help="with --compile: skip the eager sections (and the 161 f dense)"
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="with --compiled-only: time ours alone (no diffusers pass)"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny 1.5-structured model, tiny sizes")
    parser.add_argument("--json", default="bench_15.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.smoke:
        device, dtype, config = "cpu", torch.float32, SMOKE_DIT
        short, long, size, masks = 9, 17, (32, 48), ("window:1:token", "window:1:frame")
    else:
        device, dtype, config = "cuda", torch.bfloat16, dit_preset("cogvideox1.5-5b")
        short, long, size, masks = 81, 161, (768, 1360), ("window:2", "window:2:frame")
        attn.set_attention_backend(args.attention)
    if args.windows:
        for spec in args.windows:
            parse_attention(spec)  # a bad spec fails here, before the 5B model is built
        masks = tuple(args.windows)
    if args.compiled_only and not args.compile:
        parser.error("--compiled-only needs --compile")
    if args.no_reference and not args.compiled_only:
        parser.error("--no-reference needs --compiled-only (the eager sections time diffusers beside ours)")
    torch.manual_seed(0)
    ref, ours = build_pair(config, dtype, device)
    result: dict[str, Any] = {"note": NOTE, "device": device, "batch": args.batch, "size": size, "runs": {}}
    if device == "cuda":
        result |= {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    runs = result["runs"]
    if not args.compiled_only:
        runs[f"{short}f_dense"] = dense_vs_reference(ref, ours, short, size, args, device, dtype)
        write_json(args.json, result)
        runs[f"{long}f_dense"] = ours_only(ours, long, size, None, args, device, dtype)
        for spec in masks:
            runs[f"{long}f_{spec}"] = ours_only(ours, long, size, spec, args, device, dtype)
            step = runs[f"{long}f_{spec}"]["ours"]["median_s"]
            result[f"{spec}_vs_short_dense"] = step / runs[f"{short}f_dense"]["ours"]["median_s"]
            write_json(args.json, result)
    if args.compile:
        for block in ref.transformer_blocks if not args.no_reference else ():
            block.compile(fullgraph=True)
        ours.compile_blocks()
        if args.no_reference:  # ours alone: the window's ratio to our own dense step
            dense_run = lambda: ours_only(ours, short, size, None, args, device, dtype)  # noqa: E731
        else:
            dense_run = lambda: dense_vs_reference(ref, ours, short, size, args, device, dtype)  # noqa: E731
        compiled = [(f"{short}f_dense_compiled", dense_run)]
        for spec in masks:
            run = lambda spec=spec: ours_only(ours, long, size, spec, args, device, dtype)  # noqa: E731
            compiled.append((f"{long}f_{spec}_compiled", run))
        for name, run in compiled:
            try:
                runs[name] = run()
            except Exception as e:  # a compiler failure is a result to report
                logger.exception("compiled pass %s failed", name)
                runs[name] = {"error": repr(e)[:500]}
            write_json(args.json, result)
        dense = runs[f"{short}f_dense_compiled"].get("ours", {}).get("median_s")
        for spec in masks:
            window = runs[f"{long}f_{spec}_compiled"].get("ours", {}).get("median_s")
            if dense and window:
                result[f"{spec}_vs_short_dense_compiled"] = window / dense
    write_json(args.json, result)
    logger.info("%s", result)


if __name__ == "__main__":
    main()
