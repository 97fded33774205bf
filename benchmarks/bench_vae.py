"""VAE decode at full size, ours and diffusers' side by side on the same random weights.

Both share one set of bf16 weights (ours is built on the meta device and takes the reference's
tensors with ``assign=True``). Reports time, peak memory and the relative difference of the
decoded videos, untiled and tiled, at 13 and 33 latent frames (49 and 129 pixel frames).

    python benchmarks/bench_vae.py --frames 49 129 [--fp32-check]

``--fp32-check`` first decodes 13 latent frames (untiled) with an fp32 copy of the reference and
reports how far each bf16 decoder (the reference's and ours) lands from it: the scale of "bf16 noise"
that the ours-vs-reference difference is to be read against.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, peak_gib, rel_err, reset_peak, timed, write_json  # noqa: E402

from diffsynth_cog.configs import vae_preset  # noqa: E402
from diffsynth_cog.loading.convert import convert_state_dict  # noqa: E402
from diffsynth_cog.loading.vae_loader import vae_rename  # noqa: E402
from diffsynth_cog.models.vae import CogVAE  # noqa: E402

logger = logging.getLogger("bench_vae")


def build_pair(dtype: torch.dtype, device: str):
    from diffusers import AutoencoderKLCogVideoX

    with torch.device(device):
        ref = AutoencoderKLCogVideoX(scaling_factor=0.7).to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = CogVAE(vae_preset("cogvideox-5b"))
    sd = convert_state_dict(ref.state_dict(), ours, vae_rename, source="diffusers VAE (random init)")
    ours.load_state_dict(sd, assign=True, strict=True)
    return ref, ours.eval().requires_grad_(False)


def fp32_check(ref, ours) -> dict[str, float]:
    """rel distance of the bf16 reference and of ours from an fp32 reference, 13 latent frames, untiled."""
    import copy

    z = torch.randn(1, 16, 13, 60, 90, device="cuda", generator=torch.Generator("cuda").manual_seed(13))
    ref.disable_tiling()
    with torch.no_grad():
        exact = copy.deepcopy(ref).float().decode(z).sample
        torch.cuda.empty_cache()
        zb = z.to(torch.bfloat16)
        return {
            "reference_bf16_vs_fp32": rel_err(ref.decode(zb).sample, exact),
            "ours_bf16_vs_fp32": rel_err(ours.decode(zb), exact),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="*", default=[49, 129])
    parser.add_argument("--fp32-check", action="store_true", help="distance of both bf16 decoders from fp32")
    parser.add_argument("--json", default="bench_vae.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    ref, ours = build_pair(dtype, device)
    result = {**environment(), "runs": {}}
    if args.fp32_check:
        result["fp32_check"] = fp32_check(ref, ours)
        logger.info("fp32 check: %s", result["fp32_check"])
        write_json(args.json, result)
    for frames in args.frames:
        t = (frames - 1) // 4 + 1
        z = torch.randn(1, 16, t, 60, 90, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(t))
        for tiled in (False, True):
            if tiled:
                ref.enable_tiling()
            else:
                ref.disable_tiling()
            entry = {}
            with torch.no_grad():

                def run_ref(z=z):
                    return ref.decode(z).sample

                def run_ours(z=z, tiled=tiled):
                    return ours.decode(z, tiled=tiled)

                out_ref, out_ours = run_ref(), run_ours()
                entry["rel_diff_vs_reference"] = rel_err(out_ours, out_ref)
                del out_ref, out_ours
                for name, fn in (("reference", run_ref), ("ours", run_ours)):
                    reset_peak()
                    tm = timed(fn, warmup=0, repeat=1)
                    entry[name] = {**tm, "peak_GiB": round(peak_gib(), 2)}
                # cuDNN's autotuner picks conv algorithms per shape; enabled only around our call here
                # (the flag is process-wide), to see what it is worth before making it a default.
                with torch.backends.cudnn.flags(enabled=True, benchmark=True):
                    run_ours()  # tuning run
                    reset_peak()
                    tm = timed(run_ours, warmup=0, repeat=1)
                entry["ours_cudnn_benchmark"] = {**tm, "peak_GiB": round(peak_gib(), 2)}
            entry["speedup"] = entry["reference"]["median_s"] / entry["ours"]["median_s"]
            entry["speedup_cudnn_benchmark"] = (
                entry["reference"]["median_s"] / entry["ours_cudnn_benchmark"]["median_s"]
            )
            result["runs"][f"decode_{frames}f_{'tiled' if tiled else 'untiled'}"] = entry
            logger.info("%d frames tiled=%s: %s", frames, tiled, entry)
            write_json(args.json, result)
    logger.info("done: %s", result)


if __name__ == "__main__":
    main()
