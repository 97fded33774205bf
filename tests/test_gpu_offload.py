"""Offloading on a GPU: every order of (offload, quantize, LoRA merge, LoRA inject, LoRA clear) gives
the output of no offloading, and each parameter is where it should be (a pinned CPU home outside
``using``, a CUDA copy inside).

Skipped without CUDA (CI has none). Run on a GPU machine (well under a minute):

    python -m pytest -q tests/test_gpu_offload.py

What "the same output" means. Every forward runs on the GPU either way, with the same kernels. What
changes with offloading is where the operations done *after* enabling it run: on the CPU, where the
weights then live. Merging, restoring and loading LoRA values give the same bits anywhere (the test's
LoRA values are multiples of 1/8, so a merge is exact). Quantizing does not quite: its per-channel
scale is ``amax / 127`` (``/ 448`` for fp8), and CUDA divides by a Python scalar as a multiplication
by its reciprocal, which can differ from the CPU's exact division in the last bit. So:

* when quantizing happened before offloading (on the GPU), the output equals no offloading bit for bit;
* when it happened after, the output equals bit for bit a run without the offloader in which the
  model was moved with ``.to("cpu")`` at that point and back with ``.to("cuda")`` to run (what the
  offloader must reproduce), and is within quantization-scale rounding of the all-GPU run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
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
)
from safetensors.torch import save_file

from diffsynth_cog.lora import inject_lora, load_lora_state_dict
from diffsynth_cog.offload import ModelOffloader
from diffsynth_cog.quantization import FP8_MIN_CAPABILITY, quantize_dit

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
MODES = ("model", "sequential")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= FP8_MIN_CAPABILITY


QUANTIZE = [
    "int8",
    pytest.param("fp8", marks=pytest.mark.skipif(not _fp8_capable(), reason="fp8 needs compute capability >= 8.9")),
]


def _pinned() -> bool:
    return DEVICE.type == "cuda"


def _quantized_on_cpu(order: tuple[str, ...]) -> bool:
    return "offload" in order and "quantize" in order and order.index("quantize") > order.index("offload")


def rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()


# Quantization-scale rounding: a 1-ulp scale difference flips the odd int8/fp8 code by one step.
CLOSE = 1e-2


def _dit_run(order, mode: str, quantize: str, x, moved_by_hand: bool = False):
    """The operations in order on a fresh tiny DiT, then one forward inside ``using("dit")``.

    moved_by_hand: no offloading; ``offload`` means ``dit.to("cpu")`` and the DiT goes back to the
    GPU before the forward.
    """
    dit = make_dit(dtype=DTYPE, device=DEVICE)
    offloader = ModelOffloader(DEVICE, "none")
    offloader.register({"dit": dit})
    for op in order:
        if op == "offload" and moved_by_hand:
            dit.to("cpu")
        else:
            apply(op, dit, offloader, mode, quantize)
    if moved_by_hand:
        dit.to(DEVICE)
    return run_dit(dit, offloader, x), dit, offloader


@cuda
@pytest.mark.parametrize("quantize", QUANTIZE)
@pytest.mark.parametrize("mode", MODES)
def test_dit_every_order_matches_no_offload_and_weights_live_where_expected(mode, quantize):
    x = dit_inputs(make_dit(), DEVICE, DTYPE)
    on_gpu: dict[tuple[str, ...], torch.Tensor] = {}
    failed = []
    for order in orders():
        without = tuple(op for op in order if op != "offload")
        if without not in on_gpu:
            on_gpu[without] = _dit_run(without, "none", quantize, x)[0]
        got, dit, offloader = _dit_run(order, mode, quantize, x)
        if _quantized_on_cpu(order):
            by_hand = _dit_run(order, mode, quantize, x, moved_by_hand=True)[0]
            if not torch.equal(got, by_hand):
                failed.append(f"{order}: differs from moving by hand, rel err {rel_err(got, by_hand):.3g}")
            if rel_err(got, on_gpu[without]) > CLOSE:
                failed.append(f"{order}: rel err {rel_err(got, on_gpu[without]):.3g} from no offload")
        elif not torch.equal(got, on_gpu[without]):
            failed.append(f"{order}: differs from no offload, rel err {rel_err(got, on_gpu[without]):.3g}")
        check_at_home(offloader, dit, pinned=_pinned())
        if mode == "model":
            with offloader.using("dit"):
                check_on_device(offloader, dit, DEVICE, compare_values=False)
    assert not failed, f"{len(failed)} of {len(orders())} orders fail:\n" + "\n".join(failed[:10])
    if mode == "sequential":
        # the last order's model: quantized, merged, injected, restored
        check_streamed_forward(offloader, dit, DEVICE, DTYPE)
        check_at_home(offloader, dit, pinned=_pinned())


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


def _pipeline_run(folder, lora_file, order, mode, quantize, latents, check=None, moved_by_hand=False):
    """A fresh pipeline, the operations in order, one call; ``check(pipe)`` runs after every step.

    moved_by_hand: as in ``_dit_run``, every model goes to the CPU with ``.to`` and back to run.
    """
    from diffsynth_cog import CogVideoPipeline, ModelManager

    manager = ModelManager(torch_dtype=DTYPE, device=DEVICE)
    manager.load_models([folder])
    pipe = CogVideoPipeline.from_model_manager(manager)
    for op in order:
        if op == "offload" and moved_by_hand:
            for model in pipe.models().values():
                model.to("cpu")
        else:
            _pipeline_op(op, pipe, manager, mode, quantize, lora_file)
    if moved_by_hand:
        for model in pipe.models().values():
            model.to(DEVICE)
    callback = None if check is None else (lambda i, t, z: check(pipe))
    return pipe(latents=latents.clone(), progress_bar=False, callback=callback, **CALL), pipe


@cuda
@pytest.mark.parametrize("quantize", QUANTIZE)
@pytest.mark.parametrize("mode", MODES)
def test_pipeline_orders_match_no_offload_and_weights_live_where_expected(folder, lora_file, mode, quantize):
    latents = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(2))

    def inside_dit_block(pipe) -> None:
        # The step callback runs inside ``using("dit")``: the other models are at home, the DiT is
        # on the GPU (model mode) or at home between its layers' forwards (sequential mode).
        for other in (pipe.text_encoder, pipe.vae_decoder):
            check_at_home(pipe.offloader, other, pinned=_pinned())
        if mode == "model":
            check_on_device(pipe.offloader, pipe.dit, DEVICE, compare_values=False)
        else:  # the 5B DiT's root owns no tensors: all of them are streamed
            check_at_home(pipe.offloader, pipe.dit, pinned=_pinned())

    for order in PIPELINE_ORDERS:
        without = tuple(op for op in order if op != "offload")
        expected, _ = _pipeline_run(folder, lora_file, without, "none", quantize, latents)
        got, pipe = _pipeline_run(folder, lora_file, order, mode, quantize, latents, inside_dit_block)
        if _quantized_on_cpu(order):
            by_hand, _ = _pipeline_run(folder, lora_file, order, mode, quantize, latents, moved_by_hand=True)
            assert np.array_equal(got, by_hand), f"{order}: rel err {rel_err(got, by_hand):.3g} from moving by hand"
            assert rel_err(got, expected) <= CLOSE, f"{order}: rel err {rel_err(got, expected):.3g} from no offload"
        else:
            assert np.array_equal(got, expected), f"{order}: rel err {rel_err(got, expected):.3g} from no offload"
        for model in pipe.models().values():
            check_at_home(pipe.offloader, model, pinned=_pinned())
