"""Shared by the CPU and GPU offload tests: a tiny DiT, the layer-replacing operations, and checks of
where every parameter lives.

The operations touch disjoint or deliberately overlapping layers so that every order is valid:
``quantize`` swaps the block Linear layers for int8 (or fp8) ones; ``merge`` folds a LoRA into
``text_proj`` and ``proj_out``; ``inject`` wraps ``proj_out`` in a LoRALinear (the same weight
Parameter the merge edits) and loads non-zero A/B; ``clear`` restores the merged base weights.
LoRA values are multiples of 1/8 and the scale is 1, so a merge is exact in fp32 and gives the same
bits on any device.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from tiny_models import PRESET_FLAGS, TINY_DIT, randomize_
from torch import nn

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.lora import inject_lora, load_lora_state_dict, merge_lora, restore_base_weights
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.pipeline.offload import ModelOffloader
from diffsynth_cog.quantization import quantize_dit

# The I2V preset has a learned position table on the DiT's root: the one tensor that sequential
# mode keeps on the device for a whole ``using`` block.
PRESET = "cogvideox-5b-i2v"
OPS = ("offload", "quantize", "merge", "inject", "clear")
MERGED = ("text_proj", "proj_out")
INJECTED = "proj_out"


def make_dit(seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> CogDiT:
    config = DiTConfig(**{**TINY_DIT, **PRESET_FLAGS[PRESET]})
    return randomize_(CogDiT(config), seed).eval().to(device=device, dtype=dtype)


def dit_inputs(dit: CogDiT, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c = dit.config
    frames = (c.sample_frames - 1) // c.temporal_compression_ratio + 1  # the learned table's length
    latents = torch.randn(2, c.in_channels, frames, c.sample_height, c.sample_width, generator=g)
    prompt = torch.randn(2, c.max_text_seq_length, c.text_embed_dim, generator=g)
    return latents.to(device, dtype), torch.tensor([999, 421], device=device), prompt.to(device, dtype)


def _dyadic(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(-4, 5, shape, generator=generator).float() / 8


def merge_state_dict(dit: nn.Module, rank: int = 2) -> dict[str, torch.Tensor]:
    """A DiffSynth-layout LoRA for ``MERGED`` (scale 1, exact values)."""
    g = torch.Generator().manual_seed(11)
    sd = {}
    for name in MERGED:
        layer = dit.get_submodule(name)
        sd[f"{name}.lora_A.default.weight"] = _dyadic(rank, layer.in_features, generator=g)
        sd[f"{name}.lora_B.default.weight"] = _dyadic(layer.out_features, rank, generator=g)
    return sd


def inject_state_dict(dit: nn.Module, rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    layer = dit.get_submodule(INJECTED)
    return {
        f"{INJECTED}.lora_A.weight": _dyadic(rank, layer.in_features, generator=g),
        f"{INJECTED}.lora_B.weight": _dyadic(layer.out_features, rank, generator=g),
    }


def apply(op: str, dit: CogDiT, offloader: ModelOffloader, mode: str, quantize: str = "int8") -> None:
    """One operation; ``offload`` switches the offloader to ``mode``."""
    if op == "offload":
        offloader.set_mode(mode)
    elif op == "quantize":
        quantize_dit(dit, quantize)
    elif op == "merge":
        merge_lora(dit, merge_state_dict(dit))
    elif op == "inject":
        inject_lora(dit, [INJECTED], rank=2, generator=torch.Generator(dit.proj_out.weight.device).manual_seed(0))
        load_lora_state_dict(dit, inject_state_dict(dit))
    elif op == "clear":
        restore_base_weights(dit)
    else:
        raise ValueError(op)


def orders(ops: Sequence[str] = OPS) -> list[tuple[str, ...]]:
    return list(itertools.permutations(ops))


def run_dit(dit: CogDiT, offloader: ModelOffloader, x) -> torch.Tensor:
    with offloader.using("dit"), torch.no_grad():
        return dit(*x)


def tensors(model: nn.Module) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(qualified name, owning module, tensor) for every parameter and buffer, tied ones once."""
    out, seen = [], set()
    for module_name, module in model.named_modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t not in seen:  # a set of tensors compares by identity; all are alive here
                seen.add(t)
                out.append((f"{module_name}.{name}".lstrip("."), module, t))
    return out


def check_at_home(offloader: ModelOffloader, model: nn.Module, pinned: bool = False) -> None:
    """Outside ``using``: every tensor has a CPU home and its data is that home (no other copy)."""
    for name, _, t in tensors(model):
        home = offloader.home_of(t)
        assert home is not None, f"{name}: no home"
        assert home.device.type == "cpu", f"{name}: home on {home.device}"
        assert t.device.type == "cpu" and t.data_ptr() == home.data_ptr(), f"{name}: data is not its home"
        if pinned:
            assert home.is_pinned(), f"{name}: home not pinned"


def check_on_device(
    offloader: ModelOffloader,
    model: nn.Module,
    device: torch.device,
    only: Sequence[nn.Module] | None = None,
    compare_values: bool = True,
) -> None:
    """Inside ``using``: the tensors (of ``only`` modules, default all) are device copies of their homes."""
    for name, module, t in tensors(model):
        if only is not None and not any(module is m for m in only):
            continue
        home = offloader.home_of(t)
        assert home is not None, f"{name}: no home"
        assert t.device.type == device.type, f"{name}: on {t.device}, expected {device}"
        assert t.data_ptr() != home.data_ptr(), f"{name}: the home itself is in use, not a device copy"
        if compare_values:
            assert torch.equal(t.cpu(), home), f"{name}: device copy differs from its home"


def check_streamed_forward(
    offloader: ModelOffloader, dit: CogDiT, device: torch.device, dtype: torch.dtype = torch.float32
) -> list[nn.Module]:
    """Sequential mode, one forward inside ``using``: the root's own tensors are on the device for
    the whole block; every other module's tensors are at home, except during that module's forward,
    where they are device copies. Returns the modules seen streamed (all that own tensors)."""
    owners = [m for m in dit.modules() if m is not dit and (m._parameters or m._buffers)]
    streamed = []

    def during_forward(module: nn.Module, args, output) -> None:
        # Global forward hooks run before the module's own, i.e. before the offloader sends it home.
        if any(module is m for m in owners):
            check_on_device(offloader, module, device, only=[module])
            streamed.append(module)

    with offloader.using("dit"):
        check_on_device(offloader, dit, device, only=[dit])
        for name, module, t in tensors(dit):
            if module is not dit:
                home = offloader.home_of(t)
                assert home is not None and t.data_ptr() == home.data_ptr(), f"{name}: not at home outside its forward"
        handle = nn.modules.module.register_module_forward_hook(during_forward)
        try:
            with torch.no_grad():
                dit(*dit_inputs(dit, device, dtype))
        finally:
            handle.remove()
    not_streamed = [type(m).__name__ for m in owners if not any(m is s for s in streamed)]
    assert not not_streamed, f"ran without their weights streamed: {not_streamed}"
    return streamed
