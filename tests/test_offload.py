"""ModelOffloader keeps every weight's home with the tensor that owns it, so layers replaced by
quantization or LoRA injection, merges and restores work in any order with offloading.

On the CPU the "device" is the CPU too, but the offloader still makes a distinct device copy, so
these tests see where each tensor's data is: its CPU home outside ``using``, a copy of it inside.
"""

from __future__ import annotations

import builtins
import gc
import weakref

import offload_cases as cases
import pytest
import torch
from torch import nn

from diffsynth_cog.lora import LoRALinear, merge_lora
from diffsynth_cog.pipeline import offload
from diffsynth_cog.pipeline.offload import ModelOffloader
from diffsynth_cog.quantization import Int8WeightLinear, quantize_dit

CPU = torch.device("cpu")
MODES = ("model", "sequential")


def offloaded_dit(mode: str = "none", seed: int = 0):
    dit = cases.make_dit(seed)
    offloader = ModelOffloader(CPU, "none")
    offloader.register({"dit": dit})
    if mode != "none":
        offloader.set_mode(mode)
    return dit, offloader


def reference_output(ops, x) -> torch.Tensor:
    """The same operations without offloading."""
    dit, offloader = offloaded_dit()
    for op in ops:
        if op != "offload":
            cases.apply(op, dit, offloader, "none")
    return cases.run_dit(dit, offloader, x)


class ReusedIds:
    """A valid ``id()``: unique among live objects, but the id of a dead tensor goes to the next new
    tensor, as CPython's allocator often does with a freed address. An offloader that keyed homes by
    ``id(tensor)`` would hand a dead tensor's home to a new layer."""

    def __init__(self) -> None:
        self.free: list[int] = []
        self.next = 1

    def __call__(self, obj: object) -> int:
        if not isinstance(obj, torch.Tensor):
            return builtins.id(obj)
        key = obj.__dict__.get("_reused_id")
        if key is None:
            key = self.free.pop() if self.free else self.next
            self.next += key == self.next
            obj.__dict__["_reused_id"] = key
            weakref.finalize(obj, self.free.append, key)
        return key


@pytest.fixture
def reused_ids(monkeypatch):
    """Every ``id()`` call in diffsynth_cog.pipeline.offload reuses the ids of dead tensors."""
    monkeypatch.setattr(offload, "id", ReusedIds(), raising=False)


@pytest.mark.parametrize("mode", MODES)
def test_every_order_of_offload_quantize_merge_inject_clear_gives_the_no_offload_output(mode, reused_ids):
    x = cases.dit_inputs(cases.make_dit())
    references: dict[tuple[str, ...], torch.Tensor] = {}
    failed, done = [], []
    for order in cases.orders():
        without = tuple(op for op in order if op != "offload")
        if without not in references:
            references[without] = reference_output(without, x)
        dit, offloader = offloaded_dit()
        for op in order:
            cases.apply(op, dit, offloader, mode)
        try:
            got = cases.run_dit(dit, offloader, x)
        except RuntimeError as e:  # a stale home in a new layer shows as a size mismatch
            failed.append(f"{order}: {str(e)[:80]}")
            continue
        if not torch.equal(got, references[without]):
            failed.append(f"{order}: max diff {(got - references[without]).abs().max().item():.3g}")
        done.append((dit, offloader))
    assert not failed, f"{len(failed)} of {len(cases.orders())} orders differ from no offload:\n" + "\n".join(
        failed[:10]
    )
    for dit, offloader in done:
        cases.check_at_home(offloader, dit)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["quantize", "merge", "inject", "clear"])
def test_an_operation_inside_a_using_block_is_kept(mode, op):
    before = ("merge",) if op == "clear" else ()
    x = cases.dit_inputs(cases.make_dit())
    expected = reference_output((*before, op), x)
    dit, offloader = offloaded_dit(mode)
    for earlier in before:
        cases.apply(earlier, dit, offloader, mode)
    with offloader.using("dit"):
        cases.apply(op, dit, offloader, mode)  # on device copies in model mode: written back on leaving
    cases.check_at_home(offloader, dit)
    assert torch.equal(cases.run_dit(dit, offloader, x), expected)


@pytest.mark.parametrize("mode", MODES)
def test_no_stale_home_reaches_a_new_layer_when_ids_are_reused(mode, reused_ids):
    x = cases.dit_inputs(cases.make_dit())
    expected = reference_output(("quantize",), x)
    dit, offloader = offloaded_dit(mode)
    with offloader.using("dit"):
        pass  # every tensor has been seen (and, with id keys, given an id)
    quantize_dit(dit, "int8")  # frees the Linear weights; their ids go to the new int8 layers
    assert torch.equal(cases.run_dit(dit, offloader, x), expected)


def test_where_each_tensor_lives_after_each_replacement():
    dit, offloader = offloaded_dit("model")
    cases.check_at_home(offloader, dit)
    for op in ("quantize", "merge", "inject", "clear"):
        cases.apply(op, dit, offloader, "model")
        with offloader.using("dit"):
            cases.check_on_device(offloader, dit, CPU)  # every tensor, new layers included, is a device copy
        cases.check_at_home(offloader, dit)


def test_replaced_layers_and_their_homes_are_freed():
    dit, offloader = offloaded_dit("model")
    old = dit.blocks[0].attn1.to_q
    layer_ref, weight_ref = weakref.ref(old), weakref.ref(old.weight)
    home_ref = weakref.ref(offloader.home_of(old.weight))
    del old
    quantize_dit(dit, "int8")
    gc.collect()
    assert layer_ref() is None and weight_ref() is None
    assert home_ref() is None, "the offloader still holds the home copy of a replaced layer"
    new = dit.blocks[0].attn1.to_q
    assert isinstance(new, Int8WeightLinear) and offloader.home_of(new.qweight) is None  # not seen yet
    with offloader.using("dit"):
        cases.check_on_device(offloader, dit, CPU, only=[new])
    cases.check_at_home(offloader, dit)
    assert offloader.home_of(new.qweight).dtype == torch.int8


def test_sequential_mode_streams_layers_created_after_it_was_set():
    dit, offloader = offloaded_dit("sequential")
    for op in ("quantize", "inject"):
        cases.apply(op, dit, offloader, "sequential")
    streamed = cases.check_streamed_forward(offloader, dit, CPU)
    assert any(isinstance(m, Int8WeightLinear) for m in streamed)
    assert any(isinstance(m, LoRALinear) for m in streamed)
    cases.check_at_home(offloader, dit)


def test_data_replaced_behind_the_offloaders_back_is_taken_as_is():
    x = cases.dit_inputs(cases.make_dit())
    dit, offloader = offloaded_dit("model")
    expected = reference_output((), x)
    with offloader.using("dit"):
        pass
    dit.proj_out.weight = nn.Parameter(dit.proj_out.weight * 2)  # a reassigned Parameter
    dit.text_proj.bias.data = dit.text_proj.bias.data + 1  # data assigned by someone else
    got = cases.run_dit(dit, offloader, x)
    cases.check_at_home(offloader, dit)
    assert not torch.equal(got, expected)
    reference, ref_offloader = offloaded_dit()
    reference.proj_out.weight = nn.Parameter(reference.proj_out.weight * 2)
    reference.text_proj.bias.data = reference.text_proj.bias.data + 1
    assert torch.equal(got, cases.run_dit(reference, ref_offloader, x))


@pytest.mark.parametrize("mode", MODES)
def test_tied_weights_share_one_home(mode):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    model = Tied()
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = model(x)
    offloader = ModelOffloader(CPU, mode)
    offloader.register({"dit": model})
    home = offloader.home_of(model.a.weight)
    for _ in range(2):
        with offloader.using("dit"), torch.no_grad():
            assert torch.equal(model(x), expected)
        assert offloader.home_of(model.b.weight) is home  # one record, never copied again


def test_disabling_offload_keeps_the_edits_and_drops_the_homes():
    x = cases.dit_inputs(cases.make_dit())
    expected = reference_output(("quantize", "merge"), x)
    dit, offloader = offloaded_dit("sequential")
    cases.apply("quantize", dit, offloader, "sequential")
    with offloader.using("dit"):
        merge_lora(dit, cases.merge_state_dict(dit))
    offloader.set_mode("none")
    assert all(offloader.home_of(t) is None for _, _, t in cases.tensors(dit))
    assert torch.equal(cases.run_dit(dit, offloader, x), expected)


def test_changing_mode_inside_a_using_block_is_refused():
    dit, offloader = offloaded_dit("model")
    with offloader.using("dit"), pytest.raises(RuntimeError, match="leave the block first"):
        offloader.set_mode("none")
    cases.check_at_home(offloader, dit)


def test_a_pipeline_built_offloaded_keeps_its_models_at_home_from_the_start(tmp_path):
    """pipe = CogVideoPipeline(..., offload="model"): models loaded on the CPU stay in their (CPU) homes;
    nothing is first copied to the device as building a pipeline in mode "none" does."""
    import torch
    from tiny_models import save_tiny_model_folder

    from diffsynth_cog import CogVideoPipeline, ModelManager

    folder = save_tiny_model_folder(tmp_path, "cogvideox-5b", seed=2)
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
    pipe = CogVideoPipeline.from_model_manager(manager, offload="model")
    assert pipe.offloader.mode == "model"
    for model in pipe.models().values():
        for t in list(model.parameters()) + list(model.buffers()):
            home = pipe.offloader.home_of(t)
            assert home is not None and t.data_ptr() == home.data_ptr()
    plain = CogVideoPipeline.from_model_manager(manager)
    assert all(plain.offloader.home_of(t) is None for t in plain.dit.parameters())
