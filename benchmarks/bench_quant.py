"""Quantized DiT forward (fp8 matmuls, int8 weights) against exact bf16, full-size CogVideoX-5B.

One process, one GPU, CFG batch 2, random weights shared with the diffusers reference:

1. layer check: one block's Linear shapes at the 49-frame token count; our CUDA fp8 path against
   its own fp32 emulation (proves the ``_scaled_mm`` call: layouts, scales, bias) and against bf16,
   with per-layer timings (bf16 ``F.linear`` vs fp8 eager);
2. the diffusers reference (eager) and our exact bf16 DiT at each length; our output is the
   "exact" every variant is compared with; then the reference is dropped;
3. variants, each built from a deep copy of our model (the bf16 original stays for the next one):
   ``fp8`` (eager), ``fp8_compiled`` (the same model after ``compile_blocks()``), optionally
   ``fp8_precise`` (``use_fast_accum=False``), ``int8`` (eager).

Per run: median/min seconds (CUDA events, after one untimed call that also compiles), the
model's own weight memory, peak memory as if the model ran alone (its weights + the activation peak
of the call), and ||out - exact|| / ||exact||. Output: log lines per run, then a table (printed),
and JSON via ``common.write_json`` (``$OUT/bench_quant.json``).

    python benchmarks/bench_quant.py --frames 49 129 [--repeat 2] [--no-compile] [--precise-accum]

About 4-5 minutes on one H200 with the defaults. From Python: ``run_benchmark(frames=(49,), ...)``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dit import build_pair, reference_rope  # noqa: E402
from common import environment, peak_gib, rel_err, reset_peak, timed, write_json  # noqa: E402

from diffsynth_cog.models import attention as attn  # noqa: E402
from diffsynth_cog.models.dit import CogDiT  # noqa: E402
from diffsynth_cog.quantization import Float8Linear, quantize_dit  # noqa: E402

logger = logging.getLogger("bench_quant")
GIB = 2**30


def model_gib(model: torch.nn.Module) -> float:
    """Bytes held by the model's parameters and buffers (what its weights cost on the GPU)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / GIB


def make_inputs(ref, ours: CogDiT, frames: int, batch: int, device: str) -> dict[str, Any]:
    """Latents, prompt, timestep and the reference's RoPE for one video length (seeded by length)."""
    dtype = torch.bfloat16
    c = ours.config
    t = (frames - 1) // c.temporal_compression_ratio + 1
    h, w = c.sample_height, c.sample_width
    g = torch.Generator(device).manual_seed(frames)
    return {
        "latents": torch.randn(batch, c.in_channels, t, h, w, device=device, dtype=dtype, generator=g),
        "prompt": torch.randn(batch, c.max_text_seq_length, c.text_embed_dim, device=device, dtype=dtype, generator=g),
        "timestep": torch.full((batch,), 500, device=device),
        "rope": reference_rope(ref, t, h, w, device),
        "latent_frames": t,
        "tokens": t * (h // c.patch_size) * (w // c.patch_size) + c.max_text_seq_length,
    }


def reference_forward(ref, i: dict[str, Any]) -> torch.Tensor:
    """The diffusers model on our inputs, output as [B, C, T, H, W] like ours."""
    out = ref(
        hidden_states=i["latents"].transpose(1, 2),
        encoder_hidden_states=i["prompt"],
        timestep=i["timestep"],
        image_rotary_emb=i["rope"],
        return_dict=False,
    )
    return out[0].transpose(1, 2)


def measure(
    fn: Callable[[], torch.Tensor], exact: torch.Tensor | None, weights_gib: float, repeat: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """Times ``fn`` (one untimed first call, which also compiles, then ``repeat`` timed calls)."""
    reset_peak()
    base = torch.cuda.memory_allocated() / GIB
    with torch.no_grad():
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        tm = timed(fn, warmup=0, repeat=repeat)
    entry = {
        **tm,
        "first_call_s": round(first, 2),
        "weights_GiB": round(weights_gib, 2),
        "peak_GiB_alone": round(weights_gib + peak_gib() - base, 2),
        "peak_GiB_process": round(peak_gib(), 2),
    }
    if exact is not None:
        entry["rel_err_vs_exact_bf16"] = rel_err(out, exact)
    return entry, out


def layer_check(ours: CogDiT, tokens: int, device: str, repeat: int = 10) -> dict[str, Any]:
    """fp8 vs emulation vs bf16 on the block's Linear shapes, M = ``tokens`` rows."""
    block = ours.blocks[0]
    result = {}
    g = torch.Generator(device).manual_seed(0)
    for name, linear in (("attn1.to_q", block.attn1.to_q), ("ff.0", block.ff[0]), ("ff.2", block.ff[2])):
        x = torch.randn(tokens, linear.in_features, device=device, dtype=torch.bfloat16, generator=g)
        entry: dict[str, Any] = {"M_K_N": [tokens, linear.in_features, linear.out_features]}
        with torch.no_grad():
            exact = linear(x)
            for accum in (True, False):
                layer = Float8Linear.from_linear(linear, use_fast_accum=accum)
                got = layer(x)  # the CUDA path: torch._scaled_mm
                tag = "fast_accum" if accum else "precise_accum"
                entry[f"{tag}_vs_emulation"] = rel_err(got, layer._emulate(x))
                entry[f"{tag}_vs_bf16"] = rel_err(got, exact)
                tm = timed(lambda layer=layer, x=x: layer(x), repeat=repeat)
                entry[f"{tag}_ms"] = round(tm["median_s"] * 1e3, 3)
            tm = timed(lambda linear=linear, x=x: F.linear(x, linear.weight, linear.bias), repeat=repeat)
            entry["bf16_ms"] = round(tm["median_s"] * 1e3, 3)
        result[name] = entry
        logger.info("layer %s: %s", name, entry)
        del x, exact, got, layer
    return result


def run_benchmark(
    preset: str = "cogvideox-5b",
    frames: Sequence[int] = (49, 129),
    batch: int = 2,
    repeat: int = 2,
    compile_fp8: bool = True,
    precise_accum: bool = False,
    fp8_attention: bool = False,
    only: Sequence[str] | None = None,
    json_name: str = "bench_quant.json",
    device: str = "cuda",
) -> dict[str, Any]:
    """Runs everything described in the module docstring; returns (and writes) the result dict."""
    torch.manual_seed(0)
    ref, ours = build_pair(preset, torch.bfloat16, device)
    result: dict[str, Any] = {
        **environment(),
        "preset": preset,
        "batch": batch,
        "repeat": repeat,
        "params": sum(p.numel() for p in ours.parameters()),
        "runs": {},
    }
    inputs = {f: make_inputs(ref, ours, f, batch, device) for f in frames}
    result["layer_check"] = layer_check(ours, inputs[frames[0]]["tokens"] * batch, device)

    def record(key: str, entry: dict[str, Any]) -> None:
        result["runs"][key] = entry
        logger.info("%s: %s", key, entry)
        write_json(json_name, result)

    def ours_fn(model: CogDiT, f: int) -> Callable[[], torch.Tensor]:
        i = inputs[f]
        return lambda: model(i["latents"], i["timestep"], i["prompt"])

    # Reference and exact bf16 (the "exact" outputs every variant is compared with).
    exact: dict[int, torch.Tensor] = {}
    for f in frames:
        i = inputs[f]
        entry, out_ref = measure(functools.partial(reference_forward, ref, i), None, model_gib(ref), repeat)
        record(f"{f}f_reference", {**entry, "tokens": i["tokens"]})
        entry, exact[f] = measure(ours_fn(ours, f), None, model_gib(ours), repeat)
        entry["rel_diff_vs_reference"] = rel_err(exact[f], out_ref)
        record(f"{f}f_bf16", {**entry, "tokens": i["tokens"]})
        del out_ref
    del ref  # ours still holds the (shared) weights
    for i in inputs.values():
        i["rope"] = None
    gc.collect()

    result["exact_attention"] = attn.resolve_backend(torch.device(device))
    # (label, quantization mode, its kwargs, attention backend or None for the exact one)
    variants: list[tuple[str, str, dict[str, Any], str | None]] = [("fp8", "fp8", {"use_fast_accum": True}, None)]
    if precise_accum:
        variants.append(("fp8_precise", "fp8", {"use_fast_accum": False}, None))
    variants.append(("int8", "int8", {}, None))
    if fp8_attention:
        variants.append(("fp8_attn8", "fp8", {"use_fast_accum": True}, "fa3-fp8"))
    if only:
        variants = [v for v in variants if v[0] in only]
    for label, mode, kwargs, attention_backend in variants:
        model = None
        try:
            model = copy.deepcopy(ours)
            start = time.perf_counter()
            names = quantize_dit(model, mode, **kwargs)
            torch.cuda.synchronize()
            result[f"{label}_quantize_s"] = round(time.perf_counter() - start, 2)
            result[f"{label}_layers"] = len(names)
            if attention_backend is not None:
                attn.set_attention_backend(attention_backend)
                passes = [(f"{label}_compiled", True)] if compile_fp8 else [(label, False)]
            else:
                passes = [(label, False)] + ([(f"{label}_compiled", True)] if label == "fp8" and compile_fp8 else [])
            for tag, compiled in passes:
                if compiled:
                    model.compile_blocks()
                for f in frames:
                    try:
                        entry, out = measure(ours_fn(model, f), exact[f], model_gib(model), repeat)
                        del out
                    except Exception as e:  # a failing variant is a result to report, not a reason to lose the run
                        logger.exception("%df %s failed", f, tag)
                        entry = {"error": repr(e)[:500]}
                    record(f"{f}f_{tag}", entry)
        except Exception as e:
            logger.exception("%s failed", label)
            result["runs"][f"{label}_error"] = repr(e)[:500]
        finally:
            attn.set_attention_backend("auto")
            del model
            torch._dynamo.reset()  # compiled graphs hold on to the model
            gc.collect()
            torch.cuda.empty_cache()
    write_json(json_name, result)
    print_table(result, frames)
    return result


def print_table(result: dict[str, Any], frames: Sequence[int]) -> None:
    """One line per run; times relative to our exact bf16 and to the reference (both eager)."""
    runs = result["runs"]
    print(f"\n{result['gpu']}, torch {result['torch']}, {result['preset']}, CFG batch {result['batch']}")
    header = f"{'run':<22}{'median s':>10}{'vs bf16':>9}{'vs ref':>8}{'weights':>9}{'peak':>8}{'rel err':>10}"
    print(header + "\n" + "-" * len(header))
    for f in frames:
        bf16, ref = runs.get(f"{f}f_bf16", {}), runs.get(f"{f}f_reference", {})
        for key, entry in runs.items():
            if not key.startswith(f"{f}f_") or not isinstance(entry, dict):
                continue
            if "error" in entry:
                print(f"{key:<22} failed: {entry['error'][:80]}")
                continue
            t = entry["median_s"]
            speed_bf16 = f"{bf16['median_s'] / t:.2f}x" if "median_s" in bf16 else "-"
            speed_ref = f"{ref['median_s'] / t:.2f}x" if "median_s" in ref else "-"
            err = entry.get("rel_err_vs_exact_bf16", entry.get("rel_diff_vs_reference"))
            err_s = f"{err:.1e}" if err is not None else "-"
            print(
                f"{key:<22}{t:>10.3f}{speed_bf16:>9}{speed_ref:>8}{entry['weights_GiB']:>8.2f}G"
                f"{entry['peak_GiB_alone']:>7.2f}G{err_s:>10}"
            )
    print("weights/peak: GiB of this model alone (peak = weights + the call's activation peak);")
    print("rel err: vs our exact bf16 output (for the bf16 row: vs the reference).")
    for name, entry in result.get("layer_check", {}).items():
        print(
            f"layer {name} {entry['M_K_N']}: bf16 {entry['bf16_ms']} ms, fp8 {entry['fast_accum_ms']} ms "
            f"(precise accum {entry['precise_accum_ms']} ms); fp8 vs emulation "
            f"{entry['fast_accum_vs_emulation']:.1e} / {entry['precise_accum_vs_emulation']:.1e}, "
            f"vs bf16 {entry['fast_accum_vs_bf16']:.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cogvideox-5b")
    parser.add_argument("--frames", type=int, nargs="+", default=[49, 129])
    parser.add_argument("--batch", type=int, default=2, help="2 = one CFG step (cond + uncond)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the fp8 + per-block torch.compile pass")
    parser.add_argument("--precise-accum", action="store_true", help="also time fp8 with use_fast_accum=False")
    parser.add_argument("--fp8-attention", action="store_true", help="also run fp8 linears + fa3-fp8 attention")
    parser.add_argument("--only", nargs="+", help="run only these variants (fp8 fp8_precise int8 fp8_attn8)")
    parser.add_argument("--no-fused-bias", action="store_true", help="add the fp8 bias after _scaled_mm")
    parser.add_argument("--json", default="bench_quant.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.no_fused_bias:
        Float8Linear.fuse_bias = False
    run_benchmark(
        preset=args.preset,
        frames=args.frames,
        batch=args.batch,
        repeat=args.repeat,
        compile_fp8=not args.no_compile,
        precise_accum=args.precise_accum,
        fp8_attention=args.fp8_attention,
        only=args.only,
        json_name=args.json,
    )


if __name__ == "__main__":
    main()
