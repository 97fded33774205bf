"""Multi-GPU generation at full CogVideoX-5B size (random weights), per layout and length.

Launch with torchrun on any number of GPUs; every layout that fits the world size runs, the 1-GPU
baseline ("single") included, in the same invocation:

    torchrun --nproc_per_node 2 benchmarks/bench_parallel.py --frames 49 129 --layouts single cfg2 ulysses2 ring2
    torchrun --nproc_per_node 2 benchmarks/bench_parallel.py --frames 129 49 --layouts single cfg2 ulysses2 \
        --steps 3 --full-steps 50 --full-layouts cfg2 --full-frames 129

Layouts: ``single`` (every rank generates alone: the 1-GPU baseline, run on all GPUs at once), or
``x``-joined degrees of one generation: ``cfg2``, ``ulysses2``, ``ring2``, ``cfg2xulysses2``,
``ulysses4``, ``cfg2xring2``, ``ulysses2xring2``, ``cfg2xulysses4``, ``ulysses8`` ... A layout of
fewer ranks than the world runs as several groups at once (each group its own copy of the video).

Long videos over window groups (``windowsN``: N groups each running a share of every step's temporal windows,
CFG / Ulysses inside a group; needs ``--window-frames``). ``--layouts windows`` runs the planned layouts of the
world size (:data:`WINDOW_LAYOUTS`), e.g. 513 frames in 129-frame windows overlapping by a quarter (5 windows a
step), 1 vs 2 GPUs, with one whole 50-step video on the window groups::

    torchrun --nproc_per_node 2 benchmarks/bench_parallel.py --frames 513 --window-frames 129 \
        --window-overlap 0.25 --layouts windows --steps 3 --full-steps 50 --full-layouts windows2

Per (frames, layout), after one warm-up generation of ``--warmup-steps`` steps (compile; its time is
reported apart): ``--steps`` timed denoising steps (CFG 7, DDIM, 480x720, seed 0; median per step),
the text encode (T5-XXL, random weights; each text encoded once across the group), the tiled VAE
decode (spread over the group; median of ``--decode-repeat`` after one warm-up decode, whose tile times
plan the spread), the peak memory of every GPU,
the relative difference of the final latents from the single-GPU ones (same steps and noise), and
an estimate of a ``--estimate-steps``-step video (text + steps x median step + decode). With
``--full-steps N`` one whole N-step generation (text, steps, decode to frames) is also timed end to end.
Rank 0 prints a table and writes ``$OUT/<--json>`` after every layout.

Weights are random (built on each GPU from one seed, then broadcast from rank 0 so every rank holds
the same); the tokenizer is a small test tokenizer unless ``--tokenizer`` is given (tokenizing costs
nothing next to T5; prompts are padded to 226 tokens either way).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import logging
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))
from bench_generate import PROMPT, t5_xxl_encoder  # noqa: E402
from common import environment, out_dir, peak_gib, rel_err, reset_peak, write_json  # noqa: E402

from diffsynth_cog.configs import dit_preset, vae_preset  # noqa: E402
from diffsynth_cog.denoise.windows import WindowSpec  # noqa: E402
from diffsynth_cog.loading.text_encoder_loader import load_tokenizer  # noqa: E402
from diffsynth_cog.models import attention as attn  # noqa: E402
from diffsynth_cog.models.dit import CogDiT  # noqa: E402
from diffsynth_cog.models.text_encoder import CogTextEncoder  # noqa: E402
from diffsynth_cog.models.vae import CogVAE  # noqa: E402
from diffsynth_cog.parallel.launch import init_distributed  # noqa: E402
from diffsynth_cog.parallel.windows import windows_per_step  # noqa: E402
from diffsynth_cog.pipeline.cog_video import CogVideoPipeline  # noqa: E402

logger = logging.getLogger("bench_parallel")
DEGREE = re.compile(r"^(windows|cfg|ulysses|ring)(\d+)$")

# The planned long-video layouts by world size (``--layouts windows``): window groups x CFG x Ulysses, against the
# 1-GPU baseline and the best layout without window groups. 513 frames in 129-frame windows (overlap 0.25) make 5
# windows a step: 2 groups run 3 + 2, 4 groups 2 + 1 + 1 + 1 (hence also 2 groups of 2 or 4 GPUs each).
WINDOW_LAYOUTS: dict[int, list[str]] = {
    1: ["single"],
    2: ["single", "windows2", "cfg2"],
    4: ["single", "windows4", "windows2xcfg2", "windows2xulysses2", "cfg2xulysses2"],
    8: ["single", "windows4xcfg2", "windows2xcfg2xulysses2", "windows2xulysses4", "cfg2xulysses4"],
}


def parse_layout(name: str) -> dict[str, int | str | bool | None] | None:
    """ "cfg2xulysses2" -> {"cfg": 2, "ulysses": 2, "ring": 1, ...}; "single" -> None. Suffixes: ``@hcN`` sets
    Ulysses' pipelined head groups (``enable_parallel(ulysses_head_chunks=N)``), ``@nccl`` / ``@p2p`` the Ulysses
    transport (``ulysses_transport``), ``@serial`` turns off the p2p exchange's row pipelining (a comparison)."""
    if name == "single":
        return None
    degrees: dict[str, int | str | bool | None] = {"windows": 1, "cfg": 1, "ulysses": 1, "ring": 1}
    degrees["head_chunks"] = None
    degrees |= {"transport": "auto", "pipeline_rows": True}
    name, *suffixes = name.split("@")
    for suffix in suffixes:
        if suffix in ("nccl", "p2p"):
            degrees["transport"] = suffix
        elif suffix == "serial":
            degrees["pipeline_rows"] = False
        elif suffix.startswith("hc") and suffix[2:].isdigit() and int(suffix[2:]) >= 1:
            degrees["head_chunks"] = int(suffix[2:])
        else:
            raise SystemExit(f"bad layout suffix @{suffix}: use @hcN (N >= 1 head groups), @nccl, @p2p or @serial")
    for part in name.split("x"):
        match = DEGREE.match(part)
        if match is None or (match[1] == "cfg" and match[2] not in ("1", "2")):
            raise SystemExit(f"bad layout {name!r}: use single, or x-joined windowsN / cfg2 / ulyssesN / ringN")
        degrees[match[1]] = int(match[2])
    return degrees


def made_by_rank_0(make) -> Path:  # noqa: ANN001
    """``make(folder)`` on rank 0 only (transformers saves on rank 0 alone under torchrun); the folder for all."""
    folder = [tempfile.mkdtemp() if not dist.is_initialized() or dist.get_rank() == 0 else None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        make(folder[0])
    if dist.is_initialized():
        dist.broadcast_object_list(folder, src=0)
    return Path(folder[0])


def build_pipeline(args: argparse.Namespace, device: str) -> CogVideoPipeline:
    if args.smoke:  # tiny fp32 models on the CPU: checks this script, measures nothing
        from parallel_cases import tiny_pipeline
        from tiny_text import make_tiny_text_folder

        return tiny_pipeline("5b", text_folder=str(made_by_rank_0(make_tiny_text_folder)))
    dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        dit = CogDiT(dit_preset(args.preset)).to(dtype).eval().requires_grad_(False)
        vae = CogVAE(vae_preset(args.preset)).to(dtype).eval().requires_grad_(False)
    t5 = t5_xxl_encoder(device, dtype)
    if dist.is_initialized():  # one set of weights on every rank
        for module in (dit, vae, t5):
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)
    if args.tokenizer:
        tokenizer = load_tokenizer(Path(args.tokenizer))
    else:
        from tiny_text import make_tiny_tokenizer

        tokenizer = load_tokenizer(made_by_rank_0(make_tiny_tokenizer))
    if args.compile:
        dit.compile_blocks()
    return CogVideoPipeline(
        dit, CogTextEncoder(t5, tokenizer), vae.encoder, vae.decoder, device=device, torch_dtype=dtype
    )


def synced() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(value: object) -> list[object]:
    if not dist.is_initialized():
        return [value]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def time_text(pipe: CogVideoPipeline) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds to encode the prompt and the negative one (each once across a generation), and the embeddings."""
    start = synced()
    if pipe.parallel is not None:
        emb, neg = pipe.parallel.encode_text(
            pipe.encode_prompt, pipe.torch_dtype, PROMPT, "", guided=True, prompt_emb=None, negative_prompt_emb=None
        )
    else:
        emb, neg = pipe.encode_prompt(PROMPT), pipe.encode_prompt("")
    return synced() - start, {"prompt_emb": emb, "negative_prompt_emb": neg}


def run_layout(pipe: CogVideoPipeline, frames: int, name: str, args: argparse.Namespace, state: dict) -> dict:
    """One (frames, layout) measurement; ``state`` carries the single-GPU latents and the parallel contexts."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    degrees = parse_layout(name)
    size = 1 if degrees is None else degrees["windows"] * degrees["cfg"] * degrees["ulysses"] * degrees["ring"]
    if size > world or world % size:
        return {"skipped": f"needs a divisor of the world size {world}; has {size} ranks"}
    if degrees is not None and degrees["windows"] > 1 and not args.window_frames:
        return {"skipped": "window groups need windows: give --window-frames"}
    if degrees is None:
        pipe.disable_parallel()
    else:
        key = (name, size)
        if key not in state["contexts"]:
            pipe.enable_parallel(
                window_degree=degrees["windows"],
                cfg_parallel=degrees["cfg"] == 2,
                ulysses_degree=degrees["ulysses"],
                ring_degree=degrees["ring"],
                group_size=size,
                ulysses_head_chunks=degrees["head_chunks"],
                ulysses_transport=degrees["transport"],
            )
            if pipe.parallel.split.peer is not None:
                pipe.parallel.split.peer.pipeline_rows = degrees["pipeline_rows"]
            state["contexts"][key] = pipe.parallel
        pipe.parallel = state["contexts"][key]
    call = dict(prompt=PROMPT, negative_prompt="", num_frames=frames, cfg_scale=7.0, seed=0, progress_bar=False)
    call |= dict(height=args.height, width=args.width, tiled=True)
    if args.window_frames:
        call["windows"] = WindowSpec(args.window_frames, args.window_overlap)
    barrier()
    gc.collect()
    if torch.cuda.is_available():
        reset_peak()
    start = synced()
    pipe(**call, num_inference_steps=args.warmup_steps, output_type="latent")
    warmup = synced() - start
    barrier()
    text, embeddings = time_text(pipe)
    barrier()
    times: list[float] = []
    last = [synced()]

    def tick(i: int, t: int, x: torch.Tensor) -> None:  # the step's true duration (synchronised)
        now = synced()
        times.append(now - last[0])
        last[0] = now

    timed_call = {**call, "prompt": "", "negative_prompt": "", **embeddings}  # the steps alone, text apart
    latents = pipe(**timed_call, num_inference_steps=args.steps, output_type="latent", callback=tick)
    step = statistics.median(times)
    barrier()
    final = pipe.parallel is None or pipe.parallel.is_leader
    if latents is None:  # the others need the latents to share the decode: the leader's are the same
        c = pipe.dit.config
        latents = torch.zeros(1, c.out_channels, (frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    latents = latents.to(pipe.device).contiguous()  # a transposed view out of the loop; NCCL wants contiguous
    if pipe.parallel is not None and pipe.parallel.mesh.generation is not None:
        dist.broadcast(latents, src=pipe.parallel.mesh.leader, group=pipe.parallel.mesh.generation)
    pipe.decode_latents(latents, tiled=True, progress=False)  # warm-up (and the tile times a parallel plan uses)
    decodes = []
    for _ in range(args.decode_repeat):
        barrier()
        start = synced()
        pipe.decode_latents(latents, tiled=True, progress=False)
        decodes.append(synced() - start)
    decode = statistics.median(decodes)
    if args.profile and name in args.profile and frames == max(args.frames):
        step_once = lambda: pipe(**timed_call, num_inference_steps=1, output_type="latent")  # noqa: E731
        profile(f"{frames}f_{name}", step_once, args.trace)
        profile(f"{frames}f_{name}_decode", lambda: pipe.decode_latents(latents, tiled=True, progress=False))
    entry = {
        "ranks_per_video": size,
        "ulysses_transport": None if pipe.parallel is None else pipe.parallel.ulysses_transport,
        "warmup_s": round(warmup, 2),
        "step_s": [round(t, 4) for t in times],
        "median_step_s": round(step, 4),
        "text_encode_s": round(text, 3),
        "vae_decode_tiled_s": round(decode, 3),
        "vae_decodes_s": [round(t, 3) for t in decodes],
        f"estimate_{args.estimate_steps}_steps_s": round(text + args.estimate_steps * step + decode, 1),
    }
    if pipe.parallel is not None:  # what each tile shape took, by the rank that ran it (plans the spread)
        times = pipe.parallel.tile_times.seconds
        entry["vae_tile_s"] = {"x".join(map(str, k[-3:])): round(v, 3) for k, v in times.items()}
    if name == "single":
        state["single"][frames] = latents.float().cpu() if final else None
    elif final and state["single"].get(frames) is not None:
        entry["rel_diff_vs_single"] = rel_err(latents.float().cpu(), state["single"][frames])
    if args.full_steps and name in (args.full_layouts or [name]) and frames in (args.full_frames or [frames]):
        barrier()
        start = synced()
        pipe(**call, num_inference_steps=args.full_steps, output_type="np")
        entry[f"full_{args.full_steps}_steps_s"] = round(synced() - start, 1)
    entry["peak_GiB_per_gpu"] = [round(v, 2) for v in gather(peak_gib() if torch.cuda.is_available() else 0.0)]
    return entry


def profile(label: str, fn, trace: bool = False) -> None:  # noqa: ANN001
    """One call of ``fn`` under torch.profiler; every rank writes its table of kernels (by GPU time) and CPU
    ops to $OUT/profile_<label>_rank<R>.txt, and with ``trace`` its timeline (Chrome trace, gzipped) to
    $OUT/trace_<label>_rank<R>.json.gz."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    barrier()
    start = synced()
    with torch_profile(activities=activities) as prof:
        fn()
        synced()
    took = synced() - start
    rank = dist.get_rank() if dist.is_initialized() else 0
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    text = f"{label}: {took:.3f} s under the profiler\n" + prof.key_averages().table(sort_by=sort, row_limit=40)
    out = out_dir() / f"profile_{label}_rank{rank}.txt"
    out.write_text(text)
    logger.info("profile written: %s", out)
    if trace:
        raw = out.with_name(f"trace_{label}_rank{rank}.json")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()


def scaling(results: dict, frames: int, name: str, args: argparse.Namespace) -> None:
    base, entry = results.get(f"{frames}f/single", {}), results[f"{frames}f/{name}"]
    if "median_step_s" not in base or "median_step_s" not in entry or name == "single":
        return
    entry["step_speedup"] = round(base["median_step_s"] / entry["median_step_s"], 3)
    entry["decode_speedup"] = round(base["vae_decode_tiled_s"] / entry["vae_decode_tiled_s"], 3)
    key = f"estimate_{args.estimate_steps}_steps_s"
    entry["estimate_speedup"] = round(base[key] / entry[key], 3)


def table(results: dict, args: argparse.Namespace) -> str:
    rows = [
        "frames | layout | GPUs/video | step s | x | decode s | x | text s | est. video s | x | rel diff | peak GiB"
    ]
    for key, e in results.items():
        if "median_step_s" not in e:
            rows.append(f"{key} | {e}")
            continue
        frames, name = key.split("/")
        rows.append(
            f"{frames} | {name} | {e['ranks_per_video']} | {e['median_step_s']:.3f} | {e.get('step_speedup', 1.0):.2f} | "
            f"{e['vae_decode_tiled_s']:.2f} | {e.get('decode_speedup', 1.0):.2f} | {e['text_encode_s']:.2f} | "
            f"{e[f'estimate_{args.estimate_steps}_steps_s']:.1f} | {e.get('estimate_speedup', 1.0):.2f} | "
            f"{e.get('rel_diff_vs_single', 0.0):.1e} | {max(e['peak_GiB_per_gpu']):.1f}"
            + "".join(f" | {k}: {v} s" for k, v in e.items() if k.startswith("full_"))
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cogvideox-5b")
    parser.add_argument("--frames", type=int, nargs="+", default=[49, 129])
    parser.add_argument("--layouts", nargs="+", default=["single", "cfg2", "ulysses2", "ring2", "cfg2xulysses2"])
    parser.add_argument(
        "--steps", type=int, default=3, help="timed denoising steps per layout (the median is reported)"
    )
    parser.add_argument("--decode-repeat", type=int, default=2, help="timed decodes after a warm-up (median)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the warm-up generation (compile)")
    parser.add_argument("--estimate-steps", type=int, default=50, help="steps of the estimated whole video")
    parser.add_argument("--full-steps", type=int, default=0, help="also time one whole generation of N steps")
    parser.add_argument("--full-layouts", nargs="*", default=None, help="only these layouts get --full-steps")
    parser.add_argument("--full-frames", type=int, nargs="*", default=None, help="only these lengths get --full-steps")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager blocks")
    parser.add_argument("--attention", default="auto", choices=attn.BACKENDS)
    parser.add_argument("--tokenizer", default=None, help="a T5 tokenizer folder (default: a small test tokenizer)")
    parser.add_argument("--timeout", type=float, default=3600, help="collective timeout, s (compiles are slow)")
    parser.add_argument("--json", default="bench_parallel.json")
    parser.add_argument("--profile", nargs="*", default=None, help="layouts to profile (one step, one decode)")
    parser.add_argument("--trace", action="store_true", help="with --profile: also write each rank's step timeline")
    parser.add_argument("--window-frames", type=int, default=None, help="denoise in windows of F (4k+1) frames")
    parser.add_argument("--window-overlap", type=float, default=0.25, help="fraction of a window shared")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (gloo): checks the script only")
    args = parser.parse_args()
    if args.smoke:
        args.compile, args.height, args.width = False, 32, 48
    for name in args.layouts:
        if name != "windows":
            parse_layout(name)
    launch = init_distributed("cpu" if args.smoke else "cuda", timedelta(seconds=args.timeout))
    if "windows" in args.layouts:  # the planned long-video layouts of this world size
        planned = WINDOW_LAYOUTS.get(launch.world, ["single", f"windows{launch.world}"])
        args.layouts = list(
            dict.fromkeys(n for name in args.layouts for n in (planned if name == "windows" else [name]))
        )
    logging.basicConfig(level=logging.INFO if launch.is_main else logging.WARNING, format="%(message)s")
    attn.set_attention_backend(args.attention)
    dynamo = torch._dynamo.config
    for name, value in (("cache_size_limit", 64), ("recompile_limit", 64), ("accumulated_cache_size_limit", 512)):
        if hasattr(dynamo, name):  # one process compiles every layout's shapes
            setattr(dynamo, name, value)
    start = time.perf_counter()
    pipe = build_pipeline(args, launch.device)
    env = environment() if torch.cuda.is_available() else {"gpu": "none (smoke test)", "torch": torch.__version__}
    result = {**env, "world": launch.world, "preset": args.preset, "compile": args.compile}
    result |= {"attention": attn.resolve_backend(torch.device(launch.device)), "steps": args.steps}
    result |= {"build_s": round(time.perf_counter() - start, 1), "runs": {}}
    if args.window_frames:
        counts = {f: windows_per_step(pipe.dit.config, f, args.window_frames, args.window_overlap) for f in args.frames}
        result["windows"] = {"frames": args.window_frames, "overlap": args.window_overlap, "per_step": counts}
    logger.info("%s", result)
    state = {"contexts": {}, "single": {}}
    ordered = ["single"] + [n for n in args.layouts if n != "single"] if "single" in args.layouts else args.layouts
    for frames in args.frames:
        for name in ordered:
            key = f"{frames}f/{name}"
            try:
                result["runs"][key] = run_layout(pipe, frames, name, args, state)
                scaling(result["runs"], frames, name, args)
            except Exception as e:  # a failure is a result to report, not a reason to lose the others
                logger.exception("%s failed", key)
                result["runs"][key] = {"error": repr(e)[:500]}
                if dist.is_initialized():
                    raise  # the ranks may disagree on where they stand: stop them all
            logger.info("%s: %s", key, result["runs"][key])
            if launch.is_main:
                write_json(args.json, result)
    if launch.is_main:
        print(table(result["runs"], args))
        write_json(args.json, result)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
