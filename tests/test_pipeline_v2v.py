"""Video-to-video against diffusers' CogVideoXVideoToVideoPipeline on tiny models (fp32).

Both pipelines get the same frames (a list of PIL images), prompt, strength and steps, and a CPU generator
seeded alike, and nothing else: both draw, from that one generator and in this order, the VAE posterior
sample ([B, C, T, h, w]), the noise (in diffusers' [B, T, C, h, w] layout) and DPM's per-step noise, so a seed
gives the same video in both.

Compared: the final latents (rel < 1e-5; bitwise equal on the CPU when written) and, once, the decoded
frames (max abs < 1e-4, as the text-to-video test).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import load_diffusers_pipeline, save_tiny_2b_folder, save_tiny_model_folder

from diffsynth_cog import CogVideoPipeline, ModelManager

RTOL = 1e-5
HEIGHT, WIDTH = 32, 48
FRAMES = 17  # 5 latent frames
STEPS = 10
SEED = 21


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def folder_5b(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b"), "cogvideox-5b", seed=12)


@pytest.fixture(scope="module")
def folder_2b(tmp_path_factory):
    return save_tiny_2b_folder(tmp_path_factory.mktemp("tiny-2b"), seed=13)


def input_frames() -> list[Image.Image]:
    """A smooth moving gradient with some grain: structure the VAE keeps, so strength matters."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = []
    for f in range(FRAMES):
        base = np.stack([x * 5 + f * 7, y * 7, (x + y) * 3 + f * 4], axis=-1) % 256
        grain = rng.integers(-20, 21, base.shape)
        frames.append(Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)))
    return frames


def reference(folder, sampler: str):
    from diffusers import CogVideoXVideoToVideoPipeline

    return load_diffusers_pipeline(CogVideoXVideoToVideoPipeline, folder, sampler)


PROMPTS = dict(prompt="a kite over the sea", negative_prompt="blurry")


def run_diffusers(folder, *, sampler: str, strength: float, cfg: float, dynamic: bool, output_type: str):
    """diffusers' video-to-video from a generator seeded SEED; the final latents in our layout, or the frames."""
    ref = reference(folder, sampler)
    out = ref(
        video=input_frames(),
        max_sequence_length=ref.transformer.config.max_text_seq_length,  # the text length ours reads from it
        strength=strength,
        guidance_scale=cfg,
        use_dynamic_cfg=dynamic,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(SEED),
        output_type=output_type,
        **PROMPTS,
    ).frames
    return out.transpose(1, 2) if output_type == "latent" else out[0]


def run_ours(folder, *, sampler: str, strength: float, cfg: float, dynamic: bool, output_type: str):
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
    return CogVideoPipeline.from_model_manager(manager)(
        input_video=input_frames(),
        denoising_strength=strength,
        cfg_scale=cfg,
        use_dynamic_cfg=dynamic,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        sampler=sampler,
        generator=torch.Generator().manual_seed(SEED),
        output_type=output_type,
        progress_bar=False,
        **PROMPTS,
    )


def run_both(folder, *, sampler: str, strength: float, cfg: float = 6.0, dynamic: bool = False, output_type="latent"):
    """(ours, diffusers) for the same video-to-video request and seed."""
    kwargs = dict(sampler=sampler, strength=strength, cfg=cfg, dynamic=dynamic, output_type=output_type)
    return run_ours(folder, **kwargs), run_diffusers(folder, **kwargs)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_video_to_video_final_latents_match_diffusers(folder_5b, sampler, strength):
    got, expected = run_both(folder_5b, sampler=sampler, strength=strength)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < RTOL


def test_video_to_video_2b_matches_diffusers(folder_2b):
    """The 2B schedule (SNR shift 3) sets how far the video is noised; its VAE factor scales the latents."""
    got, expected = run_both(folder_2b, sampler="ddim", strength=0.6)
    assert rel_err(got, expected) < RTOL


def test_video_to_video_without_guidance_matches_diffusers(folder_5b):
    got, expected = run_both(folder_5b, sampler="dpm", strength=0.6, cfg=1.0)
    assert rel_err(got, expected) < RTOL


def test_video_to_video_decoded_frames_match_diffusers(folder_5b):
    got, expected = run_both(folder_5b, sampler="ddim", strength=0.6, output_type="np")
    assert got.shape == expected.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert np.abs(got - expected).max() < 1e-4


def test_the_comparison_sees_the_strength_and_the_seed(folder_5b):
    """The comparison is not vacuous: another strength, or another seed, would be caught."""
    kwargs = dict(sampler="ddim", cfg=6.0, dynamic=False, output_type="latent")
    expected = run_diffusers(folder_5b, strength=0.6, **kwargs)
    assert rel_err(run_ours(folder_5b, strength=0.7, **kwargs), expected) > 1e-2
    global SEED
    seed, SEED = SEED, SEED + 1
    try:
        assert rel_err(run_ours(folder_5b, strength=0.6, **kwargs), expected) > 1e-2
    finally:
        SEED = seed


def test_video_to_video_dynamic_guidance_matches_diffusers(folder_5b):
    got, expected = run_both(folder_5b, sampler="ddim", strength=0.6, dynamic=True)
    assert rel_err(got, expected) < RTOL
