"""DiT forward at full 5B size, ours and diffusers' side by side on the same random weights.

Both models share one set of bf16 weights (ours is built on the meta device and takes the
reference's tensors with ``assign=True``), so the comparison is exact-weights and the GPU
holds a single copy. Reports per-forward time (CFG batch 2), the ratio, peak memory, achieved
TFLOP/s, and the relative difference of the outputs.

    python benchmarks/bench_dit.py --frames 49 129 [--preset cogvideox-5b] [--compile]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dit_flops, environment, peak_gib, rel_err, reset_peak, timed, write_json  # noqa: E402

from diffsynth_cog.configs import DiTConfig, dit_preset  # noqa: E402
from diffsynth_cog.denoise.denoiser import Denoiser  # noqa: E402
from diffsynth_cog.loading.convert import convert_state_dict  # noqa: E402
from diffsynth_cog.loading.dit_loader import dit_rename  # noqa: E402
from diffsynth_cog.models import attention as attn  # noqa: E402
from diffsynth_cog.models.dit import CogDiT  # noqa: E402

logger = logging.getLogger("bench_dit")


def reference_rope(model, t: int, h: int, w: int, device):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    c = model.config
    if not c.use_rotary_positional_embeddings:
        return None
    gh, gw = h // c.patch_size, w // c.patch_size
    crops = get_resize_crop_region_for_grid((gh, gw), c.sample_width // c.patch_size, c.sample_height // c.patch_size)
    return get_3d_rotary_pos_embed(c.attention_head_dim, crops, (gh, gw), t, device=device)


def build_pair(preset: str | DiTConfig, dtype: torch.dtype, device: str | torch.device):
    """diffusers' transformer and ours (a preset name or a config) on one set of random weights: ours takes
    the reference's tensors."""
    from diffusers import CogVideoXTransformer3DModel

    config = dit_preset(preset) if isinstance(preset, str) else preset
    ref_kwargs = {k: v for k, v in config.to_dict().items() if k != "rope_theta"}
    with torch.device(device):
        ref = CogVideoXTransformer3DModel(**ref_kwargs).to(dtype).eval()
    with torch.device("meta"):
        ours = CogDiT(config)
    sd = convert_state_dict(ref.state_dict(), ours, dit_rename, source="diffusers (random init)")
    ours.load_state_dict(sd, assign=True, strict=True)
    return ref.requires_grad_(False), ours.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cogvideox-5b")
    parser.add_argument("--frames", type=int, nargs="+", default=[49, 129])
    parser.add_argument("--batch", type=int, default=2, help="2 = one CFG step (cond + uncond)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time both sides with per-block torch.compile")
    parser.add_argument("--attention", default="auto", choices=attn.BACKENDS, help="our attention backend")
    parser.add_argument("--json", default="bench_dit.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device, dtype = "cuda", torch.bfloat16
    attn.set_attention_backend(args.attention)
    torch.manual_seed(0)
    ref, ours = build_pair(args.preset, dtype, device)
    n_params = sum(p.numel() for p in ours.parameters())
    result = {**environment(), "preset": args.preset, "params": n_params, "batch": args.batch, "runs": {}}
    result["attention"] = attn.resolve_backend(torch.device(device))
    logger.info("%s", result)

    passes = [("", False)] + ([("_compiled", True)] if args.compile else [])
    for suffix, compiled in passes:
        if compiled:
            for block in ref.transformer_blocks:
                block.compile(fullgraph=True)
            # Not fullgraph for ours: the attention backend switch may be a graph break, which costs
            # nothing here since attention is one opaque kernel either way.
            ours.compile_blocks()
        for frames in args.frames:
            try:
                measure(ref, ours, frames, suffix, args, result)
            except Exception as e:  # a compiler failure is a result to report, not a reason to lose the run
                logger.exception("%d frames%s failed", frames, suffix)
                result["runs"][f"{frames}f{suffix}"] = {"error": repr(e)[:500]}
            write_json(args.json, result)
    write_json(args.json, result)
    logger.info("done: %s", result)


def measure(ref, ours, frames: int, suffix: str, args: argparse.Namespace, result: dict) -> None:
    """Times both models at one length; ``suffix`` tags the pass ("" eager, "_compiled")."""
    device, dtype = "cuda", torch.bfloat16
    c = ours.config
    t = (frames - 1) // c.temporal_compression_ratio + 1
    h, w = c.sample_height, c.sample_width
    g = torch.Generator(device).manual_seed(frames)
    latents = torch.randn(args.batch, c.in_channels, t, h, w, device=device, dtype=dtype, generator=g)
    prompt = torch.randn(args.batch, c.max_text_seq_length, c.text_embed_dim, device=device, dtype=dtype, generator=g)
    timestep = torch.tensor([500, 500][: args.batch], device=device)
    rope = reference_rope(ref, t, h, w, device)
    tokens = t * (h // c.patch_size) * (w // c.patch_size) + c.max_text_seq_length
    flops = dit_flops(result["params"], tokens, c.inner_dim, c.num_layers, args.batch)

    def run_ref():
        out = ref(
            hidden_states=latents.transpose(1, 2),
            encoder_hidden_states=prompt,
            timestep=timestep,
            image_rotary_emb=rope,
            return_dict=False,
        )
        return out[0].transpose(1, 2)

    def run_ours():
        return ours(latents, timestep, prompt)

    denoiser = Denoiser(ours)  # the pipeline's path: the same DiT call composed of its (default) parts

    def run_denoiser():
        return denoiser(latents, 500, prompt)

    entry = {"latent_frames": t, "tokens": tokens}
    with torch.no_grad():
        out_ref, out_ours = run_ref(), run_ours()
        entry["rel_diff_vs_reference"] = rel_err(out_ours, out_ref)
        entry["rel_diff_reference_rerun"] = rel_err(run_ref(), out_ref)
        entry["rel_diff_denoiser_vs_dit"] = rel_err(run_denoiser(), out_ours)
        del out_ref, out_ours
        for name, fn in (("reference", run_ref), ("ours", run_ours), ("ours_denoiser", run_denoiser)):
            reset_peak()
            tm = timed(fn, warmup=1, repeat=args.repeat)
            entry[name] = {**tm, "peak_GiB": round(peak_gib(), 2), "TFLOPs": round(flops / tm["median_s"] / 1e12, 1)}
            logger.info("%d frames%s %s: %s", frames, suffix, name, entry[name])
    entry["speedup"] = entry["reference"]["median_s"] / entry["ours"]["median_s"]
    result["runs"][f"{frames}f{suffix}"] = entry
    logger.info("%d frames%s: %s", frames, suffix, entry)


if __name__ == "__main__":
    main()
