"""LoRA files across tools: DiffSynth-Studio's layout both ways, and the diffusers/PEFT export.

The expected module names are written out here from REFERENCE.md (sections 2 and 8: DiffSynth-Studio
1.1.x's CogDiT, diffusers' CogVideoXTransformer3DModel), not taken from the library's tables. Where
DiffSynth-Studio 1.1.9 is installed its own CogDiT classes and LoRA loaders (``models/lora.py``) run on
our exported files; where diffusers + PEFT are, ``CogVideoXPipeline.load_lora_weights`` and
``fuse_lora`` do.

Comparisons: merges that do the same float32 operations in the same order are compared bitwise; the
diffusers fuse computes ``(B @ A) * lora_alpha / r`` where our DiffSynth-layout file holds
``(lora_alpha / r * B)`` (so ``(s * B) @ A``): the same up to float32 rounding, compared with a relative
error below 1e-6 per weight.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from diffsynth_reference import diffsynth_cog_dit, diffsynth_load_lora, diffsynth_root, requires_diffsynth
from safetensors.torch import save_file
from tiny_models import PRESET_FLAGS, TINY_DIT, make_diffusers_dit, randomize_

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.loading.dit_loader import diffsynth_rename, dit_name_in, dit_rename, load_dit
from diffsynth_cog.loading.state_dict import load_state_dict, safetensors_metadata
from diffsynth_cog.lora import (
    LORA_EXPORT_FORMATS,
    LoRAError,
    export_lora,
    inject_lora,
    lora_layers,
    lora_parameters,
    merge_lora,
)
from diffsynth_cog.models.dit import CogDiT

NUM_LAYERS = TINY_DIT["num_layers"]

# Our Linear layer -> DiffSynth-Studio 1.1.x's module name (REFERENCE.md section 8).
DIFFSYNTH_TOP = {
    "text_proj": "context_embedder",
    "time_embed.0": "time_embedder.timestep_embedder.0",
    "time_embed.2": "time_embedder.timestep_embedder.2",
    "norm_out.linear": "norm_out.linear",
    "proj_out": "proj_out",
}
DIFFSYNTH_BLOCK = {
    "norm1.linear": "norm1.linear",
    "attn1.to_q": "attn1.to_q",
    "attn1.to_k": "attn1.to_k",
    "attn1.to_v": "attn1.to_v",
    "attn1.to_out": "attn1.to_out",
    "norm2.linear": "norm2.linear",
    "ff.0": "ff.0",
    "ff.2": "ff.2",
}
# Our Linear layer -> diffusers' module name (REFERENCE.md section 2, diffusers' CogVideoXTransformer3DModel).
DIFFUSERS_TOP = {
    "text_proj": "patch_embed.text_proj",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "norm_out.linear": "norm_out.linear",
    "proj_out": "proj_out",
}
DIFFUSERS_BLOCK = {
    "norm1.linear": "norm1.linear",
    "attn1.to_q": "attn1.to_q",
    "attn1.to_k": "attn1.to_k",
    "attn1.to_v": "attn1.to_v",
    "attn1.to_out": "attn1.to_out.0",
    "norm2.linear": "norm2.linear",
    "ff.0": "ff.net.0.proj",
    "ff.2": "ff.net.2",
}


def expected_names(top: dict[str, str], block: dict[str, str], block_prefix: str, num_layers: int) -> dict[str, str]:
    names = dict(top)
    for i in range(num_layers):
        names.update({f"blocks.{i}.{ours}": f"{block_prefix}.{i}.{theirs}" for ours, theirs in block.items()})
    return names


DIFFSYNTH_NAMES = expected_names(DIFFSYNTH_TOP, DIFFSYNTH_BLOCK, "blocks", NUM_LAYERS)
DIFFUSERS_NAMES = expected_names(DIFFUSERS_TOP, DIFFUSERS_BLOCK, "transformer_blocks", NUM_LAYERS)
# A LoRA on every Linear layer, with ranks and alphas that differ by layer (the scale is alpha / rank).
ALL_TARGETS = {
    **{t: (2, 3.0) for t in DIFFSYNTH_BLOCK},
    "attn1.to_v": (4, 4.0),
    "ff.2": (3, 1.5),
    "text_proj": (2, 3.0),
    "time_embed.0": (1, 2.0),
    "time_embed.2": (2, 3.0),
    "norm_out.linear": (4, 3.0),
    "proj_out": (2, 0.5),
}


def make_model(seed: int = 0, **overrides) -> CogDiT:
    config = DiTConfig(**{**TINY_DIT, **PRESET_FLAGS["cogvideox-5b"], **overrides})
    return randomize_(CogDiT(config), seed).eval()


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def trained_copy(base: CogDiT, seed: int = 3) -> CogDiT:
    """``base`` with a LoRA of random (non-zero) A and B on every Linear layer."""
    trained = copy.deepcopy(base)
    inject_lora(trained, ALL_TARGETS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(trained):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return trained


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------------------------
# Names


def test_every_linear_layer_has_its_diffsynth_and_diffusers_name_both_ways():
    model = make_model()
    assert sorted(linear_names(model)) == sorted(DIFFSYNTH_NAMES) == sorted(DIFFUSERS_NAMES)
    for ours in DIFFSYNTH_NAMES:
        assert dit_name_in("diffsynth", ours) == DIFFSYNTH_NAMES[ours]
        assert dit_name_in("diffusers", ours) == DIFFUSERS_NAMES[ours]
        assert dit_name_in("diffsynth", ours + ".bias") == DIFFSYNTH_NAMES[ours] + ".bias"
        assert diffsynth_rename(DIFFSYNTH_NAMES[ours] + ".weight") == ours + ".weight"
        assert dit_rename(DIFFUSERS_NAMES[ours] + ".weight") == ours + ".weight"
    # Outside the Linear layers (REFERENCE.md section 8: patchify.proj; the q/k norms sit on DiffSynth's block).
    assert dit_name_in("diffsynth", "patch_embed.weight") == "patchify.proj.weight"
    assert diffsynth_rename("blocks.1.norm_q.weight") == "blocks.1.attn1.norm_q.weight"
    with pytest.raises(KeyError):
        dit_name_in("diffsynth", "blocks.0.attn1.to_qkv")


# ----------------------------------------------------------------------------------------------
# DiffSynth layout: export with DiffSynth-Studio's names, merge back


def test_diffsynth_export_names_every_layer_as_diffsynth_does_and_merges_to_w_plus_ba(tmp_path):
    base = make_model()
    trained = trained_copy(base)
    path = export_lora(trained, tmp_path / "all.safetensors")
    saved = load_state_dict(path)
    expected_keys = {f"{DIFFSYNTH_NAMES[n]}.lora_{p}.default.weight" for n in DIFFSYNTH_NAMES for p in "AB"}
    assert set(saved) == expected_keys
    meta = safetensors_metadata(path)
    assert meta["lora_format"] == "diffsynth"
    assert json.loads(meta["lora_ranks"])["time_embedder.timestep_embedder.0"] == 1
    for ours, layer in lora_layers(trained).items():
        theirs = DIFFSYNTH_NAMES[ours]
        assert torch.equal(saved[f"{theirs}.lora_A.default.weight"], layer.lora_A.weight)
        assert torch.equal(saved[f"{theirs}.lora_B.default.weight"], layer.lora_B.weight * layer.scale)

    before = linear_weights(base)
    report = merge_lora(base, path)
    assert report.format == "diffsynth" and report.num_layers == len(DIFFSYNTH_NAMES)
    after = linear_weights(base)
    for ours, theirs in DIFFSYNTH_NAMES.items():
        a, b = saved[f"{theirs}.lora_A.default.weight"], saved[f"{theirs}.lora_B.default.weight"]
        assert torch.equal(after[ours], before[ours] + b @ a), ours
        assert not torch.equal(after[ours], before[ours])


def test_older_exports_with_our_names_outside_the_blocks_still_load(tmp_path):
    """Files written before the rename (``text_proj``, ``time_embed.0``) merge as before."""
    base = make_model()
    g = torch.Generator().manual_seed(1)
    sd = {
        "text_proj.lora_A.default.weight": torch.randn(2, 32, generator=g),
        "text_proj.lora_B.default.weight": torch.randn(32, 2, generator=g),
        "time_embed.0.lora_A.default.weight": torch.randn(2, 32, generator=g),
        "time_embed.0.lora_B.default.weight": torch.randn(16, 2, generator=g),
    }
    before = linear_weights(base)
    report = merge_lora(base, sd)
    assert set(report.layers) == {"text_proj", "time_embed.0"} and report.format == "diffsynth"
    b, a = sd["text_proj.lora_B.default.weight"], sd["text_proj.lora_A.default.weight"]
    assert torch.equal(base.text_proj.weight, before["text_proj"] + b @ a)


def diffsynth_style_file(model: CogDiT, path: Path, seed: int = 4) -> tuple[Path, dict[str, tuple]]:
    """A file as other DiffSynth-Studio users write them: its module names (also outside the blocks),
    an adapter name other than ``default``, the ``diffusion_model.`` prefix and kohya-style ``.alpha``
    keys (which DiffSynth-Studio ignores)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    pairs, sd = {}, {}
    for ours in ("text_proj", "time_embed.2", "blocks.1.attn1.to_out", "blocks.0.ff.0", "norm_out.linear"):
        out_f, in_f = shapes[ours]
        a, b = torch.randn(3, in_f, generator=g) * 0.3, torch.randn(out_f, 3, generator=g) * 0.3
        pairs[ours] = (a, b)
        name = "diffusion_model." + DIFFSYNTH_NAMES[ours]
        sd[f"{name}.lora_A.exvideo.weight"], sd[f"{name}.lora_B.exvideo.weight"] = a, b
        sd[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(sd, str(path))
    return path, pairs


def test_merge_reads_what_diffsynth_reads_adapter_names_prefix_and_ignored_alphas(tmp_path, caplog):
    model = make_model()
    path, pairs = diffsynth_style_file(model, tmp_path / "style.safetensors")
    before = linear_weights(model)
    with caplog.at_level(logging.INFO, logger="diffsynth_cog.lora"):
        report = merge_lora(model, path, alpha=0.7)
    assert report.format == "diffsynth" and set(report.layers) == set(pairs)
    assert set(report.scales.values()) == {0.7}  # no rank scaling, the 8.0 alphas ignored
    assert "'.alpha' keys ignored" in report.alpha_source
    text = caplog.text
    assert "5 '.alpha' keys ignored, as DiffSynth-Studio ignores them" in text
    assert "adapter name(s) ['exvideo']" in text and "'diffusion_model.' prefix of 15 keys stripped" in text
    after = linear_weights(model)
    for ours, (a, b) in pairs.items():
        assert torch.equal(after[ours], (before[ours].float() + 0.7 * (b @ a)).to(after[ours].dtype)), ours


def test_diffsynth_alpha_keys_with_a_lora_config_are_refused_as_ambiguous(tmp_path):
    model = make_model()
    path, _ = diffsynth_style_file(model, tmp_path / "style.safetensors")
    snapshot = linear_weights(model)
    with pytest.raises(LoRAError, match="lora_alpha given twice"):
        merge_lora(model, path, lora_config={"r": 3, "lora_alpha": 8})
    assert all(torch.equal(w, snapshot[n]) for n, w in linear_weights(model).items())


# ----------------------------------------------------------------------------------------------
# Against DiffSynth-Studio's own code

DIFFSYNTH_SIZES = dict(num_attention_heads=3, attention_head_dim=16)  # dim 48: DiffSynth's 48 heads fit


def diffsynth_twin(ours: CogDiT) -> torch.nn.Module:
    """DiffSynth-Studio's CogDiT at our model's size, holding our model's Linear weights (by the names above)."""
    c = ours.config
    theirs = diffsynth_cog_dit(
        dim=c.num_attention_heads * c.attention_head_dim,
        time_embed_dim=c.time_embed_dim,
        text_embed_dim=c.text_embed_dim,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        patch_size=c.patch_size,
        num_layers=c.num_layers,
    )
    modules = dict(theirs.named_modules())
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, torch.nn.Linear):
                modules[DIFFSYNTH_NAMES[name]].weight.copy_(layer.weight)
                modules[DIFFSYNTH_NAMES[name]].bias.copy_(layer.bias)
    return theirs


@requires_diffsynth
def test_diffsynth_module_names_written_here_are_diffsynth_studios_own():
    assert diffsynth_root() is not None
    ours = make_model(**DIFFSYNTH_SIZES)
    theirs = diffsynth_twin(ours)
    assert sorted(linear_names(theirs)) == sorted(DIFFSYNTH_NAMES.values())


@requires_diffsynth
def test_diffsynth_studio_merges_our_export_into_its_cogdit_exactly_as_merge_lora(tmp_path, capsys):
    base = make_model(**DIFFSYNTH_SIZES)
    theirs = diffsynth_twin(base)
    path = export_lora(trained_copy(base), tmp_path / "all.safetensors")

    assert diffsynth_load_lora(theirs, str(path)), "DiffSynth-Studio skipped the file"
    assert f"{len(DIFFSYNTH_NAMES)} tensors are updated" in capsys.readouterr().out
    merge_lora(base, path)
    theirs_weights = linear_weights(theirs)
    for ours, weight in linear_weights(base).items():
        assert torch.equal(weight, theirs_weights[DIFFSYNTH_NAMES[ours]]), ours


@requires_diffsynth
def test_diffsynth_studio_skips_a_whole_file_with_our_old_names_outside_the_blocks(tmp_path):
    """Why export uses DiffSynth-Studio's names: one ``text_proj`` key and it merges nothing at all."""
    base = make_model(**DIFFSYNTH_SIZES)
    theirs = diffsynth_twin(base)
    sd = load_state_dict(export_lora(trained_copy(base), tmp_path / "all.safetensors"))
    old = {k.replace("context_embedder.", "text_proj."): v for k, v in sd.items()}
    save_file(old, str(tmp_path / "old.safetensors"))
    before = linear_weights(theirs)
    assert not diffsynth_load_lora(theirs, str(tmp_path / "old.safetensors"))
    assert all(torch.equal(w, before[n]) for n, w in linear_weights(theirs).items())


@requires_diffsynth
def test_diffsynth_studio_and_merge_lora_agree_on_a_file_with_adapter_prefix_and_alphas(tmp_path):
    base = make_model(**DIFFSYNTH_SIZES)
    theirs = diffsynth_twin(base)
    path, _ = diffsynth_style_file(base, tmp_path / "style.safetensors")
    assert diffsynth_load_lora(theirs, str(path), lora_alpha=0.7)
    merge_lora(base, path, alpha=0.7)
    theirs_weights = linear_weights(theirs)
    for ours, weight in linear_weights(base).items():
        assert torch.equal(weight, theirs_weights[DIFFSYNTH_NAMES[ours]]), ours


# ----------------------------------------------------------------------------------------------
# diffusers / PEFT export


def test_diffusers_export_loads_in_diffusers_and_fuses_to_our_merge(tmp_path):
    pytest.importorskip("peft")
    from diffusers import CogVideoXPipeline

    ref = make_diffusers_dit("cogvideox-5b", seed=5)
    ref.save_pretrained(tmp_path / "transformer")
    base = load_dit(tmp_path / "transformer")
    trained = trained_copy(base)
    diffusers_file = export_lora(trained, tmp_path / "diffusers.safetensors", format="diffusers")
    diffsynth_file = export_lora(trained, tmp_path / "diffsynth.safetensors")

    saved = load_state_dict(diffusers_file)
    expected_keys = {f"transformer.{DIFFUSERS_NAMES[n]}.lora_{p}.weight" for n in DIFFUSERS_NAMES for p in "AB"}
    assert set(saved) == expected_keys
    layer = trained.blocks[1].attn1.to_v
    assert torch.equal(saved["transformer.transformer_blocks.1.attn1.to_v.lora_B.weight"], layer.lora_B.weight)
    assert safetensors_metadata(diffusers_file)["lora_format"] == "diffusers"

    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref, scheduler=None)
    pipe.load_lora_weights(str(diffusers_file), adapter_name="ours")
    peft_config = ref.peft_config["ours"]
    for ours, lora in lora_layers(trained).items():  # diffusers read each layer's rank and alpha
        name = DIFFUSERS_NAMES[ours]
        module = ref.get_submodule(name)
        assert module.r["ours"] == lora.rank and module.scaling["ours"] == pytest.approx(lora.alpha / lora.rank), name
    assert peft_config.r == 2
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    fused = {k.replace(".base_layer", ""): v for k, v in ref.state_dict().items() if ".lora_" not in k}

    before = {k: v.clone() for k, v in base.state_dict().items()}
    merge_lora(base, diffsynth_file)
    ours = base.state_dict()
    assert {dit_rename(k) for k in fused} == set(ours)
    linear = {f"{n}.weight" for n in DIFFUSERS_NAMES}
    for key, value in fused.items():
        name = dit_rename(key)
        if name in linear:
            assert not torch.equal(ours[name], before[name])
            assert rel_err(value, ours[name]) < 1e-6, key
        else:
            assert torch.equal(value, ours[name]), key

    # And back: merge_lora reads the diffusers export with the same scales (alpha / rank from its header).
    again = load_dit(tmp_path / "transformer")
    report = merge_lora(again, diffusers_file)
    assert report.format == "diffusers"
    assert report.scales == {n: m.alpha / m.rank for n, m in lora_layers(trained).items()}
    for name, value in again.state_dict().items():
        assert rel_err(value, ours[name]) < 1e-6 if name in linear else torch.equal(value, ours[name]), name


def test_export_refuses_an_unknown_format_and_writes_nothing(tmp_path):
    trained = trained_copy(make_model())
    assert LORA_EXPORT_FORMATS == ("diffsynth", "diffusers")
    with pytest.raises(LoRAError, match=r"format must be one of \['diffsynth', 'diffusers'\], got 'kohya'"):
        export_lora(trained, tmp_path / "x.safetensors", format="kohya")
    assert not (tmp_path / "x.safetensors").exists()


def test_export_lora_command_offers_both_formats():
    from diffsynth_cog.cli import training as cli

    assert cli._LORA_FORMATS == LORA_EXPORT_FORMATS


def test_diffusers_export_refuses_layers_that_are_not_the_dits(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inject_lora(model, {"0": (2, 2.0)})
    with pytest.raises(LoRAError, match=r"\['0'\] are not CogVideoX DiT layers, so they have no diffusers name"):
        export_lora(model, tmp_path / "x.safetensors", format="diffusers")
    assert not (tmp_path / "x.safetensors").exists()
    # The DiffSynth layout is PEFT keys on the module's own names: another module keeps its names.
    assert set(load_state_dict(export_lora(model, tmp_path / "y.safetensors"))) == {
        "0.lora_A.default.weight",
        "0.lora_B.default.weight",
    }
