"""Low-memory LoRA training switches on a CUDA GPU: the fp8 base's real kernels, activation offload on a side
stream (gradients bitwise, memory down), 8-bit AdamW's CUDA kernels.

Skipped without a CUDA GPU (CI has none); run on the GPU machine (bitsandbytes carried as a wheel):

    python -m pytest -q tests/test_gpu_training.py
"""

from __future__ import annotations

import copy

import pytest
import torch

from diffsynth_cog.configs import DiTConfig, dit_preset
from diffsynth_cog.lora import lora_parameters
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.quantization import Float8Linear, dequantize_dit
from diffsynth_cog.schedulers import scheduler_preset
from diffsynth_cog.training.config import TrainConfig
from diffsynth_cog.training.memory import build_optimizer
from diffsynth_cog.training.module import CogLoRAModule

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
fp8 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU of compute capability >= 8.9",
)


def small_config(layers: int = 4) -> DiTConfig:
    """5B-shaped blocks (RoPE, 48 heads x 64), fewer of them: the real layer sizes, a small model."""
    return DiTConfig.from_dict({**dit_preset("cogvideox-5b").to_dict(), "num_layers": layers})


def module_for(dit: CogDiT, **changes) -> CogLoRAModule:
    config = TrainConfig(
        model="unused", cache_dir="unused", output_dir="unused", precision="bf16", accelerator="gpu", **changes
    )
    module = CogLoRAModule(config, dit=dit, scheduler_config=scheduler_preset("cogvideox-5b")).cuda()
    module.setup("fit")
    module.configure_model()
    with torch.no_grad():
        for p in lora_parameters(module.dit):
            if p.abs().max() == 0:
                p.normal_(0, 1e-3, generator=torch.Generator("cuda").manual_seed(p.numel()))
    return module


def batch(frames: int = 13) -> dict[str, torch.Tensor]:
    """One 480x720 clip of ``frames`` frames (random latents) and a random prompt embedding."""
    g = torch.Generator("cuda").manual_seed(0)
    t = (frames - 1) // 4 + 1
    x0 = torch.randn(1, 16, t, 60, 90, device="cuda", generator=g)
    emb = torch.randn(1, 226, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    return {"latents": x0, "prompt_emb": emb}


def grads(module: CogLoRAModule, data: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor], float]:
    for p in module.parameters():
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = module.batch_loss(data, step=1)
    loss.backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return loss.item(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}, peak


def dit(layers: int = 4) -> CogDiT:
    torch.manual_seed(0)
    with torch.device("cuda"):
        return CogDiT(small_config(layers)).to(torch.bfloat16)


@cuda
@pytest.mark.parametrize("mode", ["stream", "save_on_cpu"])
def test_activation_offload_on_cuda_gives_the_same_gradients_with_less_memory(mode: str) -> None:
    data = batch(49)  # 13 latent frames: 17,550 video tokens
    plain = module_for(dit(6))
    loss_p, grads_p, peak_p = grads(plain, data)
    _, again, _ = grads(plain, data)
    del plain
    offloaded = module_for(dit(6), activation_offload=mode)
    loss_o, grads_o, peak_o = grads(offloaded, data)
    assert loss_p == loss_o  # the forward is untouched
    # The offloaded copies are exact, so the gradients are those of the plain run up to the GPU's own
    # run-to-run differences (attention backward kernels may accumulate in any order): bitwise where
    # two plain runs are, else within a few times that noise or 1e-4 of the gradient's scale (one pair of
    # runs samples the noise only roughly: seen on an H200, 1.7e-10 against a plain pair's 7.5e-11 on a
    # gradient of scale ~4e-6). A wrong offloaded tensor moves gradients by their own scale.
    for k in grads_p:
        noise = (again[k].float() - grads_p[k].float()).abs().max().item()
        scale = grads_p[k].float().abs().max().item()
        bound = 0.0 if noise == 0 else max(4 * noise, 1e-4 * scale)
        assert (grads_o[k].float() - grads_p[k].float()).abs().max().item() <= bound, k
    # 6 blocks x 17,550 x 3072 bf16 = 0.6 GiB of checkpointed video inputs; at the backward's start all
    # but the last block's (and one prefetched) are in CPU memory.
    assert peak_o < peak_p - 0.25, (peak_p, peak_o)


@fp8
def test_fp8_base_lora_on_cuda_tracks_the_dequantized_base() -> None:
    base = dit(4)
    reference_dit = copy.deepcopy(base)
    quantized = module_for(base, base_quantization="fp8")
    layer = quantized.dit.blocks[0].ff[0]
    assert isinstance(layer.base, Float8Linear)
    # The reference: the same fp8 codes, dequantized to bf16 Linear layers (no activation rounding).
    from diffsynth_cog.quantization import quantize_dit

    quantize_dit(reference_dit, "fp8")
    dequantize_dit(reference_dit, torch.bfloat16)
    reference = module_for(reference_dit)
    data = batch()
    loss_q, grads_q, _ = grads(quantized, data)
    loss_r, grads_r, _ = grads(reference, data)
    assert abs(loss_q - loss_r) < 0.02 * abs(loss_r)
    worst = max(((grads_q[k].float() - grads_r[k].float()).norm() / grads_r[k].float().norm()).item() for k in grads_r)
    assert worst < 0.15, worst


@cuda
def test_8bit_adamw_steps_on_cuda() -> None:
    pytest.importorskip("bitsandbytes")
    param = torch.nn.Parameter(torch.randn(64, 3072, device="cuda"))
    optimizer = build_optimizer([param], "adamw8bit", lr=1e-3, weight_decay=0.01)
    start = param.detach().clone()
    param.grad = torch.randn_like(param)
    optimizer.step()
    state = optimizer.state[param]
    assert state["state1"].dtype == torch.uint8 and state["state1"].is_cuda
    assert not torch.equal(param.detach(), start)
