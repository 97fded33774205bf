"""ModelManager: detection of what each path holds, DiffSynth-style paths, LoRA through the manager."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import TINY_DIT, make_diffusers_dit, make_diffusers_vae, save_tiny_model_folder

from diffsynth_cog import ModelManager
from diffsynth_cog.errors import ModelDetectionError
from diffsynth_cog.lora import LoRAError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b"), "cogvideox-5b", seed=2)


def test_diffsynth_example_paths_load_as_given(folder, tmp_path):
    """text_encoder folder + transformer folder + a lone VAE weights file (no config beside it)."""
    lone = tmp_path / "CogVideoX-5b" / "vae"
    # The group count is not in the weights: a lone file is read with the real VAE's 32 groups.
    make_diffusers_vae(seed=3, block_out_channels=(32, 32, 32, 32), norm_num_groups=32).save_pretrained(lone)
    (lone / "config.json").unlink()
    # The tiny VAE's architecture is inferred from shapes; its scale comes from the transformer beside it.
    shutil.copytree(folder / "transformer", tmp_path / "CogVideoX-5b" / "transformer")
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models(
        [
            folder / "text_encoder",
            tmp_path / "CogVideoX-5b" / "transformer",
            lone / "diffusion_pytorch_model.safetensors",
        ]
    )
    assert {r.name for r in mm.records} == {"cog_text_encoder", "cog_dit", "cog_vae_encoder", "cog_vae_decoder"}
    assert mm.fetch_model("cog_vae_decoder").config.scaling_factor == 0.7
    assert mm.tokenizer_path is None or mm.tokenizer_path.name == "tokenizer"
    te = mm.fetch_model("cog_text_encoder")
    assert te.encode("hello").shape[1] == TINY_DIT["max_text_seq_length"]  # the transformer's, not T5's 226


def test_whole_model_folder_loads_everything_and_finds_scheduler(folder):
    mm = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
    assert ModelManager.detect(folder) == "model_folder"
    for name in ("cog_dit", "cog_text_encoder", "cog_vae_encoder", "cog_vae_decoder"):
        assert mm.fetch_model(name) is not None
    assert mm.scheduler_config is not None and mm.scheduler_config.snr_shift_scale == 1.0
    assert [r.path.name for r in mm.records][:2] == ["text_encoder", "transformer"]


@pytest.mark.parametrize("how", ["whole folder", "text_encoder folder alone", "text_encoder before the DiT"])
def test_text_encoder_pads_prompts_to_the_transformers_max_text_seq_length(folder, tmp_path, how):
    """The T5 tokenizer must produce the DiT's max_text_seq_length tokens (here 11, not T5's default 226)."""
    root = tmp_path / "model"
    shutil.copytree(folder, root, ignore=shutil.ignore_patterns("transformer"))
    make_diffusers_dit("cogvideox-5b", seed=2, max_text_seq_length=11).save_pretrained(root / "transformer")
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    if how == "whole folder":
        mm.load_models([root])
    elif how == "text_encoder folder alone":
        mm.load_models([root / "text_encoder"])
    else:  # the encoder of one folder, then a DiT from another: the encoder follows the DiT
        mm.load_models([folder / "text_encoder", root / "transformer"])
    assert mm.fetch_model("cog_text_encoder").encode("a red fox").shape[1] == 11


def test_detection_by_config_and_by_tensor_names(folder, tmp_path):
    assert ModelManager.detect(folder / "transformer") == "dit"
    assert ModelManager.detect(folder / "vae") == "vae"
    assert ModelManager.detect(folder / "text_encoder") == "text_encoder"
    alone = tmp_path / "alone.safetensors"
    shutil.copy(folder / "transformer" / "diffusion_pytorch_model.safetensors", alone)
    assert ModelManager.detect(alone) == "dit"


def test_unknown_weights_are_rejected_with_their_keys(tmp_path):
    save_file({"foo.bar.weight": torch.zeros(2, 2)}, tmp_path / "x.safetensors")
    with pytest.raises(ModelDetectionError, match="foo.bar.weight"):
        ModelManager(torch_dtype=torch.float32, device="cpu").load_models([tmp_path / "x.safetensors"])
    with pytest.raises(ModelDetectionError, match="no such file"):
        ModelManager.detect(tmp_path / "missing")


def test_fetch_model_validates_names_and_requirements():
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="unknown model name"):
        mm.fetch_model("dit")
    assert mm.fetch_model("cog_dit") is None
    with pytest.raises(ModelDetectionError, match="not loaded"):
        mm.fetch_model("cog_dit", require=True)


def _lora_file(path, dit, rank=2, scale=0.05, wrong_shape=False):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(len(dit.blocks)):
        for layer in ("attn1.to_q", "ff.2"):
            lin = dit.get_submodule(f"blocks.{i}.{layer}")
            fan_in = lin.in_features + (8 if wrong_shape else 0)
            sd[f"blocks.{i}.{layer}.lora_A.default.weight"] = torch.randn(rank, fan_in, generator=g) * scale
            sd[f"blocks.{i}.{layer}.lora_B.default.weight"] = torch.randn(lin.out_features, rank, generator=g) * scale
    save_file(sd, path)
    return sd


def test_load_lora_merges_and_clear_restores_bitwise(folder, tmp_path):
    mm = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder / "transformer"])
    dit = mm.fetch_model("cog_dit")
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    sd = _lora_file(tmp_path / "lora.safetensors", dit)
    report = mm.load_lora(tmp_path / "lora.safetensors", lora_alpha=0.5)
    assert report.num_layers == 2 * len(dit.blocks)
    key = "blocks.0.attn1.to_q"
    expected = base[f"{key}.weight"] + 0.5 * sd[f"{key}.lora_B.default.weight"] @ sd[f"{key}.lora_A.default.weight"]
    assert torch.allclose(dit.state_dict()[f"{key}.weight"], expected, rtol=0, atol=1e-6)
    mm.clear_loras()
    assert all(torch.equal(v, base[k]) for k, v in dit.state_dict().items())


def test_lora_for_another_shape_fails_and_changes_nothing(folder, tmp_path):
    mm = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder / "transformer"])
    dit = mm.fetch_model("cog_dit")
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    _lora_file(tmp_path / "wide.safetensors", dit, wrong_shape=True)
    with pytest.raises(LoRAError, match="blocks.0.attn1.to_q"):
        mm.load_lora(tmp_path / "wide.safetensors")
    assert all(torch.equal(v, base[k]) for k, v in dit.state_dict().items())
    assert mm.loras == []
