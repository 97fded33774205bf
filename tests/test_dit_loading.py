"""Loading the transformer from raw files: layouts, full-size key compatibility, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import make_diffusers_dit

from diffsynth_cog.configs import DIT_PRESETS
from diffsynth_cog.errors import ModelDetectionError, StateDictMismatchError, WeightsFileError
from diffsynth_cog.loading.convert import account_keys, model_shapes
from diffsynth_cog.loading.dit_loader import dit_rename, infer_dit_config, is_dit_checkpoint, load_dit
from diffsynth_cog.models.dit import CogDiT

# The real configs, as in each model's transformer/config.json (REFERENCE.md section 1).
_COMMON = dict(
    attention_head_dim=64,
    time_embed_dim=512,
    text_embed_dim=4096,
    sample_width=90,
    sample_height=60,
    sample_frames=49,
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=226,
    spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0,
    out_channels=16,
)
FULL_CONFIGS = {
    "cogvideox-2b": dict(_COMMON, num_attention_heads=30, num_layers=30, in_channels=16),
    "cogvideox-5b": dict(
        _COMMON, num_attention_heads=48, num_layers=42, in_channels=16, use_rotary_positional_embeddings=True
    ),
    "cogvideox-5b-i2v": dict(
        _COMMON,
        num_attention_heads=48,
        num_layers=42,
        in_channels=32,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True,
    ),
}


def _params(shapes: dict[str, tuple[int, ...]]) -> int:
    n = 0
    for s in shapes.values():
        k = 1
        for d in s:
            k *= d
        n += k
    return n


@pytest.mark.parametrize("preset", sorted(FULL_CONFIGS))
def test_full_size_reference_keys_all_map_with_equal_shapes(preset):
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        ref = CogVideoXTransformer3DModel(**FULL_CONFIGS[preset])
        ours = CogDiT(DIT_PRESETS[preset])
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    report = account_keys(theirs, model_shapes(ours), dit_rename, source=preset)
    assert report.ok, report.describe()
    assert len(report.used) == len(theirs) and not report.ignored
    # Our preset is the same model as the reference's config (parameter count included).
    assert _params(model_shapes(ours)) == _params(theirs)
    if preset == "cogvideox-5b":
        assert _params(theirs) == 5_570_283_072  # measured figure in REFERENCE.md
    # A weights file with no config.json: the architecture is recovered from shapes alone.
    assert is_dit_checkpoint(theirs)
    assert infer_dit_config(theirs) == DIT_PRESETS[preset]


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    ref = make_diffusers_dit("cogvideox-5b", seed=5)
    ref.save_pretrained(tmp_path / "single")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    a, b = load_dit(tmp_path / "single"), load_dit(tmp_path / "sharded")
    index = next((tmp_path / "sharded").glob("*.index.json"))
    c = load_dit(index)  # the index file itself is a valid path too
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]) and torch.equal(v, c.state_dict()[k])


def test_single_file_with_config_beside_it_and_dtype(tmp_path):
    ref = make_diffusers_dit("cogvideox-2b", seed=5)
    ref.save_pretrained(tmp_path / "t")
    model = load_dit(tmp_path / "t" / "diffusion_pytorch_model.safetensors", dtype=torch.bfloat16)
    assert model.patch_embed.weight.dtype == torch.bfloat16
    assert not model.config.use_rotary_positional_embeddings


def test_single_file_of_unknown_size_without_config_asks_for_config(tmp_path):
    ref = make_diffusers_dit("cogvideox-5b", seed=5)
    ref.save_pretrained(tmp_path / "t")
    shutil.copy(tmp_path / "t" / "diffusion_pytorch_model.safetensors", tmp_path / "alone.safetensors")
    with pytest.raises(ModelDetectionError, match="config.json"):
        load_dit(tmp_path / "alone.safetensors")


def test_our_own_key_names_load_too(tmp_path):
    ref = make_diffusers_dit("cogvideox-5b-i2v", seed=5)
    ref.save_pretrained(tmp_path / "t")
    model = load_dit(tmp_path / "t")
    (tmp_path / "ours").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "ours" / "model.safetensors")
    shutil.copy(tmp_path / "t" / "config.json", tmp_path / "ours" / "config.json")
    again = load_dit(tmp_path / "ours")
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_corrupt_safetensors_is_reported_with_the_file(tmp_path):
    ref = make_diffusers_dit("cogvideox-5b", seed=5)
    ref.save_pretrained(tmp_path / "t")
    f = tmp_path / "t" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(WeightsFileError, match="corrupt safetensors header") as e:
        load_dit(tmp_path / "t")
    assert str(f) in str(e.value)


def test_truncated_safetensors_is_reported_before_loading(tmp_path):
    ref = make_diffusers_dit("cogvideox-5b", seed=5)
    ref.save_pretrained(tmp_path / "t")
    f = tmp_path / "t" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsFileError, match="truncated"):
        load_dit(tmp_path / "t")


def test_folder_without_weights_and_missing_path_are_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(WeightsFileError, match="no weights found"):
        load_dit(tmp_path / "empty")
    with pytest.raises(WeightsFileError, match="no such file"):
        load_dit(tmp_path / "nowhere")


def test_missing_shard_is_named(tmp_path):
    make_diffusers_dit("cogvideox-5b", seed=5).save_pretrained(tmp_path / "t", max_shard_size="20KB")
    shard = sorted((tmp_path / "t").glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsFileError, match=shard.name):
        load_dit(tmp_path / "t")


def test_weights_of_another_model_are_rejected_naming_keys(tmp_path):
    (tmp_path / "t").mkdir()
    save_file({"encoder.conv_in.conv.weight": torch.zeros(8, 3, 3, 3, 3)}, tmp_path / "t" / "model.safetensors")
    with pytest.raises(ModelDetectionError, match="not a CogVideoX transformer"):
        load_dit(tmp_path / "t")
    # With a transformer config beside them, the leftover and missing keys are listed.
    (tmp_path / "t" / "config.json").write_text(json.dumps(make_diffusers_dit("cogvideox-5b").config))
    with pytest.raises(StateDictMismatchError, match="encoder.conv_in.conv.weight"):
        load_dit(tmp_path / "t")


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    ref = make_diffusers_dit("cogvideox-5b", seed=5)
    ref.save_pretrained(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["text_embed_dim"] = 40
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        StateDictMismatchError, match=r"patch_embed.text_proj.weight: expected \[32, 40\], found \[32, 32\]"
    ):
        load_dit(tmp_path / "t")


def test_a_10_checkpoint_under_a_15_config_fails_on_the_patch_shapes(tmp_path):
    ref = make_diffusers_dit("cogvideox-5b", seed=5)
    ref.save_pretrained(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["patch_size_t"] = 2
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        StateDictMismatchError, match=r"patch_embed.proj.weight: expected \[32, 32\], found \[32, 4, 2, 2\]"
    ):
        load_dit(tmp_path / "t")


def test_unsupported_config_fields_are_rejected(tmp_path):
    ref = make_diffusers_dit("cogvideox-5b", seed=5)
    ref.save_pretrained(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["frame_skip"] = 2
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported config field\(s\) \['frame_skip'\]"):
        load_dit(tmp_path / "t")
