"""The 2B model (3D sin-cos positions, SNR-shifted schedule) through the whole pipeline, against diffusers.

tests/test_pipeline.py covers the 5B family (RoPE). Here the tiny folder has the 2B structure: no RoPE,
sin-cos position embeddings added to the patch embeddings (text part zero), the VAE scaling factor of
the released 2B VAE (1.15258426) and a scheduler with ``snr_shift_scale`` 3.0. The DiT reads the real
226 text tokens, so the T5 length needs no override.

The scheduler fallback: a model folder without ``scheduler/`` (DiffSynth's download has none) must
sample with the preset of its family (2B without RoPE, 5B with it). Each fallback test also shows that
the other family's schedule gives a measurably different result, so it cannot pass by accident.
Tolerance 1e-5 relative in fp32.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from tiny_models import SCALING_2B, load_diffusers_pipeline, save_tiny_2b_folder, save_tiny_model_folder

from diffsynth_cog import CogVideoPipeline, ModelManager

RTOL = 1e-5
HEIGHT, WIDTH = 32, 48  # latents 4 x 6 = the tiny DiT's base grid


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def folder_2b(tmp_path_factory):
    folder = save_tiny_2b_folder(tmp_path_factory.mktemp("tiny-2b"), seed=8)
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == SCALING_2B
    return folder


@pytest.fixture(scope="module")
def ours_2b(folder_2b):
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder_2b])
    return CogVideoPipeline.from_model_manager(manager)


def reference(folder, sampler: str, snr_shift_scale: float):
    """diffusers' CogVideoXPipeline on ``folder``, with the released scheduler of that SNR shift."""
    from diffusers import CogVideoXPipeline

    return load_diffusers_pipeline(CogVideoXPipeline, folder, sampler, snr_shift_scale)


def initial_latents(frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, (frames - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8, generator=g)


def run_both(ref, ours, *, sampler: str, frames: int, cfg: float, steps: int, output_type: str = "latent"):
    """Same prompt, initial latents and DPM generator seed for both; returns (ours, diffusers)."""
    latents = initial_latents(frames, seed=frames)
    common = dict(prompt="a paper boat on a river", height=HEIGHT, width=WIDTH, num_frames=frames)
    common |= dict(num_inference_steps=steps, negative_prompt="blurry")
    if hasattr(ref, "transformer"):  # ours reads the text length from the transformer's config; diffusers is told
        common["max_sequence_length"] = ref.transformer.config.max_text_seq_length
    expected = ref(
        guidance_scale=cfg,
        latents=latents.transpose(1, 2).clone(),
        generator=torch.Generator().manual_seed(3),
        output_type=output_type,
        **common,
    ).frames
    common.pop("max_sequence_length", None)
    got = ours(
        cfg_scale=cfg,
        sampler=sampler,
        latents=latents.clone(),
        generator=torch.Generator().manual_seed(3),
        output_type=output_type,
        progress_bar=False,
        **common,
    )
    if output_type == "latent":
        expected = expected.transpose(1, 2)
    else:
        expected = expected[0]
    return got, expected


# 9 frames = the DiT's sample size (its stored sin-cos table); 17 = beyond it (recomputed for 5 latent frames).
@pytest.mark.parametrize(
    "sampler,frames,cfg", [("ddim", 17, 6.0), ("ddim", 9, 6.0), ("dpm", 17, 6.0), ("ddim", 17, 1.0)]
)
def test_2b_final_latents_match_diffusers(folder_2b, ours_2b, sampler, frames, cfg):
    assert ours_2b.scheduler_config.snr_shift_scale == 3.0  # read from the folder's scheduler/
    got, expected = run_both(
        reference(folder_2b, sampler, 3.0), ours_2b, sampler=sampler, frames=frames, cfg=cfg, steps=5
    )
    assert got.shape == expected.shape
    assert rel_err(got, expected) < RTOL


def test_2b_decoded_video_matches_diffusers(folder_2b, ours_2b):
    """The decode divides by the 2B VAE's own scaling factor (a 5B factor would be off by 65 %)."""
    got, expected = run_both(
        reference(folder_2b, "ddim", 3.0), ours_2b, sampler="ddim", frames=9, cfg=6.0, steps=3, output_type="np"
    )
    assert got.shape == expected.shape == (9, HEIGHT, WIDTH, 3)
    assert np.abs(got - expected).max() < 1e-4


def without_scheduler(folder, tmp_path):
    """A copy of ``folder`` without scheduler/, as DiffSynth's download lays a model out."""
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("scheduler"))
    assert not (copy / "scheduler").exists()
    return copy


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_scheduler_fallback_picks_the_2b_preset_without_rope(folder_2b, tmp_path, sampler):
    manager = ModelManager(
        torch_dtype=torch.float32, device="cpu", file_path_list=[without_scheduler(folder_2b, tmp_path)]
    )
    assert manager.scheduler_config is None
    pipe = CogVideoPipeline.from_model_manager(manager)
    kwargs = dict(sampler=sampler, frames=17, cfg=6.0, steps=4)
    got, expected = run_both(reference(folder_2b, sampler, 3.0), pipe, **kwargs)
    assert rel_err(got, expected) < RTOL
    _, other_family = run_both(reference(folder_2b, sampler, 1.0), pipe, **kwargs)
    assert rel_err(got, other_family) > 1e-2  # the 5B schedule would have been caught


def test_scheduler_fallback_picks_the_5b_preset_with_rope(tmp_path_factory, tmp_path):
    folder_5b = save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b"), "cogvideox-5b", seed=9)
    manager = ModelManager(
        torch_dtype=torch.float32, device="cpu", file_path_list=[without_scheduler(folder_5b, tmp_path)]
    )
    pipe = CogVideoPipeline.from_model_manager(manager)
    kwargs = dict(sampler="ddim", frames=17, cfg=6.0, steps=4)
    got, expected = run_both(reference(folder_5b, "ddim", 1.0), pipe, **kwargs)
    assert rel_err(got, expected) < RTOL
    _, other_family = run_both(reference(folder_5b, "ddim", 3.0), pipe, **kwargs)
    assert rel_err(got, other_family) > 1e-2


def test_text_length_follows_the_transformer_config(tmp_path_factory):
    """A DiT whose sin-cos table covers 7 text tokens gets 7-token prompts, as diffusers must be told."""
    folder = save_tiny_model_folder(tmp_path_factory.mktemp("tiny-2b-7"), "cogvideox-2b", seed=10)
    pipe = CogVideoPipeline.from_model_manager(
        ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
    )
    ref = reference(folder, "ddim", 3.0)
    got, expected = run_both(
        lambda **kw: ref(max_sequence_length=7, **kw), pipe, sampler="ddim", frames=9, cfg=6.0, steps=3
    )
    assert rel_err(got, expected) < RTOL
