"""LoRA: merging files into the DiT (both layouts), restoring the base, injecting and exporting.

Merged weights are compared with ``W + s * B @ A`` computed here in float32 the same way
(same operations in the same order), so fp32 results are expected bitwise equal; where the merged
model is compared with an unmerged one (LoRA branch computed at run time, or diffusers with the
adapter active) the arithmetic differs in order only, and the tolerance is a relative error of
1e-5 in fp32 (rounding of ~1e-7 per op over two blocks).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import PRESET_FLAGS, TINY_DIT, make_diffusers_dit, randomize_

import diffsynth_cog.lora as lora_mod
import diffsynth_cog.lora.merge as lora_merge
from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.loading.dit_loader import dit_rename, load_dit
from diffsynth_cog.loading.state_dict import load_state_dict, safetensors_metadata
from diffsynth_cog.lora import (
    BLOCK_LINEAR_TARGETS,
    LoRAError,
    LoRALinear,
    ema_lora_state_dicts,
    export_lora,
    inject_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    merged_loras,
    restore_base_weights,
)
from diffsynth_cog.models.dit import CogDiT

RTOL = 1e-5  # merged vs. unmerged computation, fp32 (see module docstring)

# A subset of our Linear layers, with several ranks; includes to_out, both ff layers and top-level layers.
LAYERS = {
    "blocks.0.attn1.to_q": 4,
    "blocks.0.attn1.to_out": 8,
    "blocks.1.ff.0": 2,
    "blocks.0.ff.2": 4,
    "blocks.1.norm2.linear": 3,
    "text_proj": 5,
    "proj_out": 1,
}
# Our name -> diffusers' name for the same layers (checked against dit_rename below).
DIFFUSERS_NAMES = {
    "blocks.0.attn1.to_q": "transformer_blocks.0.attn1.to_q",
    "blocks.0.attn1.to_out": "transformer_blocks.0.attn1.to_out.0",
    "blocks.1.ff.0": "transformer_blocks.1.ff.net.0.proj",
    "blocks.0.ff.2": "transformer_blocks.0.ff.net.2",
    "blocks.1.norm2.linear": "transformer_blocks.1.norm2.linear",
    "text_proj": "patch_embed.text_proj",
    "proj_out": "proj_out",
}


def make_model(seed: int = 0, **overrides) -> CogDiT:
    config = DiTConfig(**{**TINY_DIT, **PRESET_FLAGS["cogvideox-5b"], **overrides})
    return randomize_(CogDiT(config), seed).eval()


def inputs(model: CogDiT, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    latents = torch.randn(2, c.in_channels, 2, 4, 6, generator=g)
    prompt = torch.randn(2, c.max_text_seq_length, c.text_embed_dim, generator=g)
    return latents, torch.tensor([999, 421]), prompt


def run(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(*x)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snap.keys()
    changed = [k for k in snap if not torch.equal(state[k], snap[k])]
    assert not changed, f"changed: {changed}"


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def random_pairs(model, layers: dict[str, int], seed: int = 7, dtype=torch.float32):
    """Our layer name -> (A [r, in], B [out, r]) with non-zero values."""
    g = torch.Generator().manual_seed(seed)
    shapes = linear_shapes(model)
    out = {}
    for name, r in layers.items():
        o, i = shapes[name]
        out[name] = ((torch.randn(r, i, generator=g) * 0.3).to(dtype), (torch.randn(o, r, generator=g) * 0.3).to(dtype))
    return out


def diffsynth_state_dict(pairs, default_segment: bool = True) -> dict[str, torch.Tensor]:
    seg = ".default" if default_segment else ""
    sd = {}
    for name, (a, b) in pairs.items():
        sd[f"{name}.lora_A{seg}.weight"] = a
        sd[f"{name}.lora_B{seg}.weight"] = b
    return sd


def diffusers_state_dict(pairs, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    sd = {}
    for name, (a, b) in pairs.items():
        sd[f"{prefix}{DIFFUSERS_NAMES[name]}.lora_A.weight"] = a
        sd[f"{prefix}{DIFFUSERS_NAMES[name]}.lora_B.weight"] = b
    return sd


def expected_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The merge written out: float32 W + s * (B @ A), back to W's dtype."""
    return (w0.float() + scale * (b.float() @ a.float())).to(w0.dtype)


def write(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def test_diffusers_names_used_here_map_to_ours():
    for ours, theirs in DIFFUSERS_NAMES.items():
        assert dit_rename(theirs + ".weight") == ours + ".weight"


# ----------------------------------------------------------------------------------------------
# Inference: DiffSynth layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("default_segment", [True, False])
def test_diffsynth_file_merges_to_manual_weights(tmp_path, dtype, default_segment):
    model = make_model()
    before = snapshot(model)
    pairs = random_pairs(model, LAYERS, dtype=dtype)
    path = write(tmp_path / "lora.safetensors", diffsynth_state_dict(pairs, default_segment))

    report = merge_lora(model, path)

    assert report.format == "diffsynth" and report.num_layers == len(LAYERS)
    assert report.ranks == LAYERS and set(report.scales.values()) == {1.0}
    state = model.state_dict()
    for name, (a, b) in pairs.items():
        # Same float32 expression as the library: bitwise equal.
        assert torch.equal(state[f"{name}.weight"], expected_weight(before[f"{name}.weight"], a, b, 1.0)), name
        assert not torch.equal(state[f"{name}.weight"], before[f"{name}.weight"]), name
    untouched = [k for k in before if k.removesuffix(".weight") not in LAYERS]
    assert all(torch.equal(state[k], before[k]) for k in untouched)


def test_alpha_scales_the_update(tmp_path):
    model = make_model()
    before = snapshot(model)
    pairs = random_pairs(model, LAYERS)
    report = merge_lora(model, write(tmp_path / "l.safetensors", diffsynth_state_dict(pairs)), alpha=0.35)
    assert set(report.scales.values()) == {0.35}
    for name, (a, b) in pairs.items():
        assert torch.equal(model.state_dict()[f"{name}.weight"], expected_weight(before[f"{name}.weight"], a, b, 0.35))


def test_merge_accepts_a_state_dict_and_a_folder(tmp_path):
    pairs = random_pairs(make_model(), LAYERS)
    sd = diffsynth_state_dict(pairs)
    by_dict, by_folder = make_model(), make_model()
    merge_lora(by_dict, sd)
    folder = tmp_path / "lora"
    folder.mkdir()
    write(folder / "exvideo.safetensors", sd)
    merge_lora(by_folder, folder)
    assert_bitwise(by_folder, snapshot(by_dict))


def test_merge_into_bf16_model_computes_in_fp32_and_casts_back(tmp_path):
    model = make_model().to(torch.bfloat16)
    before = snapshot(model)
    pairs = random_pairs(model, LAYERS)
    merge_lora(model, diffsynth_state_dict(pairs), alpha=0.8)
    for name, (a, b) in pairs.items():
        got = model.state_dict()[f"{name}.weight"]
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, expected_weight(before[f"{name}.weight"], a, b, 0.8))


# ----------------------------------------------------------------------------------------------
# Inference: diffusers / PEFT layout


def test_diffusers_file_with_header_metadata_scales_by_lora_alpha_over_rank(tmp_path):
    model = make_model()
    before = snapshot(model)
    pairs = random_pairs(model, {**LAYERS, "blocks.0.ff.2": 2})
    # What CogVideoXPipeline.save_lora_weights(transformer_lora_adapter_metadata=...) writes:
    # a LoraConfig dict, each field prefixed with the component name.
    config = {
        "transformer.r": 4,
        "transformer.lora_alpha": 8,
        "transformer.rank_pattern": {
            "^transformer_blocks.0.attn1.to_out.0": 8,
            "ff.net.0.proj": 2,
            "^transformer_blocks.0.ff.net.2": 2,
            "norm2.linear": 3,
            "text_proj": 5,
            "proj_out": 1,
        },
        "transformer.alpha_pattern": {"ff.net.0.proj": 3, "proj_out": 0.5},
    }
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
    path = write(tmp_path / "pytorch_lora_weights.safetensors", diffusers_state_dict(pairs), meta)

    report = merge_lora(model, path, alpha=0.5)

    lora_alpha = {"blocks.1.ff.0": 3.0, "proj_out": 0.5}
    assert report.format == "diffusers" and "lora_adapter_metadata" in report.alpha_source
    for name, (a, b) in pairs.items():
        rank = a.shape[0]
        scale = 0.5 * lora_alpha.get(name, 8.0) / rank
        assert report.scales[name] == pytest.approx(scale)
        got = model.state_dict()[f"{name}.weight"]
        # The library computes the scale as alpha * (lora_alpha / r): one extra rounding at most.
        assert rel_err(got, expected_weight(before[f"{name}.weight"], a, b, scale)) < 1e-7, name


def test_diffusers_file_unprefixed_with_unprefixed_metadata(tmp_path):
    """What ``transformer.save_lora_adapter`` writes: no component prefix on keys or metadata."""
    model = make_model()
    before = snapshot(model)
    layers = {"blocks.0.attn1.to_q": 4, "blocks.0.attn1.to_out": 4}
    pairs = random_pairs(model, layers)
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 2})}
    merge_lora(model, write(tmp_path / "a.safetensors", diffusers_state_dict(pairs, prefix=""), meta))
    for name, (a, b) in pairs.items():
        got = model.state_dict()[f"{name}.weight"]
        assert torch.equal(got, expected_weight(before[f"{name}.weight"], a, b, 0.5))


def test_diffusers_file_without_alpha_information_uses_scale_one_and_says_so(tmp_path, caplog):
    model = make_model()
    before = snapshot(model)
    pairs = random_pairs(model, LAYERS)
    with caplog.at_level(logging.INFO, logger="diffsynth_cog.lora"):
        report = merge_lora(model, write(tmp_path / "a.safetensors", diffusers_state_dict(pairs)))
    assert "no lora_alpha information" in caplog.text and "7 Linear layers changed" in caplog.text
    assert report.format == "diffusers" and set(report.scales.values()) == {1.0}
    for name, (a, b) in pairs.items():
        assert torch.equal(model.state_dict()[f"{name}.weight"], expected_weight(before[f"{name}.weight"], a, b, 1.0))


def test_peft_adapter_config_beside_the_file(tmp_path):
    """PEFT's save_pretrained: ``base_model.model.`` keys, lora_alpha in adapter_config.json (here rsLoRA)."""
    model = make_model()
    before = snapshot(model)
    pairs = random_pairs(model, {"blocks.0.attn1.to_q": 4, "blocks.1.ff.0": 4})
    write(tmp_path / "adapter_model.safetensors", diffusers_state_dict(pairs, prefix="base_model.model."))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 6, "use_rslora": True}))
    report = merge_lora(model, tmp_path / "adapter_model.safetensors")
    assert report.alpha_source.endswith("adapter_config.json")
    for name, (a, b) in pairs.items():
        scale = 6 / 4**0.5
        assert torch.equal(model.state_dict()[f"{name}.weight"], expected_weight(before[f"{name}.weight"], a, b, scale))


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"fan_in_fan_out": True}])
def test_lora_variants_that_are_not_a_plain_update_are_refused(tmp_path, variant):
    model = make_model()
    before = snapshot(model)
    pairs = random_pairs(model, {"blocks.0.attn1.to_q": 4})
    meta = {
        "lora_adapter_metadata": json.dumps(
            {"transformer.r": 4, "transformer.lora_alpha": 4, **{f"transformer.{k}": v for k, v in variant.items()}}
        )
    }
    with pytest.raises(LoRAError, match="not the plain"):
        merge_lora(model, write(tmp_path / "v.safetensors", diffusers_state_dict(pairs), meta))
    assert_bitwise(model, before)


def test_per_layer_alpha_keys(tmp_path):
    model = make_model()
    before = snapshot(model)
    pairs = random_pairs(model, {"blocks.0.attn1.to_q": 4, "proj_out": 2})
    sd = diffusers_state_dict(pairs)
    sd["transformer.transformer_blocks.0.attn1.to_q.alpha"] = torch.tensor(2.0)
    sd["transformer.proj_out.alpha"] = torch.tensor([6.0])
    report = merge_lora(model, write(tmp_path / "a.safetensors", sd))
    assert report.scales == {"blocks.0.attn1.to_q": 0.5, "proj_out": 3.0}
    for name, (a, b) in pairs.items():
        scale = report.scales[name]
        assert torch.equal(model.state_dict()[f"{name}.weight"], expected_weight(before[f"{name}.weight"], a, b, scale))
    # Every layer needs one once some have one.
    del sd["transformer.proj_out.alpha"]
    fresh = make_model()
    with pytest.raises(LoRAError, match="no '.alpha' key"):
        merge_lora(fresh, sd)


def _diffusers_forward(model, x):
    latents, timestep, prompt = x
    with torch.no_grad():
        out = model(
            hidden_states=latents.transpose(1, 2), encoder_hidden_states=prompt, timestep=timestep, return_dict=False
        )[0]
    return out.transpose(1, 2)


def test_diffusers_saved_lora_gives_diffusers_output(tmp_path):
    """End to end against diffusers + PEFT: a LoRA trained on diffusers' transformer (ranks and
    alphas varying per layer), saved by CogVideoXPipeline.save_lora_weights with and without its
    metadata, merged into our model, gives the output diffusers computes with the adapter."""
    pytest.importorskip("peft")
    from diffusers import CogVideoXPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = make_diffusers_dit("cogvideox-2b", seed=5)
    ref.save_pretrained(tmp_path / "transformer")
    config = LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear", "proj_out"],
        rank_pattern={"to_v": 8},
        alpha_pattern={"ff.net.2": 2},
    )
    ref.add_adapter(config)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    layers = get_peft_model_state_dict(ref)
    CogVideoXPipeline.save_lora_weights(
        tmp_path / "with_meta", transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict()
    )
    CogVideoXPipeline.save_lora_weights(tmp_path / "no_meta", transformer_lora_layers=layers)

    ours = load_dit(tmp_path / "transformer")
    x = inputs(ours)
    base_out = run(ours, x)
    report = merge_lora(ours, tmp_path / "with_meta")
    assert report.num_layers == 2 * 7 + 1 and report.format == "diffusers"
    assert rel_err(run(ours, x), _diffusers_forward(ref, x)) < RTOL
    restore_base_weights(ours)
    assert torch.equal(run(ours, x), base_out)

    # No metadata: diffusers itself then assumes lora_alpha = rank; so must we.
    reference = make_diffusers_dit("cogvideox-2b", seed=5)
    reference.load_lora_adapter(str(tmp_path / "no_meta" / "pytorch_lora_weights.safetensors"), prefix="transformer")
    merge_lora(ours, tmp_path / "no_meta")
    assert rel_err(run(ours, x), _diffusers_forward(reference, x)) < RTOL


# ----------------------------------------------------------------------------------------------
# Inference: refusals leave the model bitwise unchanged


def test_lora_for_a_wider_model_fails_and_changes_nothing(tmp_path):
    wide = make_model(attention_head_dim=32)
    inject_lora(wide, BLOCK_LINEAR_TARGETS, rank=4)
    for p in lora_parameters(wide):
        torch.nn.init.normal_(p)
    path = export_lora(wide, tmp_path / "wide.safetensors")
    model = make_model()
    before = snapshot(model)
    with pytest.raises(LoRAError) as info:
        merge_lora(model, path)
    message = str(info.value)
    assert str(path) in message and "no weight was changed" in message
    assert "'blocks.0.attn1.to_q.lora_A.default.weight': lora_A must be [rank, in_features=32]" in message
    assert "found [4, 64]" in message
    assert_bitwise(model, before)
    assert merged_loras(model) == ()


def test_file_with_no_matching_key_fails(tmp_path):
    model = make_model()
    before = snapshot(model)
    sd = {  # a LoRA for another architecture (Wan-style names)
        "blocks.0.cross_attn.q.lora_A.default.weight": torch.randn(4, 32),
        "blocks.0.cross_attn.q.lora_B.default.weight": torch.randn(32, 4),
        "blocks.0.self_attn.o.lora_A.default.weight": torch.randn(4, 32),
        "blocks.0.self_attn.o.lora_B.default.weight": torch.randn(32, 4),
    }
    with pytest.raises(LoRAError, match="none of its 2 LoRA layers exists in this CogDiT"):
        merge_lora(model, write(tmp_path / "wan.safetensors", sd))
    assert_bitwise(model, before)


def test_partially_matching_file_fails(tmp_path):
    model = make_model()
    before = snapshot(model)
    pairs = random_pairs(model, LAYERS)
    sd = diffsynth_state_dict(pairs)
    # A third block this two-block model does not have.
    sd["blocks.2.attn1.to_q.lora_A.default.weight"] = torch.randn(4, 32)
    sd["blocks.2.attn1.to_q.lora_B.default.weight"] = torch.randn(32, 4)
    with pytest.raises(LoRAError, match=r"1 of its 8 LoRA layers do not exist .*blocks\.2\.attn1\.to_q"):
        merge_lora(model, write(tmp_path / "p.safetensors", sd))
    assert_bitwise(model, before)


def _bad_files():
    r = torch.randn
    ok = {"blocks.0.attn1.to_q.lora_A.weight": r(4, 32), "blocks.0.attn1.to_q.lora_B.weight": r(32, 4)}
    return {
        "unpaired A": ({**ok, "blocks.0.ff.0.lora_A.weight": r(4, 32)}, "must come in pairs"),
        "rank mismatch": (
            {**ok, "blocks.0.ff.2.lora_A.weight": r(4, 128), "blocks.0.ff.2.lora_B.weight": r(32, 3)},
            "lora_A has rank 4",
        ),
        "unknown key": ({**ok, "blocks.0.attn1.to_q.weight": r(32, 32)}, "not a LoRA tensor"),
        "not a Linear": (
            {"blocks.0.attn1.norm_q.lora_A.weight": r(2, 16), "blocks.0.attn1.norm_q.lora_B.weight": r(16, 2)},
            "is a LayerNorm, not a Linear",
        ),
        "B transposed": (
            {"blocks.0.ff.0.lora_A.weight": r(4, 32), "blocks.0.ff.0.lora_B.weight": r(4, 128)},
            r"lora_B must be \[out_features=128, rank\]",
        ),
        "NaN": ({**ok, "blocks.0.ff.2.lora_A.weight": r(2, 128) * float("nan"), "blocks.0.ff.2.lora_B.weight": r(32, 2)}, "NaN"),
        "integer dtype": (
            {**ok, "proj_out.lora_A.weight": torch.ones(2, 32, dtype=torch.int32), "proj_out.lora_B.weight": r(16, 2)},
            "not a floating-point type",
        ),
        "mixed layouts": (
            {**ok, "transformer.transformer_blocks.0.ff.net.2.lora_A.weight": r(2, 128),
             "transformer.transformer_blocks.0.ff.net.2.lora_B.weight": r(32, 2)},
            "mixes DiffSynth names",
        ),
        "same layer twice": (
            {**ok, "blocks.0.attn1.to_q.lora_A.default.weight": r(4, 32)},
            "two A tensors",
        ),
        "empty": ({}, "holds no tensors"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_bad_files()))
def test_malformed_lora_fails_and_changes_nothing(tmp_path, case):
    sd, pattern = _bad_files()[case]
    model = make_model()
    before = snapshot(model)
    with pytest.raises(LoRAError, match=pattern):
        merge_lora(model, write(tmp_path / "bad.safetensors", sd))
    assert_bitwise(model, before)


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "lora.bin"
    torch.save({"proj_out.lora_A.weight": torch.zeros(1, 32)}, path)
    with pytest.raises(LoRAError, match="safetensors only"):
        merge_lora(make_model(), path)


def test_failure_while_merging_rolls_back_bitwise():
    """A failure after validation (e.g. out of memory on the GPU) undoes the layers already merged."""
    model = make_model()
    before = snapshot(model)
    sd = diffsynth_state_dict(random_pairs(model, LAYERS))
    fail_key = "blocks.1.ff.0.lora_B.default.weight"

    class FailsOnSecondRead(dict):
        reads = 0

        def __getitem__(self, key):
            if key == fail_key:
                FailsOnSecondRead.reads += 1
                if FailsOnSecondRead.reads == 2:  # first read: validation; second: the merge
                    raise RuntimeError("simulated out of memory")
            return super().__getitem__(key)

    with pytest.raises(RuntimeError, match="simulated"):
        merge_lora(model, FailsOnSecondRead(sd))
    assert_bitwise(model, before)
    assert restore_base_weights(model) == []


# ----------------------------------------------------------------------------------------------
# Inference: restore, stacking, output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_then_restore_gives_bitwise_base(tmp_path, dtype):
    model = make_model().to(dtype)
    before = snapshot(model)
    merge_lora(model, diffsynth_state_dict(random_pairs(model, LAYERS)), alpha=1.7)
    assert restore_base_weights(model) == list(LAYERS)
    assert_bitwise(model, before)
    assert merged_loras(model) == ()


def test_stacked_loras_add_up_and_restore_to_base(tmp_path):
    model = make_model()
    before = snapshot(model)
    first = random_pairs(model, LAYERS, seed=1)
    second_layers = {"blocks.0.attn1.to_q": 2, "blocks.1.attn1.to_k": 6, "norm_out.linear": 3}
    second = random_pairs(model, second_layers, seed=2)
    merge_lora(model, write(tmp_path / "1.safetensors", diffsynth_state_dict(first)))
    merge_lora(model, write(tmp_path / "2.safetensors", diffusers_state_dict_any(second)), alpha=0.5)

    q = "blocks.0.attn1.to_q"
    w = expected_weight(before[f"{q}.weight"], *first[q], 1.0)
    assert torch.equal(model.state_dict()[f"{q}.weight"], expected_weight(w, *second[q], 0.5))
    assert [r.format for r in merged_loras(model)] == ["diffsynth", "diffusers"]
    # Backups: one exact CPU copy per touched layer, none for the others.
    record = getattr(model, lora_merge._RECORD_ATTR)
    assert set(record.base_weights) == set(LAYERS) | set(second_layers)
    assert all(t.device.type == "cpu" for t in record.base_weights.values())

    restored = restore_base_weights(model)
    assert set(restored) == set(LAYERS) | set(second_layers)
    assert_bitwise(model, before)


def diffusers_state_dict_any(pairs) -> dict[str, torch.Tensor]:
    """diffusers layout for any of our layer names (diffusers spells norm_out/attn names the same)."""
    renames = {
        **DIFFUSERS_NAMES,
        "blocks.1.attn1.to_k": "transformer_blocks.1.attn1.to_k",
        "norm_out.linear": "norm_out.linear",
    }
    sd = {}
    for name, (a, b) in pairs.items():
        sd[f"transformer.{renames[name]}.lora_A.weight"] = a
        sd[f"transformer.{renames[name]}.lora_B.weight"] = b
    return sd


def test_model_output_changes_after_merge_and_comes_back_after_restore():
    model = make_model()
    x = inputs(model)
    base_out = run(model, x)
    merge_lora(model, diffsynth_state_dict(random_pairs(model, LAYERS)))
    merged_out = run(model, x)
    assert rel_err(merged_out, base_out) > 1e-2
    restore_base_weights(model)
    assert torch.equal(run(model, x), base_out)


# ----------------------------------------------------------------------------------------------
# Training: injection


def test_fresh_injection_leaves_outputs_unchanged():
    model = make_model()
    x = inputs(model)
    base_out = run(model, x)
    names = inject_lora(model, [*BLOCK_LINEAR_TARGETS, "proj_out", "text_proj"], rank=4, alpha=8)
    assert len(names) == 2 * 8 + 2
    # B = 0 makes the branch exactly zero, so the output is bitwise the base output.
    assert torch.equal(run(model, x), base_out)


def test_injection_keeps_base_keys_and_only_lora_trains_in_fp32_over_bf16():
    model = make_model().to(torch.bfloat16)
    base_keys = set(model.state_dict())
    names = inject_lora(model, BLOCK_LINEAR_TARGETS, rank=4, dropout=0.1)
    keys = set(model.state_dict())
    lora_keys = {f"{n}.lora_{p}.weight" for n in names for p in "AB"}
    assert keys == base_keys | lora_keys
    assert "blocks.0.attn1.to_q.weight" in keys and "blocks.0.attn1.to_q.lora_A.weight" in keys

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == lora_keys
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if n in lora_keys else torch.bfloat16), n
    layer = model.blocks[0].attn1.to_q
    assert (
        isinstance(layer, LoRALinear) and layer.lora_A.weight.shape == (4, 32) and layer.lora_B.weight.shape == (32, 4)
    )

    # Training step: bf16 output, gradients reach only the LoRA (B gets one even at zero init).
    model.train()
    out = model(*inputs(model))
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in lora_parameters(model))
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora_keys)
    assert any(p.grad.abs().sum() > 0 for p in lora_parameters(model))


def test_per_target_rank_and_alpha():
    model = make_model()
    targets = {**dict.fromkeys(BLOCK_LINEAR_TARGETS, 4), "to_q": 2, "attn1.to_q": (8, 2.0)}
    inject_lora(model, targets, alpha=16)
    q, k = model.blocks[1].attn1.to_q, model.blocks[1].attn1.to_k
    assert (q.rank, q.alpha, q.scale) == (8, 2.0, 0.25)  # the longest matching target wins
    assert (k.rank, k.alpha, k.scale) == (4, 16.0, 4.0)


def test_injection_errors():
    model = make_model()
    with pytest.raises(LoRAError, match=r"\['attn2.to_q'\] match no layer"):
        inject_lora(model, ["attn1.to_q", "attn2.to_q"], rank=4)
    with pytest.raises(LoRAError, match="AdaLayerNormZero, not a Linear"):
        inject_lora(model, ["norm1"], rank=4)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half-injected
    inject_lora(model, ["ff.0"], rank=4)
    inject_lora(model, ["ff.2"], rank=2)  # a second call keeps the first call's LoRA trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.ff.{j}.lora_{ab}.weight" for i in range(2) for j in (0, 2) for ab in "AB"
    }
    with pytest.raises(LoRAError, match="already carries a LoRA"):
        inject_lora(model, ["ff.0"], rank=4)


# ----------------------------------------------------------------------------------------------
# Training: export, EMA


def perturbed_lora_model(targets, rank, alpha, seed=3):
    base = make_model()
    model = copy.deepcopy(base)
    inject_lora(model, targets, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return base, model


def test_exported_lora_merged_into_base_reproduces_trained_model(tmp_path):
    # rank 4 on all eight Linear layers of each block, rank 8 (alpha 2) on q/k/v/out, as ExVideo-style setups do
    attention = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out"]
    targets = {**dict.fromkeys(BLOCK_LINEAR_TARGETS, 4), **dict.fromkeys(attention, (8, 2.0))}
    base = make_model()
    trained = copy.deepcopy(base)
    inject_lora(trained, {**targets, "proj_out": (2, 6.0)}, alpha=12)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(trained):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = inputs(base)
    trained_out = run(trained, x)
    base_out = run(base, x)

    path = export_lora(trained, tmp_path / "out" / "exvideo.safetensors", metadata={"steps": "1000"})
    report = merge_lora(base, path)  # alpha=1.0: the scale is folded into B

    assert report.format == "diffsynth" and set(report.scales.values()) == {1.0}
    assert rel_err(run(base, x), trained_out) < RTOL
    assert rel_err(trained_out, base_out) > 1e-2  # the LoRA does something
    saved = load_state_dict(path)
    assert "blocks.0.attn1.to_q.lora_A.default.weight" in saved and "proj_out.lora_B.default.weight" in saved
    assert all(t.dtype == torch.float32 for t in saved.values())
    layer = trained.blocks[0].attn1.to_q
    assert torch.equal(saved["blocks.0.attn1.to_q.lora_B.default.weight"], layer.lora_B.weight * layer.scale)

    meta = safetensors_metadata(path)
    assert meta["steps"] == "1000" and meta["lora_format"] == "diffsynth"
    assert json.loads(meta["lora_ranks"])["blocks.1.attn1.to_q"] == 8
    assert json.loads(meta["lora_ranks"])["blocks.1.ff.0"] == 4
    assert json.loads(meta["lora_alphas"])["blocks.1.attn1.to_v"] == 2.0
    assert json.loads(meta["lora_alphas"])["proj_out"] == 6.0
    assert json.loads(meta["lora_targets"]) == list(lora_mod.lora_layers(trained))


def test_export_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    _, trained = perturbed_lora_model(["attn1.to_q"], 4, 4)
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"previous good file")

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a header")  # bytes on disk, then the disk fills up
        raise OSError(28, "No space left on device")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)  # the atomic writer imports it when it writes
    with pytest.raises(OSError, match="No space left"):
        export_lora(trained, target)
    assert target.read_bytes() == b"previous good file"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # no temporary file left

    fresh = tmp_path / "new.safetensors"
    with pytest.raises(OSError):
        export_lora(trained, fresh)
    assert not fresh.exists()


def test_export_refuses_reserved_or_non_string_metadata(tmp_path):
    _, trained = perturbed_lora_model(["attn1.to_q"], 4, 4)
    with pytest.raises(LoRAError, match="reserved"):
        export_lora(trained, tmp_path / "a.safetensors", metadata={"lora_ranks": "x"})
    with pytest.raises(LoRAError, match="str to str"):
        export_lora(trained, tmp_path / "a.safetensors", metadata={"steps": 3})
    assert not list(tmp_path.iterdir())


def test_ema_of_checkpoints():
    g = torch.Generator().manual_seed(0)
    keys = ["blocks.0.attn1.to_q.lora_A.weight", "blocks.0.attn1.to_q.lora_B.weight"]
    checkpoints = [{k: torch.randn(4, 4, generator=g) for k in keys} for _ in range(3)]
    ema = ema_lora_state_dicts(iter(checkpoints), gamma=0.9)
    for k in keys:
        c0, c1, c2 = (c[k] for c in checkpoints)
        expected = (c0 * 0.9 + c1 * 0.1) * 0.9 + c2 * 0.1
        assert torch.allclose(ema[k], expected, rtol=1e-6, atol=1e-7)  # fp32 rounding only
    assert torch.equal(ema_lora_state_dicts(checkpoints[:1])[keys[0]], checkpoints[0][keys[0]])
    assert torch.equal(ema_lora_state_dicts(checkpoints, gamma=0.0)[keys[0]], checkpoints[-1][keys[0]])
    with pytest.raises(LoRAError, match="other keys"):
        ema_lora_state_dicts([checkpoints[0], {keys[0]: checkpoints[1][keys[0]]}])
    with pytest.raises(ValueError, match="gamma"):
        ema_lora_state_dicts(checkpoints, gamma=1.5)
    with pytest.raises(ValueError, match="no state dicts"):
        ema_lora_state_dicts([])


def test_ema_weights_export_and_load(tmp_path):
    _, trained = perturbed_lora_model(BLOCK_LINEAR_TARGETS, 4, 8)
    first = lora_state_dict(trained)
    with torch.no_grad():
        for p in lora_parameters(trained):
            p.add_(1.0)
    second = lora_state_dict(trained)
    ema = ema_lora_state_dicts([first, second], gamma=0.9)
    path = export_lora(trained, tmp_path / "ema.safetensors", lora_weights=ema)
    saved = load_state_dict(path)
    name = "blocks.1.ff.2"
    assert torch.equal(saved[f"{name}.lora_A.default.weight"], ema[f"{name}.lora_A.weight"])
    assert torch.equal(saved[f"{name}.lora_B.default.weight"], ema[f"{name}.lora_B.weight"] * 2.0)
    load_lora_state_dict(trained, ema)
    assert all(torch.equal(v, ema[k]) for k, v in lora_state_dict(trained).items())
    with pytest.raises(LoRAError, match="missing"):
        load_lora_state_dict(trained, {k: v for k, v in ema.items() if "ff" not in k})


def test_rank_64_on_the_eight_block_layers_of_5b_matches_the_exvideo_file_size():
    """ExVideo-CogVideoX-LoRA-129f-v1 is 1,001,914,368 bytes of tensors: rank 64 in fp32 on all eight
    Linear layers of the 42 blocks of CogVideoX-5B (built on the meta device: no memory used)."""
    from diffsynth_cog.configs import dit_preset

    with torch.device("meta"):
        model = CogDiT(dit_preset("cogvideox-5b"))
    names = inject_lora(model, BLOCK_LINEAR_TARGETS, rank=64)
    assert len(names) == 8 * 42
    assert sum(p.numel() * 4 for p in lora_parameters(model)) == 1_001_914_368
