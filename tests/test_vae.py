"""The CogVideoX VAE against diffusers' AutoencoderKLCogVideoX, and its loader.

Every comparison goes through the real loading path: a tiny diffusers VAE with seeded random
weights is saved with ``save_pretrained`` and loaded with ``load_vae``.

Tolerances: our modules compute the same fp32 operations as diffusers (the spatial norms' 1x1
convs run before the nearest resize instead of after, which commutes exactly), so outputs
agree to the last bits in practice (measured: 0.0). We hold rel <= 1e-5: a few float32 ulps
(1.2e-7) accumulated over the ~30 convolution/normalisation layers, leaving room for a
different convolution algorithm on another CPU.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import make_diffusers_dit

import diffsynth_cog.models.vae_blocks as vae_blocks
from diffsynth_cog.configs import VAEConfig
from diffsynth_cog.errors import ModelDetectionError, StateDictMismatchError, WeightsFileError
from diffsynth_cog.loading.convert import account_keys, model_shapes
from diffsynth_cog.loading.vae_loader import (
    infer_vae_config,
    is_vae_checkpoint,
    load_vae,
    load_vae_decoder,
    load_vae_encoder,
    plan_vae_load,
    vae_rename,
)
from diffsynth_cog.models.vae import CogVAE, CogVAEDecoder, CogVAEEncoder, temporal_chunks

diffusers = pytest.importorskip("diffusers")

PARITY_TOL = 1e-5

# norm_num_groups is 32 (the real value) so the config inferred from a bare weights file (which
# cannot show the grouping) is the same as the saved one. 64-channel levels then hold 2 channels
# per group. sample_height/width are chosen so the *default* tiles (half the sample size,
# overlap 1/6 x 1/5) fall on whole latents, the case in which diffusers' tiling is consistent.
TINY_VAE = dict(
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_height=96,
    sample_width=80,
    scaling_factor=0.7,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomize_vae_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights at a fan-in scale (activations stay O(1) through ~30 layers), norm gains
    around 1 and non-zero biases, so no layer is an identity or a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and ".conv" not in name:
                p.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def make_diffusers_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKLCogVideoX

    return randomize_vae_(AutoencoderKLCogVideoX(**{**TINY_VAE, **overrides}), seed).eval()


def video(frames: int, height: int = 32, width: int = 48, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1


def latents(frames: int, height: int = 4, width: int = 6, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TINY_VAE["latent_channels"], frames, height, width, generator=g)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """(diffusers reference, folder it was saved to)."""
    ref = make_diffusers_vae(seed=0)
    folder = tmp_path_factory.mktemp("model") / "vae"
    ref.save_pretrained(folder)
    return ref, folder


@pytest.fixture(scope="module")
def ref(saved):
    return saved[0]


@pytest.fixture(scope="module")
def ours(saved) -> CogVAE:
    return load_vae(saved[1])


def set_ref_tiling(ref, enabled: bool, **kwargs) -> None:
    """Puts diffusers' tiling back to its constructor defaults, then enables it with ``kwargs``
    (enable_tiling keeps earlier custom values for arguments it is not given)."""
    ref.disable_tiling()
    scale = 2 ** (len(ref.config.block_out_channels) - 1)
    ref.tile_sample_min_height = ref.config.sample_height // 2
    ref.tile_sample_min_width = ref.config.sample_width // 2
    ref.tile_latent_min_height = ref.tile_sample_min_height // scale
    ref.tile_latent_min_width = ref.tile_sample_min_width // scale
    ref.tile_overlap_factor_height, ref.tile_overlap_factor_width = 1 / 6, 1 / 5
    if enabled:
        ref.enable_tiling(**kwargs)


# ----------------------------------------------------------------------------------------------
# Parity with diffusers (untiled)


@pytest.mark.parametrize("frames", [9, 17, 33])
def test_encode_matches_diffusers(ref, ours, frames):
    x = video(frames, seed=frames)
    set_ref_tiling(ref, False)
    with torch.no_grad():
        want = ref.encode(x).latent_dist.mode()
        got = ours.encode(x)
    assert got.shape == (1, 4, (frames - 1) // 4 + 1, 4, 6)
    assert rel(got, want) <= PARITY_TOL


@pytest.mark.parametrize("latent_frames", [3, 5, 9])
def test_decode_matches_diffusers(ref, ours, latent_frames):
    z = latents(latent_frames, seed=latent_frames)
    set_ref_tiling(ref, False)
    with torch.no_grad():
        want = ref.decode(z).sample
        got = ours.decode(z)
    assert got.shape == (1, 3, 4 * (latent_frames - 1) + 1, 32, 48)
    assert rel(got, want) <= PARITY_TOL


def test_encode_sample_matches_diffusers_posterior_sample(ref, ours):
    x = video(9, seed=3)
    set_ref_tiling(ref, False)
    with torch.no_grad():
        want = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
        got = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        mean = ours.encode(x)
    assert rel(got, want) <= PARITY_TOL
    assert rel(got, mean) > 1e-3  # the noise is really there


def test_batch_decodes_like_single_samples(ours):
    z = latents(3, batch=2, seed=11)
    with torch.no_grad():
        both = ours.decode(z)
        single = torch.cat([ours.decode(z[i : i + 1]) for i in range(2)])
    assert rel(both, single) <= PARITY_TOL  # GroupNorm statistics are per sample


def test_decode_with_gradients_matches_inference_and_backpropagates(ours):
    """With autograd recording, the spatial norms take their out-of-place path: same numbers."""
    z = latents(3, 2, 3, seed=12).requires_grad_(True)
    out = ours.decode(z)
    with torch.no_grad():
        want = ours.decode(z)
    assert rel(out.detach(), want) <= PARITY_TOL
    out.square().mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    ours.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# Temporal chunks and the explicit cache


@pytest.mark.parametrize("groups,channels", [(32, 64), (4, 8), (1, 5)])
def test_split_group_norm_matches_torch_group_norm(groups, channels):
    """Same output as F.group_norm: fp32 to rounding, bf16 within one bf16 step."""
    g = torch.Generator().manual_seed(groups)
    x = torch.randn(2, channels, 3, 10, 12, generator=g) * 3 + 0.5
    w, b = 1 + 0.2 * torch.randn(channels, generator=g), 0.2 * torch.randn(channels, generator=g)
    fast = vae_blocks.group_norm_stats_split
    F = torch.nn.functional
    assert rel(fast(x, groups, w, b, 1e-6), F.group_norm(x, groups, w, b, 1e-6)) < 1e-6
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    want = F.group_norm(xb, groups, wb, bb, 1e-6).float()
    assert (fast(xb, groups, wb, bb, 1e-6).float() - want).abs().max() <= want.abs().max() * 2**-7
    assert rel(fast(x, groups, None, None, 1e-6), F.group_norm(x, groups, None, None, 1e-6)) < 1e-6


def test_split_group_norm_holds_bf16_accuracy_when_the_mean_dwarfs_the_spread():
    """E[x^2] - E[x]^2 in fp32 at |mean| / std = 100: still within bf16's own rounding (2^-8)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 4, 16, 16, generator=g) + 100.0
    want = torch.nn.functional.group_norm(x, 2, eps=1e-6)
    assert rel(vae_blocks.group_norm_stats_split(x, 2, None, None, 1e-6), want) < 2**-8


def test_split_group_norm_keeps_a_channels_last_layout_and_its_values():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 3, 5, 7, generator=g)
    fast = vae_blocks.group_norm_stats_split
    out = fast(x.contiguous(memory_format=torch.channels_last_3d), 4, None, None, 1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert rel(out, fast(x, 4, None, None, 1e-6)) < 1e-6


def test_group_norm_module_is_torch_group_norm_off_gpu_and_in_training():
    g = torch.Generator().manual_seed(4)
    norm = vae_blocks.GroupNorm(2, 4)
    x = torch.randn(1, 4, 2, 3, 3, generator=g)
    assert torch.equal(norm(x), torch.nn.functional.group_norm(x, 2, norm.weight, norm.bias, norm.eps))
    x.requires_grad_(True)
    norm(x).square().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


@pytest.mark.parametrize("tiled", [False, True])
def test_channels_last_decode_and_encode_equal_channels_first(ours, tiled):
    z = latents(3, 8, 12, seed=5)
    x = video(9, 64, 96, seed=6)
    kwargs = dict(tiled=tiled, tile_sample_size=(32, 48)) if tiled else {}
    enc_kwargs = dict(tiled=tiled, tile_sample_size=(32, 48)) if tiled else {}
    try:
        with torch.no_grad():
            ours.decoder.channels_last = ours.encoder.channels_last = False
            want_x, want_z = ours.decode(z, **kwargs), ours.encode(x, **enc_kwargs)
            ours.decoder.channels_last = ours.encoder.channels_last = True
            got_x, got_z = ours.decode(z, **kwargs), ours.encode(x, **enc_kwargs)
    finally:
        ours.decoder.channels_last = ours.encoder.channels_last = None
    assert got_x.is_contiguous() and got_z.is_contiguous()
    assert rel(got_x, want_x) <= PARITY_TOL and rel(got_z, want_z) <= PARITY_TOL


def test_chunk_schedule_matches_diffusers_slicing():
    # diffusers: max(n // c, 1) chunks, the first one taking the n % c extra frames.
    assert temporal_chunks(9, 2) == [(0, 3), (3, 5), (5, 7), (7, 9)]
    assert temporal_chunks(33, 8) == [(0, 9), (9, 17), (17, 25), (25, 33)]
    assert temporal_chunks(13, 8) == [(0, 13)]
    assert temporal_chunks(1, 2) == [(0, 1)]


def test_chunked_decode_with_explicit_cache_equals_one_shot(ours):
    z = latents(7, seed=5)
    decoder = ours.decoder
    with torch.no_grad():
        one_shot = decoder.decode(z)
        cache = None
        parts = []
        for start, end in [(0, 3), (3, 5), (5, 7)]:
            frames, cache = decoder.forward_chunk(z[:, :, start:end], cache)
            assert isinstance(cache, dict) and all(isinstance(t, torch.Tensor) for t in cache.values())
            parts.append(frames)
        chunked = torch.cat(parts, dim=2)
        # The second chunk without the first chunk's cache pads with its own first frame instead.
        cold, _ = decoder.forward_chunk(z[:, :, 3:5], None)
    assert [p.shape[2] for p in parts] == [9, 8, 8]
    assert rel(chunked, one_shot) <= PARITY_TOL
    assert rel(cold, parts[1]) > 1e-2, "the cache must carry state between chunks"


def test_chunked_encode_with_explicit_cache_equals_one_shot(ours):
    x = video(17, seed=6)
    encoder = ours.encoder
    with torch.no_grad():
        one_shot = encoder.encode(x)
        first, cache = encoder.forward_chunk(x[:, :, :9], None)
        second, _ = encoder.forward_chunk(x[:, :, 9:], cache)
        cold, _ = encoder.forward_chunk(x[:, :, 9:], None)
    mean = torch.cat([first, second], dim=2).chunk(2, dim=1)[0]
    assert rel(mean, one_shot) <= PARITY_TOL
    assert rel(cold, second) > 1e-2


def test_cache_from_another_module_is_rejected(ours):
    with torch.no_grad():
        _, enc_cache = ours.encoder.forward_chunk(video(9), None)
        with pytest.raises(ValueError, match="conv cache has no entry for 'conv_in'|conv cache entry 'conv_in'"):
            ours.decoder.forward_chunk(latents(2), enc_cache)
        _, dec_cache = ours.decoder.forward_chunk(latents(3), None)
        with pytest.raises(ValueError, match="expected"):  # other tile size
            ours.decoder.forward_chunk(latents(2, height=2, width=2), dec_cache)


def test_time_sliced_convolution_is_exact(ours, monkeypatch):
    z = latents(3, seed=9)
    with torch.no_grad():
        whole = ours.decode(z)
        monkeypatch.setattr(vae_blocks, "MAX_CONV_INPUT_ELEMENTS", 4096)  # every big conv is split in time
        sliced = ours.decode(z)
    assert rel(sliced, whole) <= PARITY_TOL


# ----------------------------------------------------------------------------------------------
# Spatial tiling


def test_tiled_small_tiles_match_diffusers_tiled(ref, ours):
    """64x96 pixels in 32x48 tiles (2 x 3 tiles with these overlaps): exact reference numerics."""
    x = video(9, 64, 96, seed=21)
    z = latents(3, 8, 12, seed=22)
    small = dict(tile_sample_min_height=32, tile_sample_min_width=48)
    set_ref_tiling(ref, True, **small, tile_overlap_factor_height=1 / 4, tile_overlap_factor_width=1 / 3)
    try:
        with torch.no_grad():
            want_z = ref.encode(x).latent_dist.mode()
            want_x = ref.decode(z).sample
            got_z = ours.encode(x, tiled=True, tile_sample_size=(32, 48), tile_overlap=(1 / 4, 1 / 3))
            got_x = ours.decode(z, tiled=True, tile_sample_size=(32, 48), tile_overlap=(1 / 4, 1 / 3))
    finally:
        set_ref_tiling(ref, False)
    assert got_z.shape == (1, 4, 3, 8, 12) and got_x.shape == (1, 3, 9, 64, 96)
    assert rel(got_z, want_z) <= PARITY_TOL
    assert rel(got_x, want_x) <= PARITY_TOL


def test_tiled_defaults_match_diffusers_enable_tiling(ref, ours):
    """Default tiles come from the config (half of sample_height x sample_width, overlap 1/6 x 1/5),
    like diffusers' enable_tiling(); 17 frames so tiles also run several temporal chunks."""
    x = video(17, 64, 96, seed=23)
    z = latents(5, 8, 12, seed=24)
    set_ref_tiling(ref, True)
    try:
        with torch.no_grad():
            want_z = ref.encode(x).latent_dist.mode()
            want_x = ref.decode(z).sample
            got_z = ours.encode(x, tiled=True)
            got_x = ours.decode(z, tiled=True)
    finally:
        set_ref_tiling(ref, False)
    assert rel(got_z, want_z) <= PARITY_TOL
    assert rel(got_x, want_x) <= PARITY_TOL


def test_tiled_decode_is_a_crossfade_of_independently_decoded_tiles(ours):
    """One row of three tiles (latent columns 0-6, 4-10, 8-12): each tile is an ordinary decode of
    its crop, and 16-pixel overlaps fade linearly from the left tile to the right one."""
    z = latents(3, 4, 12, seed=25)
    with torch.no_grad():
        got = ours.decode(z, tiled=True, tile_sample_size=(32, 48), tile_overlap=(0.0, 1 / 3))
        t0, t1, t2 = (ours.decode(z[..., a:b]) for a, b in [(0, 6), (4, 10), (8, 12)])
    ramp = torch.arange(16, dtype=torch.float32) / 16
    expected = torch.cat(
        [
            t0[..., :32],
            t0[..., 32:48] * (1 - ramp) + t1[..., :16] * ramp,
            t1[..., 16:32],
            t1[..., 32:48] * (1 - ramp) + t2[..., :16] * ramp,
            t2[..., 16:32],
        ],
        dim=4,
    )
    assert got.shape == expected.shape == (1, 3, 9, 32, 96)
    assert rel(got, expected) <= 1e-6  # the same float ops in another arrangement


def test_tiled_agrees_with_untiled_approximately(ours):
    """Tiles normalise with their own GroupNorm statistics and see zero padding at their borders,
    so tiling is an approximation. With random weights (no learned locality) and tiles of a few
    latents (few samples per group) it is a loose one: measured rel 0.41 (4x6-latent tiles) and
    0.26 (6x8) for decode. We hold: below 0.5, shrinking as tiles grow, clearly below the
    distance between decodes of unrelated latents (about 1.4), and exact when one tile covers
    the input. Exact tiling arithmetic is proven by the diffusers parity tests above."""
    z = latents(3, 8, 12, seed=26)
    with torch.no_grad():
        untiled = ours.decode(z)
        small = ours.decode(z, tiled=True, tile_sample_size=(32, 48), tile_overlap=(1 / 4, 1 / 3))
        large = ours.decode(z, tiled=True, tile_sample_size=(48, 64), tile_overlap=(1 / 3, 1 / 4))
        whole = ours.decode(z, tiled=True, tile_sample_size=(64, 96))
        unrelated = ours.decode(latents(3, 8, 12, seed=27))
    err_small, err_large = rel(small, untiled), rel(large, untiled)
    assert err_large < err_small < 0.5
    assert err_small < 0.5 * rel(unrelated, untiled)
    assert torch.equal(whole, untiled)


def test_tiling_parameters_are_validated(ours):
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(video(9), tiled=True, tile_sample_size=(20, 24))
    with pytest.raises(ValueError, match="tile_overlap"):
        ours.decode(latents(3), tiled=True, tile_sample_size=(16, 16), tile_overlap=1.5)


# ----------------------------------------------------------------------------------------------
# Input validation


def test_bad_inputs_raise_clear_errors(ours):
    with pytest.raises(ValueError, match="4 channels.*expects 3"):
        ours.encode(torch.zeros(1, 4, 9, 32, 48))
    with pytest.raises(ValueError, match=r"10 frames.*4k\+1.*nearest valid: 9 or 13"):
        ours.encode(torch.zeros(1, 3, 10, 32, 48))
    with pytest.raises(ValueError, match="height 36 is not a multiple of the spatial compression 8.*32 or 40"):
        ours.encode(torch.zeros(1, 3, 9, 36, 48))
    with pytest.raises(ValueError, match=r"5-D.*unsqueeze"):
        ours.encode(torch.zeros(3, 9, 32, 48))
    with pytest.raises(ValueError, match="3 channels.*expects 4"):
        ours.decode(torch.zeros(1, 3, 3, 4, 6))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ours.decode([[0.0]])


# ----------------------------------------------------------------------------------------------
# Loading


def test_single_file_without_config_matches_folder_load(saved, ours, tmp_path, caplog):
    _, folder = saved
    lone = tmp_path / "diffusion_pytorch_model.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", lone)
    with caplog.at_level(logging.WARNING):
        inferred = load_vae(lone)
    assert "scaling_factor" in caplog.text and "0.7" in caplog.text
    arch = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block")
    assert all(getattr(inferred.config, f) == getattr(ours.config, f) for f in arch)
    assert inferred.config.scaling_factor == 0.7
    with torch.no_grad():
        assert torch.equal(inferred.encode(video(9, seed=31)), ours.encode(video(9, seed=31)))
        assert torch.equal(inferred.decode(latents(3, seed=32)), ours.decode(latents(3, seed=32)))
    assert load_vae(lone, scaling_factor=1.15258426).config.scaling_factor == 1.15258426


def test_folder_config_gives_scaling_factor_unless_overridden(saved):
    _, folder = saved
    assert json.loads((folder / "config.json").read_text())["scaling_factor"] == 0.7
    assert load_vae(folder, parts=("decoder",)).config.scaling_factor == 0.7
    assert load_vae(folder, parts=("decoder",), scaling_factor=1.5).config.scaling_factor == 1.5


def test_decoder_only_load_accounts_encoder_keys_as_ignored(saved, ours):
    _, folder = saved
    report = plan_vae_load(folder, parts=("decoder",))
    assert report.ok and report.ignored and all(k.startswith("encoder.") for k in report.ignored)
    assert not any(k.startswith("encoder.") for k in report.used)
    vae = load_vae(folder, parts=("decoder",))
    assert vae.encoder is None
    with pytest.raises(RuntimeError, match="without its encoder"):
        vae.encode(video(9))
    decoder = load_vae_decoder(folder)
    assert isinstance(decoder, CogVAEDecoder) and decoder.config == ours.config
    encoder = load_vae_encoder(folder)
    assert isinstance(encoder, CogVAEEncoder) and encoder.config == ours.config
    with torch.no_grad():
        z = latents(3, seed=33)
        assert torch.equal(decoder.decode(z), ours.decode(z))
        assert torch.equal(vae.decode(z), ours.decode(z))
        assert torch.equal(encoder.encode(video(9, seed=34)), ours.encode(video(9, seed=34)))


def test_full_size_diffusers_keys_map_onto_full_config():
    """Without downloading: the default (CogVideoX) diffusers VAE built on the meta device."""
    from diffusers import AutoencoderKLCogVideoX

    with torch.device("meta"):
        full = AutoencoderKLCogVideoX()
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert is_vae_checkpoint(shapes)
    config = infer_vae_config(shapes)
    assert config == VAEConfig()  # the 5B preset, scaling factor 0.7 by default
    with torch.device("meta"):
        ours = CogVAE(config)
    report = account_keys(shapes, model_shapes(ours), vae_rename, source="diffusers default")
    assert report.ok, report.describe()
    assert len(report.used) == len(shapes) == len(model_shapes(ours))


def test_truncated_safetensors_is_a_weights_file_error(saved, tmp_path):
    _, folder = saved
    data = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    cut = tmp_path / "vae.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match="truncated"):
        load_vae(cut)


def test_weights_of_another_model_are_rejected(tmp_path):
    from safetensors.torch import save_file

    dit = make_diffusers_dit("cogvideox-5b")
    lone = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, lone)
    assert not is_vae_checkpoint({k: tuple(v.shape) for k, v in dit.state_dict().items()})
    with pytest.raises(ModelDetectionError, match="not a CogVideoX VAE.*first keys"):
        load_vae(lone)
    dit.save_pretrained(tmp_path / "transformer")
    with pytest.raises(ModelDetectionError, match="CogVideoXTransformer3DModel, not a CogVideoX VAE"):
        load_vae(tmp_path / "transformer")


def test_missing_key_is_named(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = saved
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    del state["decoder.up_blocks.1.resnets.0.norm2.conv_b.conv.bias"]
    save_file(state, tmp_path / "vae.safetensors")
    with pytest.raises(StateDictMismatchError, match=r"up_blocks\.1\.resnets\.0\.norm2\.conv_b\.bias"):
        load_vae(tmp_path / "vae.safetensors")


def test_decoder_only_file_infers_config_and_loads_the_decoder(saved, ours, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = saved
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    save_file({k: v for k, v in state.items() if k.startswith("decoder.")}, tmp_path / "decoder.safetensors")
    decoder = load_vae_decoder(tmp_path / "decoder.safetensors")
    assert decoder.config.block_out_channels == ours.config.block_out_channels
    with torch.no_grad():
        assert torch.equal(decoder.decode(latents(3, seed=35)), ours.decode(latents(3, seed=35)))
    with pytest.raises(StateDictMismatchError, match=r"missing keys.*encoder\."):
        load_vae(tmp_path / "decoder.safetensors")
