"""The real post-training job (Lightning + DeepSpeed ZeRO-2) at full 5B size, 129 frames, on N GPUs.

Writes a random-weight CogVideoX-5B transformer folder and a synthetic latent cache (33x60x90
latents, 226x4096 prompt embeddings: exactly what ``diffsynth-cog prepare`` writes for 129 frames
at 480x720), then runs ``run_training`` with ``strategy="deepspeed_stage_2"`` for a few steps and
reports the step time of the steady state (rank 0), samples/s and peak memory.

    python benchmarks/bench_train_zero2.py --root /tmp/zero2 --devices 2 --steps 5
Run it once with --devices 1 and once with --devices 2 to get the scaling.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from diffsynth_cog.configs import dit_preset  # noqa: E402
from diffsynth_cog.io.atomic import save_safetensors_atomic, write_json_atomic, write_text_atomic  # noqa: E402
from diffsynth_cog.models.dit import CogDiT  # noqa: E402
from diffsynth_cog.training.cache import CacheInfo, CacheRecord, manifest_name, record_name  # noqa: E402
from diffsynth_cog.training.config import TrainConfig  # noqa: E402
from diffsynth_cog.training.prepare import write_record  # noqa: E402
from diffsynth_cog.training.trainer import run_training  # noqa: E402

logger = logging.getLogger("bench_train_zero2")


def make_assets(root: Path, samples: int) -> None:
    """Random full-size transformer (our key names + config.json) and a synthetic cache, once."""
    config = dit_preset("cogvideox-5b")
    transformer = root / "model" / "transformer"
    if not (transformer / "config.json").exists():
        transformer.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        with torch.device("cuda"):
            dit = CogDiT(config).to(torch.bfloat16)
        save_safetensors_atomic(transformer / "model.safetensors", dit.state_dict())
        write_json_atomic(transformer / "config.json", config.to_dict())  # last: it marks the model as complete
        del dit
        torch.cuda.empty_cache()
    cache = root / "cache"
    if not (cache / "cache_info.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        info = CacheInfo(
            latent_shape=(16, 33, 60, 90),
            prompt_emb_shape=(226, 4096),
            dtype="bfloat16",
            scaling_factor=0.7,
            num_frames=129,
            height=480,
            width=720,
            frame_interval=1,
            temporal_compression_ratio=4,
            spatial_compression=8,
        )
        g = torch.Generator().manual_seed(0)
        lines = []
        for i in range(samples):
            tensors = {
                "latents": torch.randn(16, 33, 60, 90, generator=g).to(torch.bfloat16),
                "prompt_emb": torch.randn(226, 4096, generator=g).to(torch.bfloat16),
            }
            size = write_record(cache / record_name(i), tensors, {"prompt": f"synthetic {i}"})
            lines.append(CacheRecord(index=i, file=record_name(i), source="synthetic", prompt=f"p{i}", bytes=size))
        write_text_atomic(cache / manifest_name(), "".join(r.to_json() + "\n" for r in lines))
        write_json_atomic(cache / "cache_info.json", info.to_dict())  # last: it marks the cache as complete


class StepTimes(Callback):
    """Wall time of every optimizer step on this rank (synchronised), and peak memory."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.last is None:
            torch.cuda.synchronize()
            self.last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/zero2")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--offload-optimizer", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(args.root)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    if rank == 0:
        make_assets(root, args.samples)
    config = TrainConfig(
        model=str(root / "model"),
        cache_dir=str(root / "cache"),
        output_dir=str(root / f"run_{args.devices}gpu"),
        max_steps=args.steps,
        strategy="deepspeed_stage_2",
        offload_optimizer=args.offload_optimizer,
        devices=args.devices,
        precision="bf16",
        num_workers=2,
        checkpoint_every_n_steps=10_000,
        log_every_n_steps=1,
    )
    timer = StepTimes()
    torch.cuda.reset_peak_memory_stats()
    run_training(config, callbacks=[timer], progress=False, export=False)
    if rank == 0:
        steady = timer.times[1:] or timer.times  # the first step includes compilation and warm-up
        step_s = sorted(steady)[len(steady) // 2]
        result = {
            "gpu": torch.cuda.get_device_name(),
            "devices": args.devices,
            "strategy": "deepspeed_stage_2",
            "offload_optimizer": args.offload_optimizer,
            "lora": "rank 64 on all eight Linear layers per block",
            "frames": 129,
            "step_times_s": [round(t, 3) for t in timer.times],
            "median_step_s": round(step_s, 3),
            "samples_per_s": round(args.devices / step_s, 4),
            "peak_GiB_rank0": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "date": time.strftime("%Y-%m-%d"),
        }
        write_json(args.json or f"bench_train_zero2_{args.devices}gpu.json", result)
        logger.info("RESULT %s", result)


if __name__ == "__main__":
    main()
