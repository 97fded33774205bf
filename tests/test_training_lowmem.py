"""Low-memory LoRA training switches on the CPU: a frozen quantized base under the LoRA, the lean fp32
LoRA branch, checkpointed activations offloaded through saved-tensor hooks, 8-bit AdamW.

Each switch that runs on a CPU is checked two ways: its gradients against the plain path (a stated
tolerance, or bitwise where the switch changes no arithmetic), and a short Lightning run whose loss
on a fixed batch falls. fp8 needs ``torch._scaled_mm`` on a GPU; on the CPU its layers run the
emulation of the same quantized product, which the layer-level checks use (``tests/test_gpu_training.py``
runs the real kernels).
"""

from __future__ import annotations

import copy
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_training import fixed_batch_loss, tiny_config, trained_and_initial_loss, workspace  # noqa: F401  (module fixture)
from training_parallel_cases import lora_grads, max_rel, tiny_batch, tiny_dit, tiny_module

from diffsynth_cog.lora import BLOCK_LINEAR_TARGETS, LoRALinear, lora_layers
from diffsynth_cog.lora import layers as lora_layers_module
from diffsynth_cog.quantization import Float8Linear, Int8WeightLinear, dequantize_dit, quantize_dit
from diffsynth_cog.training import memory
from diffsynth_cog.training.config import TrainConfig, TrainConfigError
from diffsynth_cog.training.memory import build_optimizer, optimizer_state_bytes
from diffsynth_cog.training.trainer import run_training

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------- quantized base
@pytest.mark.parametrize("cls", [Int8WeightLinear, Float8Linear])
def test_quantized_layer_backward_gives_the_input_gradient_of_its_dequantized_weight(cls) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 48)
    layer = cls.from_linear(linear)
    x = torch.randn(2, 5, 32, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y, layer(x))  # the autograd path computes the inference product
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g @ layer.dequantized_weight(torch.float32))
    assert layer.qweight.grad is None and not layer.bias.requires_grad  # frozen: nothing else gets a gradient


def test_lora_over_an_int8_base_matches_a_lora_over_the_dequantized_weights() -> None:
    """int8 dequantizes the weight and runs F.linear: the same forward as a Linear holding the
    dequantized weight, and its backward the same matmul autograd runs, so the LoRA's gradients are
    bitwise those of the dequantized model."""
    base = tiny_dit()
    quantized = tiny_module(copy.deepcopy(base), base_quantization="int8")
    reference_dit = copy.deepcopy(base)
    quantize_dit(reference_dit, "int8")
    dequantize_dit(reference_dit, torch.float32)
    reference = tiny_module(reference_dit)

    layer = quantized.dit.blocks[0].attn1.to_q
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, Int8WeightLinear) and layer.weight is None
    keys = set(quantized.trainable_state_keys())
    assert keys == set(reference.trainable_state_keys())  # LoRA names do not depend on the base
    assert "dit.blocks.0.attn1.to_q.base.qweight" in quantized.state_dict()
    assert len(lora_layers(quantized.dit)) == 2 * len(BLOCK_LINEAR_TARGETS)

    batch = tiny_batch()
    loss_q, grads_q = lora_grads(quantized, batch)
    loss_r, grads_r = lora_grads(reference, batch)
    assert loss_q == loss_r
    assert all(torch.equal(grads_q[k], grads_r[k]) for k in grads_r)


def test_lora_over_an_fp8_base_emulated_matches_the_dequantized_weights_within_activation_rounding() -> None:
    """fp8 also rounds each activation to e4m3 in the forward (passed straight through in the backward),
    so the gradients differ from the dequantized-weight LoRA by that rounding (~3% per matmul)."""
    base = tiny_dit()
    fp8_dit = copy.deepcopy(base)
    for name, module in list(fp8_dit.named_modules()):
        if name.endswith(tuple(BLOCK_LINEAR_TARGETS)) and isinstance(module, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(fp8_dit.get_submodule(parent), child, Float8Linear.from_linear(module))  # CPU: emulated
    reference_dit = copy.deepcopy(fp8_dit)
    dequantize_dit(reference_dit, torch.float32)
    fp8, reference = tiny_module(fp8_dit), tiny_module(reference_dit)
    assert isinstance(fp8.dit.blocks[1].ff[2].base, Float8Linear)

    batch = tiny_batch()
    loss_q, grads_q = lora_grads(fp8, batch)
    loss_r, grads_r = lora_grads(reference, batch)
    # Measured over seeds 0-2: loss 0.02-0.2%, gradients 5.5-8% (e4m3 keeps 3 mantissa bits).
    assert abs(loss_q - loss_r) < 0.01 * abs(loss_r)
    assert max_rel(grads_q, grads_r) < 0.15


def test_lean_lora_branch_gradients_equal_autograd_through_an_fp32_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    for dtype, alpha in ((torch.float32, None), (torch.bfloat16, 3.0)):
        layer = LoRALinear.from_linear(torch.nn.Linear(32, 48).to(dtype), 4, alpha)
        with torch.no_grad():
            layer.lora_B.weight.normal_()
        x = torch.randn(2, 10, 32, dtype=dtype, requires_grad=True)
        g = torch.randn(2, 10, 48, dtype=dtype)
        layer(x).backward(g)
        lean = [layer.lora_A.weight.grad, layer.lora_B.weight.grad, x.grad]
        layer.zero_grad(set_to_none=True)
        x.grad = None
        # What LoRALinear computed before: autograd through x.float() (an fp32 copy saved for backward).
        out = F.linear(x, layer.weight, layer.bias) + (layer.lora_B(layer.lora_A(x.float())) * layer.scale).to(dtype)
        out.backward(g)
        plain = [layer.lora_A.weight.grad, layer.lora_B.weight.grad, x.grad]
        assert all(torch.equal(a, b) for a, b in zip(lean, plain, strict=True)), dtype
        # Inputs longer than the row chunk: the backward sums grad_A / grad_B over chunks.
        monkeypatch.setattr(lora_layers_module, "_GRAD_A_ROWS", 3)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(g)
        chunked = [layer.lora_A.weight.grad, layer.lora_B.weight.grad, x.grad]
        for a, b in zip(chunked, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)
        monkeypatch.undo()


# --------------------------------------------------------------------------------------------- activation offload
@pytest.mark.parametrize("mode", ["stream", "save_on_cpu"])
def test_activation_offload_keeps_gradients_bitwise(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "OFFLOAD_MIN_BYTES", 0)  # the tiny model's tensors are all small
    plain = tiny_module(tiny_dit())
    offloaded = tiny_module(tiny_dit(), activation_offload=mode)
    batch = tiny_batch()
    loss_p, grads_p = lora_grads(plain, batch)
    loss_o, grads_o = lora_grads(offloaded, batch)
    assert loss_p == loss_o
    assert all(torch.equal(grads_p[k], grads_o[k]) for k in grads_p)


def test_stream_offload_hands_every_checkpointed_input_back_and_dies_with_the_graph(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory, "OFFLOAD_MIN_BYTES", 0)
    module = tiny_module(tiny_dit(), activation_offload="stream")
    made: list[weakref.ref] = []
    original = memory.StreamOffload.__enter__
    monkeypatch.setattr(
        memory.StreamOffload, "__enter__", lambda self: made.append(weakref.ref(self)) or original(self)
    )
    loss = module.batch_loss(tiny_batch(), step=3)
    offload = made[0]()
    # Gradient checkpointing leaves each block's inputs saved (video, text, timestep conditioning):
    # those went to the hooks.
    assert len(offload.saved) >= 3 * len(module.dit.blocks)
    assert not any(entry.used for entry in offload.saved)
    saved = list(offload.saved)
    del offload
    loss.backward()
    assert all(entry.used and entry.fetched is None for entry in saved)  # each handed back once, none left
    del loss, saved
    # Freed with the autograd graph, without waiting for the cyclic garbage collector: a step's pinned
    # copies are released before the next step allocates its own.
    assert made[0]() is None


def test_stream_offload_without_checkpointing_offloads_every_saved_activation(monkeypatch) -> None:
    monkeypatch.setattr(memory, "OFFLOAD_MIN_BYTES", 0)
    plain = tiny_module(tiny_dit(), gradient_checkpointing=False)
    offloaded = tiny_module(tiny_dit(), gradient_checkpointing=False, activation_offload="stream")
    batch = tiny_batch()
    _, grads_p = lora_grads(plain, batch)
    _, grads_o = lora_grads(offloaded, batch)
    assert all(torch.equal(grads_p[k], grads_o[k]) for k in grads_p)


# --------------------------------------------------------------------------------------------- optimizer
def test_8bit_adamw_keeps_8bit_moments_and_follows_adamw() -> None:
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    start = [torch.randn(256, 128), torch.randn(128, 256)]
    runs = {}
    for name in ("adamw", "adamw8bit"):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = build_optimizer(params, name, lr=1e-2, weight_decay=0.01)
        for step in range(10):
            g = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) + 0.1 * p.detach()
            optimizer.step()
        runs[name] = (params, optimizer)
    (full, full_opt), (quant, quant_opt) = runs["adamw"], runs["adamw8bit"]
    moments = [v for s in quant_opt.state.values() for k, v in s.items() if k in ("state1", "state2")]
    assert moments and all(m.dtype == torch.uint8 for m in moments)
    assert optimizer_state_bytes(quant_opt) < 0.3 * optimizer_state_bytes(full_opt)
    for a, b, s in zip(quant, full, start, strict=True):
        moved = (b - s).norm()
        # Measured: after 10 steps the 8-bit run differs from AdamW's by 1.2% of the distance moved.
        assert (a - b).norm() < 0.05 * moved


def test_memory_switch_fields_are_checked_with_what_to_do() -> None:
    base = {"model": "m", "cache_dir": "c", "output_dir": "o"}
    cases = {
        "base_quantization": ({"base_quantization": "nf4"}, r"base_quantization: expected one of \['none', 'fp8'"),
        "fp8 on cpu": ({"base_quantization": "fp8", "accelerator": "cpu"}, "use 'int8' on a CPU"),
        "deepspeed": (
            {"base_quantization": "int8", "strategy": "deepspeed_stage_2"},
            "quantized base weight.*use strategy 'auto'",
        ),
        "offload": ({"activation_offload": "disk"}, r"activation_offload: expected one of"),
        "optimizer": (
            {"optimizer": "adamw8bit", "strategy": "deepspeed_stage_2", "offload_optimizer": True},
            "'adamw8bit' cannot be combined with offload_optimizer",
        ),
        "image_noise": ({"image_noise": [-3.0, -1.0]}, r"image_noise: expected \[mean, std\]"),
        "image_dropout": ({"image_dropout": 1.0}, r"image_dropout: expected a number in \[0, 1\)"),
    }
    for what, (values, message) in cases.items():
        with pytest.raises(TrainConfigError, match=message):
            TrainConfig.from_dict({**base, **values}, source=what)
    config = TrainConfig.from_dict({**base, "image_noise": None, "optimizer": "adamw8bit"})
    assert TrainConfig.from_dict(config.to_dict()) == config


# --------------------------------------------------------------------------------------------- whole runs
@pytest.mark.slow
def test_int8_base_offloaded_activations_and_8bit_adamw_train_the_tiny_model(
    workspace: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every switch that runs on a CPU, together, through Lightning: the loss on a fixed batch falls as
    the plain run's does (test_training.py: below half within 30 steps), and checkpoints still load
    with ``weights_only=True`` (8-bit optimizer state included)."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(memory, "OFFLOAD_MIN_BYTES", 0)
    config = tiny_config(
        workspace,
        tmp_path / "run",
        cache_dir=str(workspace["cache1"]),
        max_steps=30,
        lora_rank=8,
        checkpoint_every_n_steps=15,
        base_quantization="int8",
        activation_offload="stream",
        optimizer="adamw8bit",
    )
    result = run_training(config, progress=False, export=False)
    module = result.module
    assert isinstance(module.dit.blocks[0].ff[0].base, Int8WeightLinear)
    after, before = trained_and_initial_loss(module, lambda m: fixed_batch_loss(m, workspace["cache1"]))
    assert after < 0.5 * before, (before, after)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "step0000015.ckpt", weights_only=True)
    assert all(".base." not in k for k in checkpoint["state_dict"])  # LoRA only, no quantized base

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)

    states = list(tensors(checkpoint["optimizer_states"][0]["state"]))
    assert any(t.dtype == torch.uint8 for t in states)  # bitsandbytes' 8-bit moments, saved and loadable


def test_training_benchmark_runs_its_tiny_cpu_smoke_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/bench_train.py --tiny: the script the GPU runs, proven end to end on the CPU."""
    import importlib.util
    import json
    import sys

    pytest.importorskip("bitsandbytes")
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(memory, "OFFLOAD_MIN_BYTES", memory.OFFLOAD_MIN_BYTES)  # restored after the run
    spec = importlib.util.spec_from_file_location("bench_train", folder / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_train", bench)
    spec.loader.exec_module(bench)
    argv = ["--tiny", "--mode", "switches", "curve", "--variants", "baseline", "int8+stream+adam8bit", "recipe"]
    results = bench.main([*argv, "--steps", "1", "--curve-steps", "4"])
    switches = json.loads((tmp_path / "bench_train_switches.json").read_text())
    assert list(switches["runs"]) == ["baseline", "int8+stream+adam8bit"]  # recipe (fp8) skipped on the CPU
    combined = switches["runs"]["int8+stream+adam8bit"]
    assert combined["config"] == {"base_quantization": "int8", "activation_offload": "stream", "optimizer": "adamw8bit"}
    assert len(combined["step_times_s"]) == 2 and "step_vs_baseline" in combined
    curve = results["curve"]["runs"]["int8+stream+adam8bit"]
    assert len(curve["losses"]) == 4 and curve["rel_diff_per_step_mean"] < 0.05
    assert (tmp_path / "bench_train_curve.csv").read_text().count("\n") == 1 + 2 * 4
