"""Attention kernels at CogVideoX-5B shapes, side by side: time, TFLOP/s and error against fp32.

One CFG step's attention call: batch 2, 48 heads of 64, over the joint [text, video] sequence
(17,776 tokens at 49 frames, 44,776 at 129). Every installed backend of
``diffsynth_cog.models.attention`` runs on the same inputs; the error is
||out - exact|| / ||exact|| on a subset of query rows, against fp32 attention over all keys.

Inputs are unit-variance q, k, v (what the per-head LayerNorm of q and k gives); ``--sharpness``
multiplies q to make the softmax peakier (logit std = sharpness), which is harder for 8-bit formats;
``--key-offset`` adds one random vector of that standard deviation to every key of a head (the shared
per-channel offset trained DiTs' keys carry; exact attention does not change, 8-bit formats lose range).

    python benchmarks/bench_attention.py --frames 49 129 [--sharpness 1 4] [--key-offset 0 5]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, timed, write_json  # noqa: E402

from diffsynth_cog.models import attention as attn  # noqa: E402

logger = logging.getLogger("bench_attention")
HEADS, HEAD_DIM, TEXT_TOKENS = 48, 64, 226


def tokens_for(frames: int) -> int:
    latent_frames = (frames - 1) // 4 + 1
    return latent_frames * 30 * 45 + TEXT_TOKENS  # 480x720 -> 60x90 latents -> 30x45 patches


def exact_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """fp32 attention for the query rows ``rows`` over every key. [B, L, H, D] in, [B, R, H, D] out."""
    qs = q[:, rows].float().transpose(1, 2)  # [B, H, R, D]
    kt = k.float().transpose(1, 2)  # [B, H, L, D]
    scores = qs @ kt.transpose(-1, -2) * HEAD_DIM**-0.5  # [B, H, R, L]
    out = scores.softmax(dim=-1) @ v.float().transpose(1, 2)  # [B, H, R, D]
    return out.transpose(1, 2)


def available_backends() -> list[str]:
    names = ["sdpa-cudnn", "sdpa"]
    if attn.fa3_available():
        names += ["fa3", "fa3-fp8"]
    for name, module in (("flash-attn", "flash_attn"), ("sage", "sageattention")):
        try:
            attn.set_attention_backend(name)
            names.append(name)
        except ValueError:
            logger.info("%s not installed (module %s)", name, module)
    attn.set_attention_backend("auto")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[49, 129])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sharpness", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--key-offset", type=float, nargs="+", default=[0.0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rows", type=int, default=512, help="query rows checked against fp32")
    parser.add_argument("--json", default="bench_attention.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    backends = available_backends()
    result = {**environment(), "backends": backends, "auto": None, "runs": {}}
    result["auto"] = attn.resolve_backend(torch.device("cuda"))
    logger.info("backends: %s (auto -> %s)", backends, result["auto"])
    for frames in args.frames:
        n = tokens_for(frames)
        flops = 4 * args.batch * HEADS * n * n * HEAD_DIM
        for sharp, offset in [(s, o) for s in args.sharpness for o in args.key_offset]:
            g = torch.Generator("cuda").manual_seed(frames)
            shape = (args.batch, n, HEADS, HEAD_DIM)
            q, k, v = (torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
            q = q * sharp
            if offset:
                k = k + offset * torch.randn(1, 1, HEADS, HEAD_DIM, device="cuda", generator=g, dtype=k.dtype)
            rows = torch.linspace(0, n - 1, args.rows, device="cuda").long()
            exact = exact_rows(q, k, v, rows)
            entry: dict[str, dict] = {}
            for name in backends:
                attn.set_attention_backend(name)
                try:
                    with torch.no_grad():
                        out = attn.attention(q, k, v)
                        err = ((out[:, rows].float() - exact).norm() / exact.norm()).item()
                        tm = timed(lambda q=q, k=k, v=v: attn.attention(q, k, v), warmup=1, repeat=args.repeat)
                except Exception as e:  # a kernel that fails at this shape is a result, not a crash
                    logger.exception("%s failed", name)
                    entry[name] = {"error": repr(e)[:300]}
                    continue
                entry[name] = {**tm, "TFLOPs": round(flops / tm["median_s"] / 1e12, 1), "rel_err_vs_fp32": err}
                logger.info(
                    "%d f (%d tokens) sharpness %g offset %g %s: %s", frames, n, sharp, offset, name, entry[name]
                )
            attn.set_attention_backend("auto")
            base = entry.get("sdpa-cudnn", {}).get("median_s")
            for e in entry.values():
                if base and "median_s" in e:
                    e["speedup_vs_cudnn"] = round(base / e["median_s"], 3)
            key = f"{frames}f_sharp{sharp:g}" + (f"_koffset{offset:g}" if offset else "")
            result["runs"][key] = {"tokens": n, **entry}
            write_json(args.json, result)
            del q, k, v, exact
    logger.info("done: %s", result)


if __name__ == "__main__":
    main()
