"""Where the time of one DiT step goes: a torch.profiler trace of one CFG-batch forward, grouped.

Full-size 5B DiT, random bf16 weights, eager (and optionally with per-block torch.compile). Kernels
are grouped into attention, matmul (GEMM), normalisation, elementwise/other, by kernel name.

    python benchmarks/profile_dit.py --frames 129 [--compile] [--attention fa3] [--quantize fp8]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, kernel_times, write_json  # noqa: E402

from diffsynth_cog.configs import dit_preset  # noqa: E402
from diffsynth_cog.models import attention as attn  # noqa: E402
from diffsynth_cog.models.dit import CogDiT  # noqa: E402

logger = logging.getLogger("profile_dit")

GROUPS = (
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa", "mha")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul", "scaled_mm", "f8f8")),
    ("norm", ("layer_norm", "layernorm", "group_norm")),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=129)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--attention", default="auto", choices=attn.BACKENDS)
    parser.add_argument("--quantize", choices=["none", "fp8", "int8"], default="none")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    c = dit_preset("cogvideox-5b")
    torch.manual_seed(0)
    with torch.device("cuda"):
        dit = CogDiT(c).to(torch.bfloat16).eval().requires_grad_(False)
    attn.set_attention_backend(args.attention)
    if args.quantize != "none":
        from diffsynth_cog.quantization import quantize_dit

        quantize_dit(dit, args.quantize)
    if args.compile:
        dit.compile_blocks()
    t = (args.frames - 1) // 4 + 1
    x = torch.randn(2, 16, t, 60, 90, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(2, 226, 4096, device="cuda", dtype=torch.bfloat16)
    ts = torch.tensor([500, 500], device="cuda")
    with torch.no_grad():
        for _ in range(2):
            dit(x, ts, ctx)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dit(x, ts, ctx)
            torch.cuda.synchronize()
    result = {
        **environment(),
        "frames": args.frames,
        "compiled": args.compile,
        "attention": attn.resolve_backend(torch.device("cuda")),
        "quantize": args.quantize,
        **kernel_times(prof, GROUPS, top=12),
    }
    tag = f"{'_compiled' if args.compile else ''}_{result['attention']}" + (
        f"_{args.quantize}" if args.quantize != "none" else ""
    )
    write_json(args.json or f"profile_dit_{args.frames}f{tag}.json", result)
    logger.info("RESULT %s", result)


if __name__ == "__main__":
    main()
