"""LoRA post-training step at full CogVideoX-5B size (random weights), ours and diffusers + peft.

Frozen bf16 base, fp32 LoRA parameters, gradient checkpointing per block, AdamW over the LoRA
parameters, batch 1. The reference is REFERENCE.md's recipe (diffusers + peft, rank 128 on
to_q/to_k/to_v/to_out.0, autocast bf16); ours runs the same math through ``inject_lora`` and the
v-prediction loss, with two LoRA layouts: the reference's (rank 128 on q/k/v/out) and ExVideo's
(rank 64 on all eight Linear layers of each block).

    python benchmarks/bench_train.py --frames 129 --steps 2
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, peak_gib, reset_peak, timed, write_json  # noqa: E402

from diffsynth_cog.configs import dit_preset  # noqa: E402
from diffsynth_cog.lora import BLOCK_LINEAR_TARGETS, inject_lora, lora_parameters  # noqa: E402
from diffsynth_cog.models.dit import CogDiT  # noqa: E402
from diffsynth_cog.schedulers import add_noise, alphas_cumprod, scheduler_preset, v_prediction_loss  # noqa: E402

logger = logging.getLogger("bench_train")

LAYOUTS = {
    "r128_qkvo": {t: (128, 128) for t in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out")},
    "r64_all8": {t: (64, 64) for t in BLOCK_LINEAR_TARGETS},
}


def inputs(c, frames: int, device: str):
    t = (frames - 1) // c.temporal_compression_ratio + 1
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(1, c.out_channels, t, c.sample_height, c.sample_width, device=device, generator=g)
    ctx = torch.randn(1, c.max_text_seq_length, c.text_embed_dim, device=device, generator=g, dtype=torch.bfloat16)
    return x0, ctx


def bench_ours(layout: str, frames: int, steps: int, device: str) -> dict:
    c = dit_preset("cogvideox-5b")
    torch.manual_seed(0)
    with torch.device(device):
        dit = CogDiT(c).to(torch.bfloat16)
    inject_lora(dit, LAYOUTS[layout])
    dit.enable_gradient_checkpointing()
    dit.train()
    params = lora_parameters(dit)
    opt = torch.optim.AdamW(params, lr=1e-5)
    alphas = alphas_cumprod(scheduler_preset("cogvideox-5b")).float().to(device)
    x0, ctx = inputs(c, frames, device)

    def step():
        t = torch.full((1,), 500, device=device, dtype=torch.long)
        noise = torch.randn_like(x0)
        x_t = add_noise(x0, noise, t, alphas)
        v = dit(x_t, t, ctx)
        loss = v_prediction_loss(v.float(), x0, x_t, t, alphas)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak()
    tm = timed(step, warmup=1, repeat=steps)
    out = {**tm, "peak_GiB": round(peak_gib(), 2), "lora_params": sum(p.numel() for p in params)}
    return out  # the model and optimizer die with this frame; main() collects them


def bench_reference(frames: int, steps: int, device: str) -> dict:
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from peft import LoraConfig

    c = dit_preset("cogvideox-5b")
    cfg = {k: v for k, v in c.to_dict().items() if k != "rope_theta"}
    torch.manual_seed(0)
    with torch.device(device):
        model = CogVideoXTransformer3DModel(**cfg).to(torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=128, lora_alpha=128, init_lora_weights=True, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    x0, ctx = inputs(c, frames, device)
    t_lat = x0.shape[2]
    rope = get_3d_rotary_pos_embed(64, ((0, 0), (30, 45)), (30, 45), t_lat, device=device)
    x = x0.transpose(1, 2).to(torch.bfloat16)
    ts = torch.full((1,), 500, device=device, dtype=torch.long)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(
                hidden_states=x, encoder_hidden_states=ctx, timestep=ts, image_rotary_emb=rope, return_dict=False
            )[0]
        loss = out.float().pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak()
    tm = timed(step, warmup=1, repeat=steps)
    out = {**tm, "peak_GiB": round(peak_gib(), 2), "lora_params": sum(p.numel() for p in params)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=129)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--json", default="bench_train.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = {**environment(), "frames": args.frames, "runs": {}}
    for layout in args.layouts:
        result["runs"][f"ours_{layout}"] = bench_ours(layout, args.frames, args.steps, "cuda")
        logger.info("ours %s: %s", layout, result["runs"][f"ours_{layout}"])
        gc.collect()
        torch.cuda.empty_cache()
        write_json(args.json, result)
    if not args.no_reference:
        result["runs"]["reference_r128_qkvo"] = bench_reference(args.frames, args.steps, "cuda")
        logger.info("reference: %s", result["runs"]["reference_r128_qkvo"])
    write_json(args.json, result)
    logger.info("done: %s", result)


if __name__ == "__main__":
    main()
