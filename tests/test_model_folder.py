"""The one model-folder resolver: what each accepted path resolves to, and every entry point reading it alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_DIT, make_diffusers_dit, make_diffusers_vae, save_tiny_model_folder

from diffsynth_cog import CogVideoPipeline, ModelManager
from diffsynth_cog.configs import VAE_SCALING_FACTORS
from diffsynth_cog.errors import ModelDetectionError
from diffsynth_cog.loading.model_folder import resolve_model_folder

SCALE_2B = VAE_SCALING_FACTORS["cogvideox-2b"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b"), "cogvideox-5b", seed=2)


@pytest.fixture(scope="module")
def folder_2b(tmp_path_factory, folder) -> Path:
    """A 2B-family folder whose VAE has no config.json and no scheduler: only the family rule can tell."""
    root = tmp_path_factory.mktemp("tiny-2b") / "CogVideoX-2b"
    shutil.copytree(folder, root, ignore=shutil.ignore_patterns("transformer", "vae", "scheduler"))
    make_diffusers_dit("cogvideox-2b", seed=5, max_text_seq_length=11).save_pretrained(root / "transformer")
    # The group count is not in the weights: a lone VAE file is read with the real VAE's 32 groups.
    make_diffusers_vae(seed=3, block_out_channels=(32, 32, 32, 32), norm_num_groups=32).save_pretrained(root / "vae")
    (root / "vae" / "config.json").unlink()
    return root


@pytest.mark.parametrize(
    "start", ["", "transformer", "transformer/diffusion_pytorch_model.safetensors", "text_encoder", "vae"]
)
def test_every_accepted_start_finds_the_whole_model(folder, start):
    found = resolve_model_folder(folder / start if start else folder)
    assert found.root == folder
    # The part given stays as given (a weights file too); the others are the folder's.
    transformer = folder / start if start.startswith("transformer") else folder / "transformer"
    assert (found.transformer, found.text_encoder, found.vae) == (transformer, folder / "text_encoder", folder / "vae")
    assert found.tokenizer == folder / "tokenizer"
    assert found.scheduler_config == folder / "scheduler" / "scheduler_config.json"
    assert found.family == "cogvideox-5b"
    assert found.max_text_seq_length == TINY_DIT["max_text_seq_length"]
    assert found.vae_scaling_factor == 0.7 and found.vae_scaling_factor_source.endswith("vae/config.json")


def test_lone_vae_file_takes_the_scale_of_its_transformers_family(folder_2b):
    found = resolve_model_folder(folder_2b / "vae" / "diffusion_pytorch_model.safetensors")
    assert found.vae_scaling_factor == SCALE_2B and "cogvideox-2b" in found.vae_scaling_factor_source
    assert found.scheduler_config is None and found.max_text_seq_length == 11


def test_vae_config_wins_over_the_family_and_a_lone_vae_has_no_scale(folder, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(folder / "vae", root / "vae")
    make_diffusers_dit("cogvideox-2b", seed=5).save_pretrained(root / "transformer")
    assert resolve_model_folder(root).vae_scaling_factor == 0.7  # vae/config.json says so
    lone = tmp_path / "elsewhere" / "weights.safetensors"
    lone.parent.mkdir()
    shutil.copy(folder / "vae" / "diffusion_pytorch_model.safetensors", lone)
    found = resolve_model_folder(lone, part="vae")
    assert found.root is None and found.vae == lone and found.vae_scaling_factor is None
    assert found.max_text_seq_length == 226  # no transformer: CogVideoX's T5 length


def test_missing_parts_say_where_they_were_looked_for(folder, tmp_path):
    alone = tmp_path / "alone" / "text_encoder"
    shutil.copytree(folder / "text_encoder", alone)
    found = resolve_model_folder(alone)
    with pytest.raises(FileNotFoundError, match="tokenizer_path") as info:
        found.require("tokenizer")
    assert str(tmp_path / "alone" / "tokenizer") in str(info.value) and str(alone) in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"no transformer/ in the model folder"):
        found.require("transformer")
    with pytest.raises(FileNotFoundError, match="model not found"):
        resolve_model_folder(tmp_path / "nothing")
    weights = tmp_path / "x.safetensors"
    shutil.copy(folder / "vae" / "diffusion_pytorch_model.safetensors", weights)
    with pytest.raises(ModelDetectionError, match="part="):
        resolve_model_folder(weights)


def test_parts_given_one_by_one_override_the_folder(folder, folder_2b):
    found = resolve_model_folder(folder_2b, vae=folder / "vae", tokenizer=folder / "tokenizer")
    assert found.vae == folder / "vae" and found.vae_scaling_factor == 0.7
    assert found.tokenizer == folder / "tokenizer" and found.transformer == folder_2b / "transformer"
    only = resolve_model_folder(text_encoder=folder_2b / "text_encoder", vae=folder_2b / "vae")
    assert only.root == folder_2b and only.vae_scaling_factor == SCALE_2B


def test_every_entry_point_reads_the_family_and_text_length_alike(folder_2b):
    """ModelManager + pipeline, the prepare step and the trainer: same text length, VAE scale and scheduler."""
    from diffsynth_cog.training.module import read_dit_config, read_scheduler_config
    from diffsynth_cog.training.prepare import load_encoders

    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder_2b])
    pipe = CogVideoPipeline.from_model_manager(manager)
    encoders = load_encoders(folder_2b, dtype=torch.float32)
    assert manager.fetch_model("cog_text_encoder").max_length == encoders.text_encoder.max_length == 11
    assert manager.fetch_model("cog_vae_decoder").config.scaling_factor == SCALE_2B
    assert encoders.vae_encoder.config.scaling_factor == SCALE_2B
    dit_config = read_dit_config(folder_2b / "transformer")
    assert dit_config == pipe.dit.config
    assert pipe.scheduler_config.snr_shift_scale == read_scheduler_config(folder_2b, dit_config).snr_shift_scale == 3.0
