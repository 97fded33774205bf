"""Video-to-video against diffusers' CogVideoXVideoToVideoPipeline on tiny models (fp32).

Both pipelines get the same frames (a list of PIL images), prompt, strength and steps, and run the same
math: encode the video, draw a posterior sample, noise it to the first kept timestep, denoise the tail
of the schedule. What must be lined up is the randomness, since the two draw it differently:

* diffusers, from its one generator, in this order: the posterior sample (shape of the VAE mean,
  [B, C, T, h, w]), then the noise (in its [B, T, C, h, w] layout), then DPM's per-step noise;
* ours takes the noise as ``latents`` (skipping its own draw) and draws the posterior sample, then
  DPM's per-step noise, from its generator.

So both get a generator with the same seed and ours gets, as ``latents``, the very noise diffusers draws
second. For DDIM (no per-step noise) that is all: diffusers runs untouched. For DPM, diffusers' generator
would be one noise tensor further on when the steps begin; there, diffusers' noise draw in ``prepare_latents``
is handed the same tensor instead of drawing it (the reference has no argument for that noise: its
``latents`` replaces the encoded video altogether), and every other draw stays the generator's.

Compared: the final latents (rel < 1e-5; bitwise equal on the CPU when written) and, once, the decoded
frames (max abs < 1e-4, as the text-to-video test).
"""

from __future__ import annotations

import json

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


def diffusers_noise(channels: int) -> torch.Tensor:
    """The noise diffusers' prepare_latents draws from a generator seeded SEED: the second draw, after
    the posterior sample of the same size; returned in our [B, C, T, h, w] layout."""
    g = torch.Generator().manual_seed(SEED)
    latent_frames = (FRAMES - 1) // 4 + 1
    torch.randn(1, channels, latent_frames, HEIGHT // 8, WIDTH // 8, generator=g)  # the posterior sample
    return torch.randn(1, latent_frames, channels, HEIGHT // 8, WIDTH // 8, generator=g).transpose(1, 2)


PROMPTS = dict(prompt="a kite over the sea", negative_prompt="blurry")


def run_diffusers(folder, *, sampler: str, strength: float, cfg: float, dynamic: bool, output_type: str):
    """diffusers' video-to-video from a generator seeded SEED (for DPM with its prepare_latents noise
    handed over, see the module docstring); the final latents in our layout, or the frames."""
    import diffusers.pipelines.cogvideo.pipeline_cogvideox_video2video as v2v_module

    ref = reference(folder, sampler)
    noise = diffusers_noise(ref.transformer.config.out_channels).transpose(1, 2)  # its [B, T, C, h, w]
    draws = []

    def noise_of_prepare_latents(shape, generator=None, device=None, dtype=None, layout=None):
        draws.append(tuple(shape))
        return noise.to(device=device, dtype=dtype).clone()

    with pytest.MonkeyPatch.context() as patch:
        if sampler == "dpm":
            # Only prepare_latents' noise comes through this module's name; the VAE's posterior sample
            # and the DPM steps draw through their own modules, from the generator.
            patch.setattr(v2v_module, "randn_tensor", noise_of_prepare_latents)
        out = ref(
            video=input_frames(),
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
    assert draws == ([tuple(noise.shape)] if sampler == "dpm" else [])
    return out.transpose(1, 2) if output_type == "latent" else out[0]


def run_ours(folder, *, sampler: str, strength: float, cfg: float, dynamic: bool, output_type: str, latents):
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
        latents=latents,
        generator=torch.Generator().manual_seed(SEED),
        output_type=output_type,
        progress_bar=False,
        **PROMPTS,
    )


def out_channels(folder) -> int:
    return json.loads((folder / "transformer" / "config.json").read_text())["out_channels"]


def run_both(folder, *, sampler: str, strength: float, cfg: float = 6.0, dynamic: bool = False, output_type="latent"):
    """(ours, diffusers) for the same video-to-video request, randomness lined up as the docstring says."""
    kwargs = dict(sampler=sampler, strength=strength, cfg=cfg, dynamic=dynamic, output_type=output_type)
    expected = run_diffusers(folder, **kwargs)
    return run_ours(folder, latents=diffusers_noise(out_channels(folder)), **kwargs), expected


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


def test_the_comparison_sees_the_strength_and_the_noise(folder_5b):
    """The arrangement is not vacuous: another strength, or ours drawing its own noise, would be caught."""
    kwargs = dict(sampler="ddim", cfg=6.0, dynamic=False, output_type="latent")
    expected = run_diffusers(folder_5b, strength=0.6, **kwargs)
    other_strength = run_ours(folder_5b, strength=0.7, latents=diffusers_noise(out_channels(folder_5b)), **kwargs)
    assert rel_err(other_strength, expected) > 1e-2
    own_draw = run_ours(folder_5b, strength=0.6, latents=None, **kwargs)
    assert rel_err(own_draw, expected) > 1e-2


@pytest.mark.xfail(
    strict=True,
    reason="pipeline.py passes the requested num_inference_steps to dynamic_guidance; diffusers' video-to-video "
    "passes the number of steps it runs (int(N * strength), its get_timesteps); fix: len(steps.timesteps)",
)
def test_video_to_video_dynamic_guidance_matches_diffusers(folder_5b):
    got, expected = run_both(folder_5b, sampler="ddim", strength=0.6, dynamic=True)
    assert rel_err(got, expected) < RTOL
