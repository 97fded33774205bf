"""The DiT computes what diffusers' CogVideoXTransformer3DModel computes, in all three presets.

Weights travel the real path: diffusers ``save_pretrained`` -> our ``load_dit``.
Tolerance: relative error 1e-5 in fp32. Both sides do the same arithmetic in a different
order (our RoPE covers text with an identity rotation, we patchify from [B, C, T, H, W]), so
we expect rounding-level differences (~1e-7 per op) growing over two blocks, not bitwise equality.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_DIT, make_diffusers_dit

from diffsynth_cog.loading.dit_loader import load_dit

RTOL = 1e-5  # observed: 0.0 (bitwise equal) with this CPU build of torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def diffusers_forward(model, latents, timestep, prompt_emb):
    """Runs the reference with the RoPE its pipeline would build for this latent shape."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = model.config
    _, _, t, h, w = latents.shape
    rope = None
    if cfg.use_rotary_positional_embeddings:
        gh, gw = h // cfg.patch_size, w // cfg.patch_size
        crops = get_resize_crop_region_for_grid(
            (gh, gw), cfg.sample_width // cfg.patch_size, cfg.sample_height // cfg.patch_size
        )
        rope = get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, (gh, gw), t)
    out = model(
        hidden_states=latents.transpose(1, 2),
        encoder_hidden_states=prompt_emb,
        timestep=timestep,
        image_rotary_emb=rope,
        return_dict=False,
    )[0]
    return out.transpose(1, 2)


def inputs(in_channels: int, t: int, h: int, w: int, seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, in_channels, t, h, w, generator=g)
    prompt = torch.randn(batch, TINY_DIT["max_text_seq_length"], TINY_DIT["text_embed_dim"], generator=g)
    timestep = torch.tensor([999, 421][:batch])
    return latents, timestep, prompt


@pytest.fixture(scope="module", params=["cogvideox-2b", "cogvideox-5b", "cogvideox-5b-i2v"])
def pair(request, tmp_path_factory):
    preset = request.param
    ref = make_diffusers_dit(preset, seed=3)
    folder = tmp_path_factory.mktemp(preset) / "transformer"
    ref.save_pretrained(folder)
    ours = load_dit(folder)
    return preset, ref, ours


# 3 latent frames = the config's sample_frames (9); 5 and 9 go beyond it, as 129 frames go
# beyond CogVideoX's 49; 1 is a single image.
@pytest.mark.parametrize("frames", [1, 3, 5, 9])
def test_dit_matches_diffusers_at_latent_frames(pair, frames):
    preset, ref, ours = pair
    latents, timestep, prompt = inputs(ref.config.in_channels, frames, 4, 6)
    with torch.no_grad():
        expected = diffusers_forward(ref, latents, timestep, prompt)
        got = ours(latents, timestep, prompt)
    assert got.shape == (2, ref.config.out_channels, frames, 4, 6)
    assert rel_err(got, expected) < RTOL, preset


@pytest.mark.parametrize("hw", [(8, 6), (4, 10), (6, 6)])
def test_dit_matches_diffusers_at_other_resolutions(pair, hw):
    """RoPE / sin-cos positions follow the config's base grid (crop region) at other sizes."""
    preset, ref, ours = pair
    if preset == "cogvideox-5b-i2v":
        pytest.skip("learned position embeddings exist only at the training resolution")
    latents, timestep, prompt = inputs(ref.config.in_channels, 3, *hw)
    with torch.no_grad():
        expected = diffusers_forward(ref, latents, timestep, prompt)
        got = ours(latents, timestep, prompt)
    assert rel_err(got, expected) < RTOL


def test_dit_accepts_scalar_and_fractional_timesteps(pair):
    _, ref, ours = pair
    latents, _, prompt = inputs(ref.config.in_channels, 3, 4, 6)
    for ts in (torch.tensor(500), torch.tensor([250.5, 10.25])):
        with torch.no_grad():
            expected = diffusers_forward(ref, latents, ts.expand(2) if ts.ndim == 0 else ts, prompt)
            got = ours(latents, ts, prompt)
        assert rel_err(got, expected) < RTOL


def test_gradient_checkpointing_gives_the_same_gradients(pair):
    _, _, ours = pair
    latents, timestep, prompt = inputs(ours.config.in_channels, 3, 4, 6)
    grads = []
    for ckpt in (False, True):
        ours.zero_grad(set_to_none=True)
        ours.enable_gradient_checkpointing(ckpt)
        ours(latents, timestep, prompt).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    ours.enable_gradient_checkpointing(False)
    ours.zero_grad(set_to_none=True)
    assert rel_err(grads[1], grads[0]) < 1e-6


def test_wrong_channel_count_is_rejected_with_the_expected_count(pair):
    _, ref, ours = pair
    latents, timestep, prompt = inputs(ref.config.in_channels + 1, 3, 4, 6)
    with pytest.raises(ValueError, match=f"expects in_channels={ref.config.in_channels}"):
        ours(latents, timestep, prompt)


def test_odd_latent_size_and_bad_prompt_are_rejected(pair):
    _, ref, ours = pair
    latents, timestep, prompt = inputs(ref.config.in_channels, 3, 5, 6)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        ours(latents, timestep, prompt)
    latents, timestep, prompt = inputs(ref.config.in_channels, 3, 4, 6)
    with pytest.raises(ValueError, match="prompt_emb must be"):
        ours(latents, timestep, prompt[..., :-1])
