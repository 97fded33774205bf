"""Tiny CogVideoX transformers saved in the real diffusers layout, for tests.

The configs keep every structural flag of the real presets (position scheme, channel counts
relations, qk-norm, text/video streams) and shrink only the sizes.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_DIT = dict(
    num_attention_heads=2,
    attention_head_dim=16,  # RoPE needs a multiple of 16
    time_embed_dim=16,
    text_embed_dim=32,  # = the tiny T5 d_model of tests/tiny_text.py
    num_layers=2,
    sample_width=6,
    sample_height=4,
    sample_frames=9,  # 3 latent frames
    max_text_seq_length=7,
    patch_size=2,
    temporal_compression_ratio=4,
)

# Structural flags of each real preset.
PRESET_FLAGS = {
    "cogvideox-2b": dict(in_channels=4, out_channels=4, use_rotary_positional_embeddings=False),
    "cogvideox-5b": dict(in_channels=4, out_channels=4, use_rotary_positional_embeddings=True),
    "cogvideox-5b-i2v": dict(
        in_channels=8, out_channels=4, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True
    ),
    # CogVideoX 1.5: temporal patches of 2 latent frames, RoPE sliced from the max grid (sample_height/width of
    # the released configs are large: 300x300 latents), no patch bias flag; I2V adds the ofs embedding.
    "cogvideox1.5-5b": dict(
        in_channels=4,
        out_channels=4,
        use_rotary_positional_embeddings=True,
        patch_size_t=2,
        patch_bias=False,
        sample_height=12,
        sample_width=14,
    ),
    "cogvideox1.5-5b-i2v": dict(
        in_channels=8,
        out_channels=4,
        use_rotary_positional_embeddings=True,
        patch_size_t=2,
        patch_bias=False,
        sample_height=12,
        sample_width=14,
        ofs_embed_dim=16,  # = time_embed_dim, as in the release (512 = 512)
    ),
}


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Fills every parameter and persistent buffer with seeded noise.

    diffusers zero-initialises some layers (e.g. gates, output projections); a comparison on
    such weights would pass for the wrong reasons.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * scale
            if t.ndim == 1 and "norm" in name and name.endswith("weight"):
                noise = noise + 1.0  # LayerNorm gains around 1
            t.copy_(noise.to(t.dtype))
    return module


def make_diffusers_dit(preset: str, seed: int = 0, **overrides):
    from diffusers import CogVideoXTransformer3DModel

    kwargs = {**TINY_DIT, **PRESET_FLAGS[preset], **overrides}
    model = CogVideoXTransformer3DModel(**kwargs)
    return randomize_(model, seed).eval()


def save_diffusers_dit(root: Path, preset: str, seed: int = 0, **overrides) -> Path:
    """Saves a tiny randomised diffusers transformer to ``root/transformer`` and returns that folder."""
    folder = Path(root) / "transformer"
    make_diffusers_dit(preset, seed, **overrides).save_pretrained(folder)
    return folder


TINY_VAE = dict(
    block_out_channels=(8, 8, 16, 16),  # 4 levels: 8x spatial compression, as the real VAE
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_height=32,
    sample_width=48,
    scaling_factor=0.7,
)


def make_diffusers_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKLCogVideoX

    model = AutoencoderKLCogVideoX(**{**TINY_VAE, **overrides})
    return randomize_(model, seed, scale=0.1).eval()


def diffusers_scheduler(sampler: str = "ddim", snr_shift_scale: float = 1.0):
    """The released CogVideoX scheduler (2B: ``snr_shift_scale`` 3.0, 5B: 1.0) as a diffusers object."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    cls = CogVideoXDDIMScheduler if sampler == "ddim" else CogVideoXDPMScheduler
    return cls(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        snr_shift_scale=snr_shift_scale,
    )


def save_tiny_model_folder(root: Path, preset: str = "cogvideox-5b", seed: int = 0, sampler: str = "ddim") -> Path:
    """A whole CogVideoX model folder (text_encoder/, tokenizer/, transformer/, vae/, scheduler/) of tiny models."""
    from tiny_text import make_tiny_text_folder

    root = Path(root)
    make_tiny_text_folder(root, seed=seed)
    make_diffusers_dit(preset, seed=seed).save_pretrained(root / "transformer")
    make_diffusers_vae(seed=seed).save_pretrained(root / "vae")
    diffusers_scheduler(sampler, 3.0 if preset == "cogvideox-2b" else 1.0).save_config(root / "scheduler")
    return root


def load_diffusers_pipeline(pipeline_cls, folder: Path, sampler: str = "ddim", snr_shift_scale: float | None = None):
    """diffusers' ``pipeline_cls`` (e.g. ``CogVideoXPipeline``) on a tiny model folder, progress bar off.

    The scheduler is read from ``folder/scheduler`` (of the class ``sampler`` names), or, with
    ``snr_shift_scale``, built as the released one with that shift (for folders without scheduler/)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    if snr_shift_scale is None:
        scheduler = type(diffusers_scheduler(sampler)).from_pretrained(Path(folder) / "scheduler")
    else:
        scheduler = diffusers_scheduler(sampler, snr_shift_scale)
    pipe = pipeline_cls(
        tokenizer=AutoTokenizer.from_pretrained(Path(folder) / "tokenizer"),
        text_encoder=T5EncoderModel.from_pretrained(Path(folder) / "text_encoder"),
        vae=AutoencoderKLCogVideoX.from_pretrained(Path(folder) / "vae"),
        transformer=CogVideoXTransformer3DModel.from_pretrained(Path(folder) / "transformer"),
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


SCALING_2B = 1.15258426  # the released CogVideoX-2b VAE's scaling_factor (5B: 0.7)


def save_tiny_2b_folder(root: Path, seed: int = 0, sampler: str = "ddim") -> Path:
    """A tiny model folder with the 2B structure throughout: sin-cos positions sized for the real 226
    text tokens (the T5 encoder's default, so no length override is needed), the 2B VAE scaling factor
    and the 2B scheduler (SNR shift 3.0)."""
    root = save_tiny_model_folder(root, "cogvideox-2b", seed=seed, sampler=sampler)
    make_diffusers_dit("cogvideox-2b", seed=seed, max_text_seq_length=226).save_pretrained(root / "transformer")
    make_diffusers_vae(seed=seed, scaling_factor=SCALING_2B).save_pretrained(root / "vae")
    return root
