"""What each rank runs in the sequence-parallel training tests (tests/test_training_parallel.py), and the
tiny training pieces those tests share.

Module-level functions, so that spawned processes can import them. A scenario computes, on every rank, the
unsplit step of its group's sample in-process first (no process group involved), then the split step, and
reduces the LoRA gradients the way the training strategies do (DDP / ZeRO-2: the mean over all ranks).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
from tiny_models import PRESET_FLAGS, TINY_DIT, randomize_

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.lora import lora_parameters
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.models.tokens import TokenLayout
from diffsynth_cog.schedulers import scheduler_preset
from diffsynth_cog.training.config import TrainConfig
from diffsynth_cog.training.module import CogLoRAModule

# latents [B, 4, 3, 4, 6] -> 3 frames x 2 x 3 patches = 18 video tokens + 7 text = 25: odd, no degree divides it
FRAMES, LATENT_H, LATENT_W, TEXT = 3, 4, 6, 7


def tiny_dit(seed: int = 0, heads: int = 2) -> CogDiT:
    config = DiTConfig.from_dict({**TINY_DIT, **PRESET_FLAGS["cogvideox-5b"], "num_attention_heads": heads})
    return randomize_(CogDiT(config), seed).float()


def tiny_module(dit: CogDiT, **changes: Any) -> CogLoRAModule:
    """A configured module on ``dit`` with a non-zero LoRA (B = 0 would give A no gradient)."""
    config = TrainConfig(model="unused", cache_dir="unused", output_dir="unused", lora_rank=4, **changes)
    module = CogLoRAModule(config, dit=dit, scheduler_config=scheduler_preset("cogvideox-5b"))
    module.setup("fit")
    module.configure_model()
    with torch.no_grad():
        for p in lora_parameters(module.dit):
            if p.abs().max() == 0:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    return module


def tiny_batch(seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, 4, FRAMES, LATENT_H, LATENT_W, generator=g),
        "prompt_emb": torch.randn(batch, TEXT, 32, generator=g),
    }


def lora_grads(module: CogLoRAModule, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    for p in module.parameters():
        p.grad = None
    loss = module.batch_loss(batch, step=3)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)


class ReferenceWindowAttention:
    """The temporal-window mask written out by hand (text global, +-``window`` frames, frame 0 a sink) and
    attention as an explicit softmax: the dense masked reference of ``TemporalWindowAttention``."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.name = f"reference-window{window}"

    def check_compatible(self, parts: object) -> None:
        """Goes with every part (a split with ring attention would refuse it)."""

    def allowed(self, layout: TokenLayout) -> torch.Tensor:
        """[L, L] booleans, True where query i sees key j."""
        n = layout.n_tokens
        frame = torch.full((n,), -1)
        frame[layout.n_text :] = torch.arange(layout.n_video) // layout.tokens_per_frame
        text = frame < 0
        near = (frame[:, None] - frame[None, :]).abs() <= self.window
        sink = (frame == 0)[None, :].expand(n, n)
        return text[:, None] | text[None, :] | near | sink

    def build(self, layout: TokenLayout, device: torch.device, kernel=None):  # noqa: ANN001, ANN201
        allowed = self.allowed(layout).to(device)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
            weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            return torch.einsum("bhlm,bmhd->blhd", weights, v)

        return attend


def _world_mean(grads: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    """What DDP / ZeRO-2 do with the ranks' gradients: the mean over every rank."""
    out = {}
    for name, g in grads.items():
        g = g.contiguous()
        dist.all_reduce(g)
        out[name] = g / world
    return out


def sequence_parallel_grads(rank: int, world: int, degree: int, attentions: list[str | None]) -> dict[str, Any]:
    """Per attention spec: the losses and LoRA gradients of the unsplit and the split step, each reduced by the
    world mean; group g (ranks g*degree ..) trains sample g."""
    group = rank // degree
    batch = tiny_batch(seed=100 + group)
    results: dict[str, Any] = {}
    for attention in attentions:
        dit = tiny_dit()
        whole = tiny_module(copy.deepcopy(dit), attention=attention)
        whole_loss, whole_grads = lora_grads(whole, batch)
        split = tiny_module(dit, attention=attention, sequence_parallel=degree, devices=world)
        split_loss, split_grads = lora_grads(split, batch)
        results[str(attention)] = {
            "split_name": split.denoiser.split.name,
            "loss_whole": whole_loss,
            "loss_split": split_loss,
            "rel_local": max_rel(split_grads, whole_grads),  # one rank's share alone: must NOT match
            "rel": max_rel(_world_mean(split_grads, world), _world_mean(whole_grads, world)),
        }
    return results


def ring_refused(rank: int, world: int) -> str:
    """A ring split asked for gradients: the ParallelError's message."""
    from diffsynth_cog.denoise.denoiser import Denoiser
    from diffsynth_cog.parallel.layout import ParallelError, ParallelLayout
    from diffsynth_cog.parallel.mesh import build_mesh
    from diffsynth_cog.parallel.split import ParallelSplit

    mesh = build_mesh(ParallelLayout(ring=world))
    dit = tiny_dit()
    dit.requires_grad_(True)
    denoiser = Denoiser(dit, split=ParallelSplit(mesh))
    batch = tiny_batch(batch=1)
    try:
        denoiser.call_dit(batch["latents"], torch.tensor([500]), batch["prompt_emb"]).sum().backward()
    except ParallelError as e:
        return str(e)
    return "no error"


def two_rank_session(rank: int, world: int) -> tuple[dict[str, Any], str]:
    """The split step's gradients (dense and masked), then ring attention asked for gradients."""
    return sequence_parallel_grads(rank, world, 2, [None, "window:0:token", "window:0:frame"]), ring_refused(
        rank, world
    )


def train_job(rank: int, world: int, values: dict[str, Any]) -> dict[str, Any]:
    """``run_training`` of a job on this rank (Lightning finds the process group already initialised)."""
    from diffsynth_cog.training.trainer import run_training

    result = run_training(TrainConfig.from_dict(values), progress=False)
    return {
        "step": result.global_step,
        "lora": result.module.lora_weights(),
        "lora_path": None if result.lora_path is None else str(result.lora_path),
        "split": result.module.denoiser.split.name,
        "strategy": type(result.trainer.strategy).__name__,
    }


def bench_tiny(rank: int, world: int, out: str) -> dict[str, Any]:
    """benchmarks/bench_train_sp.py --tiny on this rank (the process group is already up, as under torchrun)."""
    import importlib.util
    import os
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    os.environ["OUT"] = out
    spec = importlib.util.spec_from_file_location("bench_train_sp", folder / "bench_train_sp.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_train_sp"] = bench
    spec.loader.exec_module(bench)
    return bench.main(["--tiny", "--prefix", "tiny"])
