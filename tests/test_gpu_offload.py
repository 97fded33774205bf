"""Offloading on a GPU: every order of (offload, quantize, LoRA merge, LoRA inject, LoRA clear) gives
the output of no offloading bit for bit, and each parameter is where it should be (a pinned CPU home
outside ``using``, a CUDA copy inside).

Skipped without CUDA (CI has none). Run on a GPU machine (about a minute):

    python -m pytest -q tests/test_gpu_offload.py tests/test_quantization.py

Why bit for bit. Every forward runs on the GPU either way, with the same kernels. What changes with
offloading is where the operations done *after* enabling it run: on the CPU, where the weights then
live. Each of them gives the same bits on either device: merging, restoring and loading LoRA values
(the test's LoRA values are multiples of 1/8, so a merge is exact) and quantizing (see "Same bits on
every device" in ``diffsynth_cog.quantization.layers``; tests/test_quantization.py checks it on the CPU and,
with a GPU, compares the devices directly).

When something differs, the test goes on through all orders and then fails once, naming every
failing order with: how many output elements differ, the first differing index and both values
(with their bits), the relative error, and the first model tensor (parameter or buffer, by name)
whose bits differ between the offloaded run and the run without offloading. "All tensors equal"
points at the forward (the offloader's device copies, a kernel); a quantized layer's ``qweight`` or
``weight_scale`` points at quantization on the CPU. The run without offloading is repeated once to
rule out a nondeterministic kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cuda_semantics import bit_difference
from offload_cases import (
    apply,
    check_at_home,
    check_on_device,
    check_streamed_forward,
    dit_inputs,
    make_dit,
    merge_state_dict,
    orders,
    run_dit,
    tensors,
)
from safetensors.torch import save_file
from torch import nn

from diffsynth_cog.lora import inject_lora, load_lora_state_dict
from diffsynth_cog.pipeline.offload import ModelOffloader
from diffsynth_cog.quantization import FP8_MIN_CAPABILITY, quantize_dit

DEVICE = torch.device("cuda")
PINNED = True  # the offloader pins the CPU homes when the device is CUDA
DTYPE = torch.bfloat16
MODES = ("model", "sequential")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= FP8_MIN_CAPABILITY


QUANTIZE = [
    "int8",
    pytest.param("fp8", marks=pytest.mark.skipif(not _fp8_capable(), reason="fp8 needs compute capability >= 8.9")),
]


def model_tensors(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """name -> a CPU copy of every parameter and buffer (tied ones once), for comparing two runs."""
    return {f"{key}.{name}": t.detach().to("cpu", copy=True) for key, m in models.items() for name, _, t in tensors(m)}


def first_tensor_difference(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    if list(got) != list(expected):
        only_got, only_expected = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
        return f"other tensors: only in the offloaded run {only_got[:5]}, only without offloading {only_expected[:5]}"
    for name, t in expected.items():
        if (difference := bit_difference(got[name], t)) is not None:
            return f"first differing tensor {name}: {difference}"
    return "all parameters and buffers have the same bits (the difference is in the forward)"


def report(title: str, failed: list[str]) -> None:
    if failed:
        pytest.fail(f"{title}: {len(failed)} failure(s)\n" + "\n".join(failed), pytrace=False)


def _dit_run(order, mode: str, quantize: str, x):
    """The operations in order on a fresh tiny DiT, then one forward inside ``using("dit")``."""
    dit = make_dit(dtype=DTYPE, device=DEVICE)
    offloader = ModelOffloader(DEVICE, "none")
    offloader.register({"dit": dit})
    for op in order:
        apply(op, dit, offloader, mode, quantize)
    return run_dit(dit, offloader, x), dit, offloader


@cuda
@pytest.mark.parametrize("quantize", QUANTIZE)
@pytest.mark.parametrize("mode", MODES)
def test_dit_every_order_gives_the_bits_of_no_offload_and_weights_live_where_expected(mode, quantize):
    x = dit_inputs(make_dit(), DEVICE, DTYPE)
    without_offload: dict[tuple[str, ...], tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
    failed = []
    for order in orders():
        without = tuple(op for op in order if op != "offload")
        if without not in without_offload:
            out, dit, _ = _dit_run(without, "none", quantize, x)
            without_offload[without] = out, model_tensors({"dit": dit})
        expected, expected_tensors = without_offload[without]
        got, dit, offloader = _dit_run(order, mode, quantize, x)
        if (difference := bit_difference(got, expected)) is not None:
            where = first_tensor_difference(model_tensors({"dit": dit}), expected_tensors)
            failed.append(f"{order}: output {difference}; {where}")
        try:
            check_at_home(offloader, dit, pinned=PINNED)
            if mode == "model":
                with offloader.using("dit"):
                    check_on_device(offloader, dit, DEVICE, compare_values=False)
        except AssertionError as e:
            failed.append(f"{order}: placement: {e}")
    first = next(iter(without_offload))
    if (difference := bit_difference(_dit_run(first, "none", quantize, x)[0], without_offload[first][0])) is not None:
        failed.append(f"{first} without offloading, run twice: {difference} (a nondeterministic kernel)")
    if mode == "sequential":
        try:  # the last order's model: quantized, merged, injected, restored
            check_streamed_forward(offloader, dit, DEVICE, DTYPE)
            check_at_home(offloader, dit, pinned=PINNED)
        except AssertionError as e:
            failed.append(f"{order}: streamed forward: {e}")
    report(f"DiT, {mode} offload, {quantize}, {len(orders())} orders vs the same order without offloading", failed)


# ----------------------------------------------------------------------------------------------
# The whole pipeline: text encoder (tied T5 embedding), DiT, VAE decode.

PIPELINE_ORDERS = [
    ("offload", "quantize", "merge", "inject", "clear"),
    ("quantize", "offload", "merge", "clear", "inject"),
    ("merge", "inject", "offload", "quantize", "clear"),
    ("merge", "quantize", "clear", "inject", "offload"),
]
CALL = dict(prompt="a red fox", height=32, width=48, num_frames=9, num_inference_steps=2, output_type="np")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_models import save_tiny_model_folder

    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b"), "cogvideox-5b", seed=4)


@pytest.fixture(scope="module")
def lora_file(folder, tmp_path_factory):
    from diffsynth_cog import ModelManager

    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.load_models([folder])
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    save_file(merge_state_dict(manager.fetch_model("cog_dit", require=True)), str(path))
    return path


def _pipeline_op(op: str, pipe, manager, mode: str, quantize: str, lora_file) -> None:
    if op == "offload":
        pipe.enable_model_cpu_offload() if mode == "model" else pipe.enable_sequential_cpu_offload()
    elif op == "quantize":
        quantize_dit(pipe.dit, quantize)
    elif op == "merge":
        manager.load_lora(lora_file)
    elif op == "inject":
        from offload_cases import INJECTED, inject_state_dict

        inject_lora(pipe.dit, [INJECTED], rank=2)
        load_lora_state_dict(pipe.dit, inject_state_dict(pipe.dit))
    elif op == "clear":
        manager.clear_loras()


def _pipeline_run(folder, lora_file, order, mode, quantize, latents, check=None):
    """A fresh pipeline, the operations in order, one call; ``check(pipe)`` runs after every step.
    Returns the video as a tensor and the pipeline."""
    from diffsynth_cog import CogVideoPipeline, ModelManager

    manager = ModelManager(torch_dtype=DTYPE, device=DEVICE)
    manager.load_models([folder])
    pipe = CogVideoPipeline.from_model_manager(manager)
    for op in order:
        _pipeline_op(op, pipe, manager, mode, quantize, lora_file)
    callback = None if check is None else (lambda i, t, z: check(pipe))
    video = pipe(latents=latents.clone(), progress_bar=False, callback=callback, **CALL)
    return torch.from_numpy(np.ascontiguousarray(video)), pipe


@cuda
@pytest.mark.parametrize("quantize", QUANTIZE)
@pytest.mark.parametrize("mode", MODES)
def test_pipeline_orders_give_the_bits_of_no_offload_and_weights_live_where_expected(folder, lora_file, mode, quantize):
    latents = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(2))

    def inside_dit_block(pipe) -> None:
        # The step callback runs inside ``using("dit")``: the other models are at home, the DiT is
        # on the GPU (model mode) or at home between its layers' forwards (sequential mode).
        for other in (pipe.text_encoder, pipe.vae_decoder):
            check_at_home(pipe.offloader, other, pinned=PINNED)
        if mode == "model":
            check_on_device(pipe.offloader, pipe.dit, DEVICE, compare_values=False)
        else:  # the 5B DiT's root owns no tensors: all of them are streamed
            check_at_home(pipe.offloader, pipe.dit, pinned=PINNED)

    failed = []
    for i, order in enumerate(PIPELINE_ORDERS):
        without = tuple(op for op in order if op != "offload")
        expected, expected_pipe = _pipeline_run(folder, lora_file, without, "none", quantize, latents)
        if i == 0:
            again, _ = _pipeline_run(folder, lora_file, without, "none", quantize, latents)
            if (difference := bit_difference(again, expected)) is not None:
                failed.append(f"{without} without offloading, run twice: {difference} (a nondeterministic kernel)")
        try:
            got, pipe = _pipeline_run(folder, lora_file, order, mode, quantize, latents, inside_dit_block)
        except AssertionError as e:
            failed.append(f"{order}: placement inside the DiT block: {e}")
            continue
        if (difference := bit_difference(got, expected)) is not None:
            where = first_tensor_difference(model_tensors(pipe.models()), model_tensors(expected_pipe.models()))
            failed.append(f"{order}: video {difference}; {where}")
        for name, model in pipe.models().items():
            try:
                check_at_home(pipe.offloader, model, pinned=PINNED)
            except AssertionError as e:
                failed.append(f"{order}: placement of {name} after the call: {e}")
    report(
        f"pipeline, {mode} offload, {quantize}, {len(PIPELINE_ORDERS)} orders vs the same without offloading", failed
    )


@cuda
def test_to_host_copies_a_cuda_tensor_into_pinned_memory_exactly() -> None:
    from diffsynth_cog.pipeline.offload import to_host

    t = torch.randn(3, 5, 7, device="cuda").to(torch.bfloat16)
    host = to_host(t)
    assert host.device.type == "cpu" and host.is_pinned() and host.dtype == t.dtype
    assert torch.equal(host, t.cpu())
    t.add_(1)  # a copy: later writes to the device tensor do not reach it
    assert not torch.equal(host, t.cpu())
