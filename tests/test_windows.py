"""Temporal windows: the plan, the fusion against the weighted sum written out here, one covering window = the plain
loop (bitwise), FreeNoise's noise rescheduling, and windows composed with tiles and step skipping. Tiny
CogVideoX-5B in fp32 on the CPU."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_diffusers_dit, save_tiny_model_folder

from diffsynth_cog import CogVideoPipeline, ModelManager
from diffsynth_cog.denoise.denoiser import Denoiser
from diffsynth_cog.denoise.step_cache import StepCache
from diffsynth_cog.denoise.windows import WindowPlan, WindowSpec, map_windows, reschedule_noise
from diffsynth_cog.loading.dit_loader import load_dit
from diffsynth_cog.models.tiling import TileSpec
from diffsynth_cog.pipeline.sampling import draw_noise
from diffsynth_cog.schedulers import make_sampler


def test_windows_have_one_size_and_the_last_ends_at_the_last_frame():
    spec = WindowSpec(frames=17, overlap=0.4)  # 5 latent frames, stride int(5 * 0.6) = 3
    plan = spec.plan(12)
    assert (plan.size, plan.stride, plan.starts) == (5, 3, (0, 3, 6, 7))
    assert spec.plan(5).single and spec.plan(3) == WindowPlan(3, 3, (0,), 3)
    assert WindowSpec(frames=13, overlap=0.0).plan(8).starts == (0, 4)
    with pytest.raises(ValueError, match="4k\\+1"):
        WindowSpec(frames=16)
    with pytest.raises(ValueError, match="overlap"):
        WindowSpec(frames=17, overlap=1.0)


def test_fusion_weights_ramp_across_each_overlap():
    plan = WindowSpec(frames=13, overlap=0.5).plan(6)  # windows of 4 at 0 and 2: frames 2, 3 shared
    assert plan.starts == (0, 2)
    assert torch.allclose(plan.weights(0), torch.tensor([1, 1, 2 / 3, 1 / 3]))
    assert torch.allclose(plan.weights(1), torch.tensor([1 / 3, 2 / 3, 1, 1]))
    # A pointwise function survives windowing unchanged (weights are normalised per frame).
    x = torch.randn(1, 2, 12, 2, 2)
    plan = WindowSpec(frames=17, overlap=0.4).plan(12)
    assert torch.allclose(map_windows(x, plan, lambda w, start: w * 3 - 1), x * 3 - 1, atol=1e-6)


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-dit-windows")
    make_diffusers_dit("cogvideox-5b", seed=5).save_pretrained(folder)
    return load_dit(folder, dtype=torch.float32, device="cpu")


def test_windowed_call_is_the_weighted_sum_of_the_window_calls(dit):
    """6 latent frames in windows of 4 at 0 and 2: frames 0-1 from window 0, 4-5 from window 1, and frames 2, 3
    mixed 2/3 : 1/3 and 1/3 : 2/3; each window is the plain DiT call on its frames (positions 0..3)."""
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 6, 4, 6, generator=g), torch.randn(2, 7, 32, generator=g)
    t = torch.full((2,), 600)
    with torch.no_grad():
        got = Denoiser(dit, windows=WindowSpec(frames=13, overlap=0.5))(x, 600, context)
        first, second = dit(x[:, :, 0:4], t, context), dit(x[:, :, 2:6], t, context)
        whole = dit(x, t, context)
    want = torch.cat(
        [
            first[:, :, :2],
            (first[:, :, 2:3] * 2 + second[:, :, 0:1]) / 3,
            (first[:, :, 3:4] + second[:, :, 1:2] * 2) / 3,
            second[:, :, 2:],
        ],
        dim=2,
    )
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert (got - whole).abs().max() > 1e-3  # windows see less: not the whole call


def test_noise_rescheduling_reuses_shuffled_frames_one_window_earlier():
    noise = torch.randn(1, 3, 12, 2, 2)
    plan = WindowSpec(frames=13, overlap=0.5).plan(12)  # windows of 4, stride 2
    out = reschedule_noise(noise, plan, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, :4], noise[:, :, :4])
    for first in range(4, 12, 2):
        source = out[:, :, first - 4 : first - 2]  # already rescheduled frames one window earlier
        block = out[:, :, first : first + 2]
        matches = [[torch.equal(block[:, :, i], source[:, :, j]) for j in range(2)] for i in range(2)]
        assert sorted(row.index(True) for row in matches) == [0, 1]  # a permutation of that block
    # Every window is a permutation of the first window's noise frames.
    firsts = {tuple(noise[0, :, f].flatten().tolist()) for f in range(4)}
    for start in plan.starts:
        assert {tuple(out[0, :, f].flatten().tolist()) for f in range(start, start + 4)} == firsts
    assert torch.equal(reschedule_noise(noise, WindowSpec(frames=49).plan(12), None), noise)
    again = reschedule_noise(noise, plan, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)


def test_windows_compose_with_tiles_and_step_skipping_one_state_per_window_and_tile(dit):
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(1, 4, 6, 4, 6, generator=g), torch.randn(1, 7, 32, generator=g)
    parts = dict(windows=WindowSpec(frames=13, overlap=0.5), tiles=TileSpec((32, 32), (0.5, 0.5)))
    with torch.no_grad():
        plain = Denoiser(dit, **parts)
        cached = Denoiser(dit, step_skip=StepCache(0.0), **parts)
        plain.start(2)
        cached.start(2)
        for step in range(2):
            assert torch.equal(cached(x, 900 - step * 100, context), plain(x, 900 - step * 100, context))
            cached.end_step()
    # 2 windows x 2 x 3 tiles (4 x 4 latents every 2 over 4 x 6): a distance per call site and step.
    assert len(cached.step_skip.distances) == 2 * 2 * 6
    tracks = {((None, w), (r, c)) for w in (0, 2) for r in (0, 2) for c in (0, 2, 4)}  # (call, window), tile
    assert set(cached.step_skip._tracks) == tracks


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b-windows"), "cogvideox-5b", seed=7)
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.load_models([root])
    return CogVideoPipeline.from_model_manager(manager)


def generate(pipe, **kwargs):
    g = torch.Generator().manual_seed(3)
    c = pipe.dit.config
    prompt, negative = (torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g) for _ in range(2))
    options = dict(height=32, width=48, num_frames=25, num_inference_steps=3, cfg_scale=5.0, seed=4)
    return pipe(
        prompt_emb=prompt,
        negative_prompt_emb=negative,
        output_type="latent",
        progress_bar=False,
        **{**options, **kwargs},
    )


def test_one_window_covering_the_video_is_the_plain_loop_bitwise(pipe):
    plain = generate(pipe)
    assert torch.equal(generate(pipe, windows=WindowSpec(frames=25)), plain)
    assert torch.equal(generate(pipe, windows=WindowSpec(frames=49)), plain)


def test_windowed_generation_starts_from_rescheduled_noise(pipe):
    """25 frames (7 latent) in windows of 13 frames (4 latent): stage 2 draws the noise, then reschedules it with
    the same generator; the loop runs the windows from there."""
    spec = WindowSpec(frames=13, overlap=0.5)
    shape = (1, 4, 7, 4, 6)
    sampler = make_sampler("ddim", pipe.scheduler_config, 2)
    got = pipe.initial_latents(shape, sampler, torch.Generator().manual_seed(4), windows=spec)
    generator = torch.Generator().manual_seed(4)
    want = reschedule_noise(draw_noise(shape, generator), spec.plan(7), generator)
    assert torch.equal(got, want) and not torch.equal(
        got[:, :, 4:], draw_noise(shape, torch.Generator().manual_seed(4))[:, :, 4:]
    )
    latents = generate(pipe, windows=spec, num_inference_steps=2)
    assert latents.shape == shape and torch.isfinite(latents).all()
    assert torch.equal(latents, generate(pipe, windows=spec, num_inference_steps=2))
    assert Denoiser(pipe.dit, windows=spec).parts()["windows"] == "13f/0.5"
    assert generate(pipe, windows=True, num_frames=9).shape[2] == 3  # True: the trained length (9 frames here)
