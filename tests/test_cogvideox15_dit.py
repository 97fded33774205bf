"""CogVideoX 1.5 in the models: the DiT computes what diffusers' CogVideoXTransformer3DModel computes with a temporal
patch (T2V, and I2V with its ofs embedding), and the released 1.5 checkpoints' keys map onto ours at full size.

Weights travel the real path (diffusers ``save_pretrained`` -> our ``load_dit``); the reference gets the RoPE its
1.5 pipelines build (``grid_type="slice"``, ``max_size`` = sample size / patch). fp32, relative error 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_DIT, make_diffusers_dit

from diffsynth_cog.configs import DIT_PRESETS, DiTConfig, dit_family
from diffsynth_cog.errors import ModelDetectionError
from diffsynth_cog.loading.convert import account_keys, model_shapes
from diffsynth_cog.loading.dit_loader import dit_rename, infer_dit_config, is_dit_checkpoint, load_dit
from diffsynth_cog.models.dit import CogDiT

RTOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def diffusers_forward(model, latents, timestep, prompt_emb, ofs=None):
    """The reference on latents [B, C, T, H, W] with the RoPE its 1.5 pipelines build."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cfg = model.config
    _, _, t, h, w = latents.shape
    p, pt = cfg.patch_size, cfg.patch_size_t
    rope = get_3d_rotary_pos_embed(
        cfg.attention_head_dim,
        None,
        (h // p, w // p),
        (t + pt - 1) // pt,
        grid_type="slice",
        max_size=(cfg.sample_height // p, cfg.sample_width // p),
    )
    out = model(
        hidden_states=latents.transpose(1, 2),
        encoder_hidden_states=prompt_emb,
        timestep=timestep,
        ofs=ofs,
        image_rotary_emb=rope,
        return_dict=False,
    )[0]
    return out.transpose(1, 2)


def inputs(in_channels: int, t: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, in_channels, t, h, w, generator=g)
    prompt = torch.randn(2, TINY_DIT["max_text_seq_length"], TINY_DIT["text_embed_dim"], generator=g)
    return latents, torch.tensor([999, 421]), prompt


@pytest.fixture(scope="module", params=["cogvideox1.5-5b", "cogvideox1.5-5b-i2v"])
def pair(request, tmp_path_factory):
    preset = request.param
    ref = make_diffusers_dit(preset, seed=3)
    folder = tmp_path_factory.mktemp(preset) / "transformer"
    ref.save_pretrained(folder)
    return preset, ref, load_dit(folder)


# (latent frames, rows, cols): an odd and an even number of temporal patches; square and non-square grids,
# a grid smaller than the max grid (12x14 latents) and the whole of it.
@pytest.mark.parametrize("shape", [(2, 4, 6), (4, 6, 4), (6, 12, 14), (8, 4, 10)])
def test_dit_15_matches_diffusers(pair, shape):
    preset, ref, ours = pair
    assert dit_family(ours.config) == preset
    latents, timestep, prompt = inputs(ours.config.in_channels, *shape)
    with torch.no_grad():
        ofs = torch.full((1,), 2.0) if ours.config.ofs_embed_dim else None
        expected = diffusers_forward(ref, latents, timestep, prompt, ofs)
        got = ours(latents, timestep, prompt)  # ofs: the family's 2.0 by default
    assert got.shape == latents[:, :4].shape
    assert rel_err(got, expected) < RTOL


def test_ofs_embedding_changes_the_output_and_follows_the_given_value():
    ref = make_diffusers_dit("cogvideox1.5-5b-i2v", seed=4)
    ours = CogDiT(DiTConfig.from_dict(dict(ref.config)))
    ours.load_state_dict({dit_rename(k): v for k, v in ref.state_dict().items()})
    latents, timestep, prompt = inputs(8, 4, 4, 6, seed=2)
    with torch.no_grad():
        at_two, at_five = ours(latents, timestep, prompt), ours(latents, timestep, prompt, ofs=5.0)
        expected = diffusers_forward(ref, latents, timestep, prompt, torch.full((1,), 5.0))
    assert rel_err(at_five, expected) < RTOL
    assert rel_err(at_two, at_five) > 1e-3


def test_odd_latent_frames_and_grids_past_the_max_grid_are_refused(pair):
    _, _, ours = pair
    latents, timestep, prompt = inputs(ours.config.in_channels, 3, 4, 6)
    with pytest.raises(ValueError, match=r"3 frames.*temporal patches of 2 latent frames.*pads to 4"):
        ours(latents, timestep, prompt)
    latents, timestep, prompt = inputs(ours.config.in_channels, 2, 14, 6)
    with pytest.raises(ValueError, match=r"7x3 patch grid exceeds .* 6x7 patches"):
        ours(latents, timestep, prompt)


def test_token_layout_counts_temporal_patches():
    ours = CogDiT(DiTConfig(**{**TINY_DIT, "patch_size_t": 2, "sample_height": 12, "sample_width": 14}))
    latents, timestep, prompt = inputs(16, 6, 4, 6)
    state = ours.embed(latents, timestep, prompt)
    assert state.layout.grid == (3, 2, 3) and state.layout.patch_t == 2 and state.layout.latent_frames == 6
    assert state.video.shape[1] == state.layout.n_video == 18


# The released transformer configs (REFERENCE.md section 9), diffusers field names.
_FULL_15 = dict(
    num_attention_heads=48,
    attention_head_dim=64,
    out_channels=16,
    num_layers=42,
    time_embed_dim=512,
    text_embed_dim=4096,
    max_text_seq_length=226,
    patch_size=2,
    patch_size_t=2,
    patch_bias=False,
    sample_frames=81,
    sample_height=300,
    sample_width=300,
    spatial_interpolation_scale=1.875,
    temporal_compression_ratio=4,
    use_rotary_positional_embeddings=True,
    use_learned_positional_embeddings=False,
)
FULL_15 = {
    "cogvideox1.5-5b": dict(_FULL_15, in_channels=16),
    "cogvideox1.5-5b-i2v": dict(_FULL_15, in_channels=32, ofs_embed_dim=512),
}


@pytest.mark.parametrize("preset", sorted(FULL_15))
def test_full_size_15_keys_all_map_with_equal_shapes(preset):
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        ref = CogVideoXTransformer3DModel(**FULL_15[preset])
        ours = CogDiT(DIT_PRESETS[preset])
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    report = account_keys(theirs, model_shapes(ours), dit_rename, source=preset)
    assert report.ok, report.describe()
    assert len(report.used) == len(theirs) and not report.ignored
    assert DiTConfig.from_dict(FULL_15[preset]) == DIT_PRESETS[preset]
    # Without a config.json the architecture is recovered from the shapes (the Linear patch embedding and the
    # ofs embedding tell the 1.5 presets apart).
    assert is_dit_checkpoint(theirs)
    assert infer_dit_config(theirs) == DIT_PRESETS[preset]


def test_unknown_15_sized_weights_without_config_ask_for_one():
    with torch.device("meta"):
        ours = CogDiT(DiTConfig(**{**TINY_DIT, "patch_size_t": 2}))
    with pytest.raises(ModelDetectionError, match="config.json"):
        infer_dit_config(model_shapes(ours))


def test_15_config_checks_name_the_field():
    with pytest.raises(ValueError, match="ofs_embed_dim 256 must equal time_embed_dim 512"):
        DiTConfig.from_dict({**FULL_15["cogvideox1.5-5b-i2v"], "ofs_embed_dim": 256}, source="transformer/config.json")
    with pytest.raises(ValueError, match="patch_size_t .* needs RoPE"):
        DiTConfig(patch_size_t=2, use_rotary_positional_embeddings=False)
    with pytest.raises(ValueError, match="patch_bias=False is only supported with patch_size_t"):
        DiTConfig(patch_bias=False)
