"""Parity of the CogVideoX schedule, samplers and training helpers with diffusers 0.42.1.

diffusers is the reference here only: the library never imports it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXVideoToVideoPipeline

from diffsynth_cog.schedulers import (
    SamplerState,
    SchedulerConfig,
    add_noise,
    alphas_cumprod,
    img2img_timesteps,
    make_sampler,
    scheduler_preset,
    timesteps,
)
from diffsynth_cog.training.loss import v_prediction_loss, velocity

PRESETS = ["cogvideox-2b", "cogvideox-5b"]
LATENT_SHAPE = (2, 3, 4, 6, 8)  # [B, T, C, H, W], the pipeline's latent layout


def reference(config: SchedulerConfig, kind: str = "ddim"):
    cls = CogVideoXDDIMScheduler if kind == "ddim" else CogVideoXDPMScheduler
    return cls(**config.to_dict())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fake_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic, nonlinear stand-in for the DiT's v prediction."""
    s = t / 1000.0
    return torch.tanh(0.8 * x) * (0.5 + s) + 0.3 * torch.sin(3.0 * x + s) - 0.1 * x


def start_latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# Schedule and timesteps


@pytest.mark.parametrize("preset", PRESETS)
def test_alphas_cumprod_matches_diffusers(preset: str) -> None:
    config = scheduler_preset(preset)
    ours, ref = alphas_cumprod(config), reference(config).alphas_cumprod
    assert ours.dtype == ref.dtype == torch.float64 and ours.shape == (1000,)
    # float64 on both sides with the same operations: agreement to a few ulps.
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)
    assert ours[-1] == 0.0  # zero terminal SNR: the last step is pure noise


def test_alphas_cumprod_without_rescale_or_shift_matches_diffusers() -> None:
    config = SchedulerConfig(rescale_betas_zero_snr=False, snr_shift_scale=2.0)
    torch.testing.assert_close(alphas_cumprod(config), reference(config).alphas_cumprod, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
def test_timesteps_match_diffusers_for_every_step_count(spacing: str) -> None:
    config = SchedulerConfig(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref = reference(config)
    for n in range(1, 1001):
        ref.set_timesteps(n)
        assert torch.equal(timesteps(config, n), ref.timesteps), f"{spacing}, {n} steps"


def test_trailing_timesteps_for_50_steps() -> None:
    steps = timesteps(scheduler_preset("cogvideox-5b"), 50)
    assert steps.dtype == torch.int64
    assert steps[:3].tolist() == [999, 979, 959] and steps[-1].item() == 19


def test_img2img_timesteps_match_video_to_video_pipeline() -> None:
    config = scheduler_preset("cogvideox-5b")
    pipe = CogVideoXVideoToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=None, scheduler=reference(config)
    )
    for n in (1, 7, 30, 50):
        steps = timesteps(config, n)
        for strength in (0.0, 0.1, 0.33, 0.5, 0.8, 0.999, 1.0):
            ref, _ = pipe.get_timesteps(n, steps, strength, "cpu")
            assert torch.equal(img2img_timesteps(steps, strength), ref), (n, strength)


def test_bad_values_are_rejected_up_front() -> None:
    with pytest.raises(ValueError, match="timestep_spacing 'karras'"):
        SchedulerConfig(timestep_spacing="karras")
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        SchedulerConfig(prediction_type="flow")
    with pytest.raises(ValueError, match="beta_schedule 'squaredcos_cap_v2'"):
        SchedulerConfig(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        timesteps(SchedulerConfig(), 1001)
    with pytest.raises(ValueError, match="strength must be in"):
        img2img_timesteps(timesteps(SchedulerConfig(), 10), 1.5)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        make_sampler("euler", SchedulerConfig(), 10)


# ----------------------------------------------------------------------------------------------------
# Config files


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_config_reads_scheduler_config_written_by_diffusers(tmp_path, preset: str, kind: str) -> None:
    config = scheduler_preset(preset)
    # Written with the scheduler's own defaults for the bookkeeping keys, as a released model folder is.
    reference(config, kind).save_config(tmp_path / "scheduler")
    assert SchedulerConfig.from_file(tmp_path / "scheduler") == config
    assert SchedulerConfig.from_file(tmp_path / "scheduler" / "scheduler_config.json") == config


def test_config_rejects_fields_that_change_the_math(tmp_path) -> None:
    values = json.loads(json.dumps(SchedulerConfig().to_dict()))
    with pytest.raises(ValueError, match=r"unsupported scheduler config field\(s\) \['thresholding'\]"):
        SchedulerConfig.from_dict({**values, "thresholding": True})
    with pytest.raises(ValueError, match="trained_betas"):
        SchedulerConfig.from_dict({**values, "trained_betas": [0.1] * 1000})
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**values, "timestep_spacing": "bogus"}))
    with pytest.raises(ValueError, match=r"scheduler_config.json: SchedulerConfig: timestep_spacing 'bogus'"):
        SchedulerConfig.from_file(path)
    with pytest.raises(FileNotFoundError, match="no scheduler config file"):
        SchedulerConfig.from_file(tmp_path / "nowhere")


def test_config_ignores_bookkeeping_keys() -> None:
    values = {**SchedulerConfig().to_dict(), "_class_name": "CogVideoXDDIMScheduler", "_diffusers_version": "0.30.0"}
    values.update(clip_sample=True, clip_sample_range=1.0, sample_max_value=1.0, trained_betas=None)
    assert SchedulerConfig.from_dict(values) == SchedulerConfig()


# ----------------------------------------------------------------------------------------------------
# Sampling loops


def diffusers_ddim_loop(config: SchedulerConfig, n: int, latents: torch.Tensor, strength: float = 1.0):
    sched = reference(config, "ddim")
    sched.set_timesteps(n)
    steps = img2img_timesteps(sched.timesteps, strength)
    out = []
    for t in steps:
        latents = sched.step(fake_model(latents, int(t)), t, latents, return_dict=False)[0]
        out.append(latents)
    return out


def diffusers_dpm_loop(config, n, latents, generator, strength: float = 1.0):
    """The CogVideoX pipelines' DPM loop: the previous x0 and timestep are carried by the caller."""
    sched = reference(config, "dpm")
    sched.set_timesteps(n)
    steps = img2img_timesteps(sched.timesteps, strength)
    old_x0, out = None, []
    for i, t in enumerate(steps):
        latents, old_x0 = sched.step(
            fake_model(latents, int(t)),
            old_x0,
            t,
            steps[i - 1] if i > 0 else None,
            latents,
            generator=generator,
            return_dict=False,
        )
        out.append(latents)
    return out


def our_loop(kind: str, config: SchedulerConfig, n: int, latents: torch.Tensor, generator=None, strength=1.0):
    sampler = make_sampler(kind, config, n, strength=strength)
    state, out = None, []
    for i, t in enumerate(sampler.timesteps):
        latents, state = sampler.step(fake_model(latents, int(t)), i, latents, state, generator=generator)
        out.append(latents)
    return out


# Tolerance for whole trajectories: both sides compute the step coefficients in float64 and apply them
# in float32, so the only possible differences are float32 roundings of differently ordered
# multiply-adds (~1e-7 per step; measured: bit-identical on CPU). 1e-6 relative over 50 steps still
# leaves margin, and any wrong coefficient or noise draw gives errors of 1e-3 or more.
TRAJECTORY_RTOL = 1e-6


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("n", [50, 30])  # 30 does not divide 1000: the T // N landing rule matters
def test_ddim_trajectory_matches_diffusers(preset: str, n: int) -> None:
    config = scheduler_preset(preset)
    ours = our_loop("ddim", config, n, start_latents())
    ref = diffusers_ddim_loop(config, n, start_latents())
    assert len(ours) == len(ref) == n
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.dtype == b.dtype == torch.float32
        assert rel_err(a, b) < TRAJECTORY_RTOL, f"step {i}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("n", [50, 30])
def test_dpm_trajectory_matches_diffusers_with_identically_seeded_generators(preset: str, n: int) -> None:
    config = scheduler_preset(preset)
    gen_ours, gen_ref = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    ours = our_loop("dpm", config, n, start_latents(), generator=gen_ours)
    ref = diffusers_dpm_loop(config, n, start_latents(), gen_ref)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert rel_err(a, b) < TRAJECTORY_RTOL, f"step {i}: {rel_err(a, b):.2e}"
    # Same number of draws of the same shapes: both generators end in the same state.
    assert torch.equal(gen_ours.get_state(), gen_ref.get_state())


def test_dpm_with_the_global_rng_matches_diffusers() -> None:
    config = scheduler_preset("cogvideox-5b")
    torch.manual_seed(7)
    ours = our_loop("dpm", config, 20, start_latents())
    torch.manual_seed(7)
    ref = diffusers_dpm_loop(config, 20, start_latents(), None)
    assert rel_err(ours[-1], ref[-1]) < TRAJECTORY_RTOL


def test_dpm_with_a_generator_per_batch_item_matches_diffusers() -> None:
    config = scheduler_preset("cogvideox-5b")
    gens_ours = [torch.Generator().manual_seed(s) for s in (1, 2)]
    gens_ref = [torch.Generator().manual_seed(s) for s in (1, 2)]
    ours = our_loop("dpm", config, 10, start_latents(), generator=gens_ours)
    ref = diffusers_dpm_loop(config, 10, start_latents(), gens_ref)
    assert rel_err(ours[-1], ref[-1]) < TRAJECTORY_RTOL


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_video_to_video_trajectory_matches_diffusers(kind: str) -> None:
    config = scheduler_preset("cogvideox-5b")
    n, strength = 50, 0.6
    gen_ours, gen_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ours = our_loop(kind, config, n, start_latents(), generator=gen_ours, strength=strength)
    if kind == "ddim":
        ref = diffusers_ddim_loop(config, n, start_latents(), strength=strength)
    else:
        ref = diffusers_dpm_loop(config, n, start_latents(), gen_ref, strength=strength)
    assert len(ours) == len(ref) == 30
    assert rel_err(ours[-1], ref[-1]) < TRAJECTORY_RTOL


def test_ddim_step_reports_x0_and_ignores_generator() -> None:
    config = scheduler_preset("cogvideox-2b")
    sampler = make_sampler("ddim", config, 50)
    x, gen = start_latents(), torch.Generator().manual_seed(0)
    before = gen.get_state()
    out, state = sampler.step(fake_model(x, 999), 0, x, None, generator=gen)
    assert torch.equal(gen.get_state(), before)  # DDIM (eta = 0) draws nothing
    assert isinstance(state, SamplerState) and state.timestep == 999
    # At t = 999 the signal is zero, so x0 = -v exactly.
    torch.testing.assert_close(state.x0, -fake_model(x, 999), rtol=0, atol=0)
    with pytest.raises(IndexError, match="step index 50 out of range"):
        sampler.step(x, 50, x)


def test_last_step_lands_on_the_x0_prediction() -> None:
    """set_alpha_to_one: the final DPM step returns x0 exactly (no noise is added past t = 0)."""
    config = scheduler_preset("cogvideox-5b")
    sampler = make_sampler("dpm", config, 50)
    x = start_latents()
    last = len(sampler) - 1
    out, state = sampler.step(fake_model(x, 19), last, x, SamplerState(x0=x, timestep=39))
    torch.testing.assert_close(out, state.x0, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# Training helpers


def training_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 16, 3, 6, 8, generator=g)  # [B, C, T, H, W]
    noise = torch.randn(x0.shape, generator=g)
    # The extremes matter: t = 0 has the largest loss weight, t = 999 zero signal.
    t = torch.tensor([0, 1, 500, 999])
    return x0, noise, t


@pytest.mark.parametrize("preset", PRESETS)
def test_add_noise_and_velocity_match_diffusers(preset: str) -> None:
    config = scheduler_preset(preset)
    ref = reference(config)
    ac = alphas_cumprod(config)
    x0, noise, t = training_batch()
    # Same float32 operations in the same order: bit-identical.
    torch.testing.assert_close(add_noise(x0, noise, t, ac), ref.add_noise(x0, noise, t), rtol=0, atol=0)
    torch.testing.assert_close(velocity(x0, noise, t, ac), ref.get_velocity(x0, noise, t), rtol=0, atol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_v_prediction_loss_is_the_mse_on_v(preset: str) -> None:
    config = scheduler_preset(preset)
    ac = alphas_cumprod(config)
    x0, noise, t = training_batch()
    x_t = add_noise(x0, noise, t, ac)
    v = velocity(x0, noise, t, ac)
    v_pred = v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5))
    loss = v_prediction_loss(v_pred, x0, x_t, t, ac)
    mse = torch.nn.functional.mse_loss(v_pred, v)
    assert loss.shape == () and loss.dtype == torch.float32
    # The x0 form cancels sqrt(a) x_t - x0 in float32 and then multiplies by 1 / (1 - a_0) ~ 1e3, so
    # float32 rounding of x_t (~6e-8 |x0|) shows up amplified at t = 0 (measured 6e-7): 1e-5 relative.
    assert abs(loss.item() - mse.item()) / mse.item() < 1e-5
    # A perfect prediction gives (nearly) zero loss.
    assert v_prediction_loss(v, x0, x_t, t, ac).item() < 1e-8


def test_v_prediction_loss_matches_the_diffusers_trainer_formula() -> None:
    """diffusers' CogVideoX trainer: x0_hat = get_velocity(v_pred, x_t, t); weights 1 / (1 - a_t)."""
    config = scheduler_preset("cogvideox-5b")
    ref = reference(config)
    ac = alphas_cumprod(config)
    x0, noise, t = training_batch(1)
    x_t = add_noise(x0, noise, t, ac)
    v_pred = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    x0_hat = ref.get_velocity(v_pred, x_t, t)
    weights = (1 / (1 - ref.alphas_cumprod[t])).float().reshape(-1, 1, 1, 1, 1)
    expected = torch.mean((weights * (x0_hat - x0) ** 2).reshape(x0.shape[0], -1), dim=1).mean()
    a = ac[t].reshape(-1, 1, 1, 1, 1)
    exact = (((a.sqrt() * x_t.double() - (1 - a).sqrt() * v_pred.double() - x0.double()) ** 2) / (1 - a)).mean()
    loss = v_prediction_loss(v_pred, x0, x_t, t, ac).item()
    # Ours takes its coefficients from the float64 table: float32 rounding only (measured 7e-8).
    assert math.isclose(loss, exact.item(), rel_tol=1e-6)
    # The trainer rounds a_t to float32 before sqrt(1 - a_t), which costs up to ~4e-5 of that
    # coefficient at t = 0 (measured 4e-6 on the loss): same formula within 1e-5.
    assert math.isclose(loss, expected.item(), rel_tol=1e-5)


def test_training_helpers_accept_a_scalar_timestep_and_bf16() -> None:
    ac = alphas_cumprod(scheduler_preset("cogvideox-5b"))
    x0, noise, _ = training_batch()
    x_t = add_noise(x0.bfloat16(), noise.bfloat16(), 250, ac)
    assert x_t.dtype == torch.bfloat16 and x_t.shape == x0.shape
    loss = v_prediction_loss(velocity(x0, noise, 250, ac).bfloat16(), x0.bfloat16(), x_t, 250, ac)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
