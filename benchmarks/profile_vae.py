"""Where the time of a VAE decode goes: torch.profiler over one decode, kernels grouped.

Full-size CogVideoX VAE decoder, random bf16 weights. ``--layouts`` runs the decode with the
default (channels-first) tensors and/or with every conv weight and the latents in channels-last
(``channels_last_3d`` for 3D convs), reporting time, peak memory, and the difference between the
layouts' outputs.

    python benchmarks/profile_vae.py --frames 129 [--untiled] [--layouts default channels_last]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, kernel_times, peak_gib, rel_err, reset_peak, timed, write_json  # noqa: E402

from diffsynth_cog.configs import vae_preset  # noqa: E402
from diffsynth_cog.models.vae import CogVAE  # noqa: E402

logger = logging.getLogger("profile_vae")

GROUPS = (
    ("norm", ("group_norm", "groupnorm", "welford", "rowwisemoments", "compute_stats")),
    ("conv", ("conv", "implicit", "fprop", "xmma", "cudnn", "nhwc", "gemm", "nvjet", "cutlass", "dgrad", "wgrad")),
    ("layout/copy/cat", ("nchwtonhwc", "nhwctonchw", "transpose", "copy", "cat", "permute")),
    ("upsample", ("upsample", "interpolate", "nearest")),
)


def to_channels_last(module: nn.Module) -> None:
    """Conv weights to channels-last (3D convs: channels_last_3d), in place."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
        elif isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=129)
    parser.add_argument("--untiled", action="store_true")
    parser.add_argument("--layouts", nargs="+", default=["default", "channels_last"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = CogVAE(vae_preset("cogvideox-5b"), parts=("decoder",)).to(torch.bfloat16).eval().requires_grad_(False)
    t = (args.frames - 1) // 4 + 1
    z = torch.randn(1, 16, t, 60, 90, device="cuda", dtype=torch.bfloat16)
    result = {**environment(), "frames": args.frames, "tiled": not args.untiled, "runs": {}}
    outputs = {}
    for layout in args.layouts:
        zin = z
        if layout == "channels_last":
            to_channels_last(vae)
            zin = z.contiguous(memory_format=torch.channels_last_3d)

        def run(zin=zin):
            return vae.decode(zin, tiled=not args.untiled)

        with torch.no_grad():
            outputs[layout] = run().float().cpu()
            reset_peak()
            tm = timed(run, warmup=0, repeat=1)
            peak = peak_gib()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
        entry = {
            **tm,
            "peak_GiB": round(peak, 2),
            **kernel_times(prof, GROUPS),
        }
        if layout != args.layouts[0]:
            entry["rel_diff_vs_first_layout"] = rel_err(outputs[layout], outputs[args.layouts[0]])
        result["runs"][layout] = entry
        logger.info("RESULT %s: %s", layout, entry)
    write_json(args.json or f"profile_vae_{args.frames}f{'_untiled' if args.untiled else ''}.json", result)


if __name__ == "__main__":
    main()
