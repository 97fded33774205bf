"""Every part on CogVideoX 1.5, or a refusal naming the reason: the family seam, TeaCache with the published
TeaCache4CogVideoX1.5 calibration (fitted on the timestep embedding), RIFLEx, masks and windows in whole
temporal patches, LoRA files (diffusers / PEFT merged, DiffSynth refused), presets and their defaults."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import TINY_DIT, make_diffusers_dit

from diffsynth_cog.configs import DIT_PRESETS, DiTConfig, dit_preset
from diffsynth_cog.denoise.denoiser import Denoiser
from diffsynth_cog.denoise.masks import parse_attention
from diffsynth_cog.denoise.riflex import resolve_riflex
from diffsynth_cog.denoise.teacache import TeaCache, make_step_skipper
from diffsynth_cog.denoise.windows import WindowSpec
from diffsynth_cog.errors import LoRAError
from diffsynth_cog.families import FAMILIES, family_of
from diffsynth_cog.hub.presets import get_preset
from diffsynth_cog.loading.dit_loader import dit_rename
from diffsynth_cog.lora import merge_lora
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.models.tokens import TokenLayout


def tiny_15(i2v: bool = False, seed: int = 3) -> tuple[CogDiT, torch.nn.Module]:
    ref = make_diffusers_dit("cogvideox1.5-5b-i2v" if i2v else "cogvideox1.5-5b", seed=seed)
    ours = CogDiT(DiTConfig.from_dict(dict(ref.config)))
    ours.load_state_dict({dit_rename(k): v for k, v in ref.state_dict().items()})
    return ours.eval(), ref


def test_every_preset_belongs_to_its_family_and_the_family_holds_its_factors():
    for name, config in DIT_PRESETS.items():
        assert family_of(config).name == name
    f = FAMILIES["cogvideox1.5-5b"]
    assert (f.patch_size, f.patch_size_t, f.vae_spatial, f.vae_temporal, f.text_length) == (2, 2, 8, 4, 226)
    assert f.size_multiple == 16 and f.frame_multiple == 8
    # REFERENCE.md section 9: 81 f -> 21 latent frames -> 22 after padding -> 11 temporal patches x 48 x 85.
    latent = f.padded_latent_frames(f.latent_frames(81))
    assert latent == 22 and latent // 2 * (768 // 16) * (1360 // 16) == 44_880
    assert f.padded_latent_frames(f.latent_frames(161)) // 2 * 48 * 85 == 85_680
    assert FAMILIES["cogvideox1.5-5b-i2v"].image.ofs == 2.0 and FAMILIES["cogvideox1.5-5b-i2v"].invert_scale_latents


def test_teacache_takes_the_published_15_polynomials_fitted_on_the_time_embedding():
    for name, published in (
        ("cogvideox1.5-5b", (250.210439, -165.061612, 35.7804877, -0.781551492, 0.0358559703)),
        ("cogvideox1.5-5b-i2v", (122.842302, -104.088754, 26.2981677, -0.306009921, 0.0371213220)),
    ):
        dit = SimpleNamespace(config=dit_preset(name))
        cache = TeaCache(0.2)
        cache.check_compatible(SimpleNamespace(config=dit.config))  # the DenoiserParts it reads
        assert cache.coefficients == pytest.approx(published, rel=1e-9)
        assert cache.signal == "embedding"
        assert isinstance(make_step_skipper(0.2, "auto", dit), TeaCache)


def test_teacache_embedding_signal_is_the_relative_l1_change_of_time_plus_ofs_embedding():
    ours, ref = tiny_15(i2v=True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 4, 4, 6, generator=g)
    context = torch.randn(2, TINY_DIT["max_text_seq_length"], TINY_DIT["text_embed_dim"], generator=g)
    cache = TeaCache(1e9, coefficients=(1.0, 0.0), signal="embedding")  # estimate = the change itself
    denoiser = Denoiser(ours, step_skip=cache)
    denoiser.start(3)
    with torch.no_grad():
        for t in (900, 700):
            denoiser(x, t, context)
            denoiser.end_step()

        # The reference's emb: time_embedding(time_proj(t)) + ofs_embedding(ofs_proj(2.0)), from diffusers' modules.
        def emb(t: int) -> torch.Tensor:
            steps = torch.full((2,), float(t))
            ofs = ref.ofs_embedding(ref.ofs_proj(torch.full((1,), 2.0)))
            return ref.time_embedding(ref.time_proj(steps)) + ofs

        a, b = emb(900), emb(700)
    expected = ((b - a).abs().mean() / a.abs().mean()).item()
    assert cache.changes[0] is None and cache.changes[1] == pytest.approx(expected, rel=1e-5)


def test_riflex_on_15_needs_an_explicit_setting_in_temporal_patches():
    config = dit_preset("cogvideox1.5-5b")
    with pytest.raises(ValueError, match=r"CogVideoX1.5-5B.*temporal patch \(2 latent frames\)"):
        resolve_riflex(config, True)
    assert resolve_riflex(config, (2, 20)) == (2, 20)
    # The rule applies to the call's temporal RoPE positions: temporal patches.
    ours, _ = tiny_15()
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 8, 4, 6, generator=g), torch.randn(1, 7, 32, generator=g)
    plain = ours.embed(x, torch.tensor([500]), context).rope
    same = ours.embed(x, torch.tensor([500]), context, riflex=(1, 4)).rope  # 4 temporal patches: L <= N_k
    lowered = ours.embed(x, torch.tensor([500]), context, riflex=(1, 3)).rope  # 4 > 3: frequency 1 lowered
    assert torch.equal(plain[0], same[0]) and not torch.equal(plain[0], lowered[0])


def test_window_mask_on_15_counts_whole_temporal_patches():
    layout = TokenLayout(n_text=2, grid=(4, 2, 3), patch_t=2)  # 8 latent frames = 4 temporal patches of 6 tokens
    attend = parse_attention("window:1:nosink:token").build(layout, torch.device("cpu"))
    mask = attend.dense_mask(layout.n_tokens)[: layout.n_tokens, : layout.n_tokens]
    video = mask[2:, 2:].reshape(4, 6, 4, 6).any(-1).any(1)  # [query patch, key patch]
    distance = (torch.arange(4)[:, None] - torch.arange(4)[None]).abs()
    assert torch.equal(video, distance <= 1)


def test_windows_on_15_are_whole_temporal_patches():
    plan = WindowSpec(81, patch_t=2).plan(42)  # 161 frames: 41 latent frames padded to 42
    assert plan.size == 22 and all(s % 2 == 0 for s in plan.starts) and plan.stride % 2 == 0
    assert plan.starts[-1] + plan.size == 42
    with pytest.raises(ValueError, match="whole number of patches; got 41 latent frames"):
        WindowSpec(81, patch_t=2).plan(41)


def test_peft_lora_merges_into_15_and_diffsynth_files_are_refused(tmp_path):
    ours, _ = tiny_15(i2v=True)
    g = torch.Generator().manual_seed(2)
    r, lora_alpha = 2, 4.0
    names = {
        "transformer.transformer_blocks.0.attn1.to_q": "blocks.0.attn1.to_q",
        "transformer.ofs_embedding.linear_1": "ofs_embed.0",
        "transformer.patch_embed.proj": "patch_embed",
    }
    modules = dict(ours.named_modules())
    tensors, expected = {}, {}
    for theirs, mine in names.items():
        w = modules[mine].weight
        a, b = torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g)
        tensors |= {f"{theirs}.lora_A.weight": a, f"{theirs}.lora_B.weight": b}
        expected[mine] = w.detach().clone() + lora_alpha / r * b @ a
    save_file(tensors, tmp_path / "peft.safetensors")
    merge_lora(ours, tmp_path / "peft.safetensors", lora_config={"r": r, "lora_alpha": lora_alpha})
    for mine, want in expected.items():
        assert torch.allclose(modules[mine].weight, want, atol=1e-6)

    fresh, _ = tiny_15()
    a, b = torch.randn(r, 32, generator=g), torch.randn(32, r, generator=g)
    save_file(
        {"blocks.0.attn1.to_q.lora_A.default.weight": a, "blocks.0.attn1.to_q.lora_B.default.weight": b},
        tmp_path / "diffsynth.safetensors",
    )
    before = fresh.blocks[0].attn1.to_q.weight.detach().clone()
    with pytest.raises(LoRAError, match="DiffSynth-Studio has no CogVideoX 1.5"):
        merge_lora(fresh, tmp_path / "diffsynth.safetensors")
    assert torch.equal(fresh.blocks[0].attn1.to_q.weight, before)


@pytest.mark.parametrize("name", ["CogVideoX1.5-5B", "CogVideoX1.5-5B-I2V"])
def test_15_presets_download_the_diffusers_layout_and_expose_the_family_defaults(name):
    preset = get_preset(name)
    assert preset.model_id == f"ZhipuAI/{name}"
    assert preset.selects("transformer/diffusion_pytorch_model-00001-of-00003.safetensors")
    assert preset.defaults() == {"height": 768, "width": 1360, "num_frames": 81, "fps": 16}
    assert preset.model_family() is family_of(dit_preset(name.lower()))
