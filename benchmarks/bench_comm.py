"""The Ulysses exchange alone: bandwidth of NCCL's all-to-all at the sizes one 5B block moves, under the NCCL
settings of the environment (run it once per setting, e.g. ``NCCL_MIN_P2P_NCHANNELS=32``), next to an all-gather
of the same bytes (NCCL's collective path, for comparison).

One CFG-batch step of CogVideoX-5B at 129 frames on 2 ranks moves, per block, q, k and v (one all-to-all, token
shard -> head share) and the attention output (one all-to-all back): with ``--frames 129`` that is 22,388 tokens x
B 2 x 3 tensors x 48 / 2 heads x 64 per rank and direction. Reports seconds per exchange, GB/s of the bytes that
cross to other ranks, and the implied exchange time of a whole step (42 blocks, both directions).

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_comm.py --json comm_default.json
    NCCL_MIN_P2P_NCHANNELS=32 NCCL_MAX_P2P_NCHANNELS=32 torchrun ... benchmarks/bench_comm.py --json comm_p2p32.json
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_comm.py --smoke   # gloo on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from diffsynth_cog.configs import dit_preset  # noqa: E402
from diffsynth_cog.models.tokens import TokenLayout  # noqa: E402
from diffsynth_cog.parallel.comm import all_gather  # noqa: E402
from diffsynth_cog.parallel.launch import init_distributed, shutdown_distributed  # noqa: E402
from diffsynth_cog.pipeline.checks import latent_shape_for  # noqa: E402

logger = logging.getLogger("bench_comm")
NCCL_PREFIX = "NCCL_"


def tokens(frames: int, height: int, width: int) -> int:
    """Text + video tokens of one CogVideoX-5B call."""
    c = dit_preset("cogvideox-5b")
    _, _, t, h, w = latent_shape_for(c, frames, height, width)
    return TokenLayout(c.max_text_seq_length, (t, h // c.patch_size, w // c.patch_size)).n_tokens


def time_it(fn, device: torch.device, repeat: int) -> float:  # noqa: ANN001
    """Median seconds of ``fn`` over ``repeat`` runs after two warm-ups, every rank in step."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        dist.barrier()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=129)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="gloo on the CPU at a tiny size")
    parser.add_argument("--json", default="bench_comm.json")
    args = parser.parse_args()

    launch = init_distributed("cpu" if args.smoke else "cuda", timedelta(minutes=5))
    if not launch.distributed:
        raise SystemExit("start it with torchrun --nproc_per_node N (N >= 2)")
    device = torch.device(launch.device)
    if launch.is_main:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    world = launch.world
    c = dit_preset("cogvideox-5b")
    n = 64 if args.smoke else -(-tokens(args.frames, 480, 720) // world)  # this rank's tokens
    heads, dim, batch = c.num_attention_heads, c.attention_head_dim, 2
    share = heads // world
    element = 2  # bf16
    result: dict = {
        "world": world,
        "frames": args.frames,
        "tokens_per_rank": n,
        "nccl_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(NCCL_PREFIX)},
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "exchanges": {},
    }
    # rows per destination rank: inbound q,k,v (3 tensors), outbound the attention output (1)
    for name, tensors in (("qkv_in", 3), ("out_back", 1)):
        row = tensors * batch * share * dim
        send = torch.randn(world * n, row, device=device).to(torch.bfloat16)
        recv = torch.empty_like(send)
        crossing = (world - 1) * n * row * element  # bytes this rank sends to the others

        seconds = time_it(lambda recv=recv, send=send: dist.all_to_all_single(recv, send), device, args.repeat)
        gather_s = time_it(
            lambda piece=send[:n]: all_gather(piece, dist.group.WORLD, "all-gather"), device, args.repeat
        )
        gather_bytes = (world - 1) * n * row * element  # each rank receives world-1 pieces
        result["exchanges"][name] = {
            "bytes_to_others_MB": round(crossing / 1e6, 1),
            "all_to_all_s": round(seconds, 5),
            "all_to_all_GBps": round(crossing / seconds / 1e9, 1),
            "all_gather_same_bytes_s": round(gather_s, 5),
            "all_gather_GBps": round(gather_bytes / gather_s / 1e9, 1),
        }
        if not args.smoke:
            assert torch.equal(
                recv[launch.rank * n : (launch.rank + 1) * n], send[launch.rank * n : (launch.rank + 1) * n]
            )
    blocks = c.num_layers
    per_step = sum(e["all_to_all_s"] for e in result["exchanges"].values()) * blocks
    result["all_to_all_per_step_s"] = round(per_step, 4)
    if launch.is_main:
        logger.info("bench_comm: %s", result)
        write_json(args.json, result)
    shutdown_distributed()


if __name__ == "__main__":
    main()
