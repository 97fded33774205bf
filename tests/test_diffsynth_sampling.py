"""``sampler="diffsynth"`` reproduces DiffSynth-Studio 1.1.x's CogVideoX sampling.

Two independent references:

* the facts of REFERENCE.md section 8 ("DiffSynth-Studio as a peer"), written out again here (schedule,
  timesteps, step, initial noise, CFG as two DiT calls) and run as a plain loop;
* DiffSynth-Studio 1.1.9's own code (``EnhancedDDIMScheduler`` and ``CogVideoPipeline.__call__``, loaded
  from the installed wheel by ``tests/diffsynth_reference.py``), driving the same tiny DiT.

Two facts were read off DiffSynth's code, beyond the REFERENCE text: the schedule is computed in float32
(then used as Python floats), and the timestep stride is divided first, ``round(max_t - i * (max_t / (N - 1)))``;
``i * max_t / (N - 1)`` rounds differently at e.g. N = 31. The comparisons below are bitwise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffsynth_reference import diffsynth_final_latents, load_reference, requires_diffsynth
from tiny_models import TINY_DIT, save_diffusers_dit

from diffsynth_cog import CogVideoPipeline, ModelManager
from diffsynth_cog.schedulers import DiffSynthSampler, SchedulerConfig, diffsynth_noise, make_sampler

CONFIG_5B = SchedulerConfig(snr_shift_scale=1.0)


# ----------------------------------------------------------------------------------------------------
# DiffSynth's DDIM, written from the facts (REFERENCE.md section 8), independently of the library


def fact_alphas() -> list[float]:
    """Scaled-linear betas 0.00085 -> 0.012, zero-terminal-SNR rescale, no SNR shift; float32."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    root = torch.cumprod(1 - betas, dim=0) ** 0.5
    root = (root - root[-1]) * (root[0] / (root[0] - root[-1]))
    return (root**2).tolist()


def fact_timesteps(n: int, strength: float = 1.0) -> list[int]:
    max_t = max(round(1000 * strength) - 1, 0)
    n = min(n, max_t + 1)
    if n == 1:
        return [max_t]
    stride = max_t / (n - 1)
    return [round(max_t - i * stride) for i in range(n)]


def fact_step(v: torch.Tensor, x: torch.Tensor, a_t: float, a_p: float) -> torch.Tensor:
    return x * (math.sqrt(a_t * a_p) + math.sqrt((1 - a_t) * (1 - a_p))) + v * (
        math.sqrt(a_t * (1 - a_p)) - math.sqrt(a_p * (1 - a_t))
    )


def fake_v(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic, nonlinear stand-in for the DiT's v prediction (in x's dtype)."""
    return torch.tanh(0.7 * x) * (0.4 + t / 1000) - 0.2 * x


# ----------------------------------------------------------------------------------------------------
# Timesteps, schedule, step


def test_timesteps_for_50_steps_run_999_to_0() -> None:
    steps = make_sampler("diffsynth", CONFIG_5B, 50).timesteps
    assert steps.dtype == torch.int64 and len(steps) == 50
    assert steps[:2].tolist() == [999, 979] and steps[-2:].tolist() == [20, 0]
    assert steps.tolist() == fact_timesteps(50)
    # 100 steps (DiffSynth's ExVideo example) and the strength rule of video-to-video.
    assert make_sampler("diffsynth", CONFIG_5B, 100).timesteps.tolist() == fact_timesteps(100)
    assert make_sampler("diffsynth", CONFIG_5B, 20, strength=0.7).timesteps.tolist() == fact_timesteps(20, 0.7)
    assert make_sampler("diffsynth", CONFIG_5B, 1).timesteps.tolist() == [999]


def test_timesteps_divide_the_stride_first() -> None:
    # The order of the float operations decides a few roundings; DiffSynth divides first.
    divided_first = fact_timesteps(31)
    multiplied_first = [round(999 - i * 999 / 30) for i in range(31)]
    assert divided_first != multiplied_first
    assert make_sampler("diffsynth", CONFIG_5B, 31).timesteps.tolist() == divided_first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_follow_the_reference_formula_bitwise(dtype: torch.dtype) -> None:
    sampler = make_sampler("diffsynth", CONFIG_5B, 12)
    alphas = fact_alphas()
    assert alphas[-1] == 0.0 and sampler.alphas_cumprod.tolist() == alphas
    x = torch.randn(1, 3, 2, 4, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = x.clone()
    steps = fact_timesteps(12)
    for i, t in enumerate(steps):
        a_p = alphas[steps[i + 1]] if i + 1 < len(steps) else 1.0  # a clean sample after the last step
        expected = fact_step(fake_v(expected, t), expected, alphas[t], a_p)
        x, state = sampler.step(fake_v(x, t), i, x)
        assert x.dtype == dtype and state.timestep == t
        assert torch.equal(x, expected), f"step {i} (t={t})"


def test_snr_shift_of_the_model_config_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    shifted = make_sampler("diffsynth", SchedulerConfig(snr_shift_scale=3.0), 10)
    assert shifted.alphas_cumprod.tolist() == fact_alphas()
    assert "ignores snr_shift_scale=3.0" in caplog.text


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="strength must be in"):
        DiffSynthSampler(CONFIG_5B, 10, strength=1.5)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        DiffSynthSampler(CONFIG_5B, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_initial_noise_is_drawn_in_the_pipeline_dtype_from_a_cpu_generator(dtype: torch.dtype) -> None:
    noise = diffsynth_noise(129, 480, 720, seed=6, dtype=dtype)
    assert noise.shape == (1, 16, 33, 60, 90) and noise.dtype == dtype and noise.device.type == "cpu"
    small = diffsynth_noise(17, 32, 48, seed=6, dtype=dtype, channels=4)
    expected = torch.randn((1, 4, 5, 4, 6), generator=torch.Generator("cpu").manual_seed(6), dtype=dtype)
    assert torch.equal(small, expected)
    torch.manual_seed(6)  # seed=None: the global RNG, as DiffSynth's example relies on
    assert torch.equal(diffsynth_noise(17, 32, 48, seed=None, dtype=dtype, channels=4), expected)


# ----------------------------------------------------------------------------------------------------
# Against DiffSynth-Studio's own scheduler class


@requires_diffsynth
def test_matches_diffsynth_scheduler_for_every_step_count_and_strength() -> None:
    ref = load_reference().EnhancedDDIMScheduler(rescale_zero_terminal_snr=True, prediction_type="v_prediction")
    assert make_sampler("diffsynth", CONFIG_5B, 10).alphas_cumprod.tolist() == ref.alphas_cumprod
    for strength in (1.0, 0.7, 0.35):
        for n in range(1, 1001):
            ref.set_timesteps(n, denoising_strength=strength)
            ours = make_sampler("diffsynth", CONFIG_5B, n, strength=strength).timesteps
            assert ours.tolist() == ref.timesteps.long().tolist(), (n, strength)


@requires_diffsynth
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_and_add_noise_match_diffsynth_scheduler_bitwise(dtype: torch.dtype) -> None:
    ref = load_reference().EnhancedDDIMScheduler(rescale_zero_terminal_snr=True, prediction_type="v_prediction")
    ref.set_timesteps(25, denoising_strength=0.8)
    ours = make_sampler("diffsynth", CONFIG_5B, 25, strength=0.8)
    g = torch.Generator().manual_seed(1)
    clean, noise = torch.randn(2, 1, 4, 3, 4, 6, generator=g).to(dtype)
    x_ref = ref.add_noise(clean, noise, ref.timesteps[0])
    x = ours.add_noise(clean, noise)
    assert torch.equal(x, x_ref)
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(fake_v(x_ref, int(t)), t, x_ref)
        x, _ = ours.step(fake_v(x, int(t)), i, x)
        assert torch.equal(x, x_ref), f"step {i}"


# ----------------------------------------------------------------------------------------------------
# End to end: the pipeline's "diffsynth" mode against DiffSynth's loop (needs the pipeline wiring)

HEIGHT, WIDTH, FRAMES = 32, 48, 9  # latents [1, 16, 3, 4, 6]


@pytest.fixture(scope="module")
def dit16_folder(tmp_path_factory: pytest.TempPathFactory):
    # DiffSynth's pipeline draws 16 latent channels (the real DiT's), so the tiny DiT takes 16.
    return save_diffusers_dit(tmp_path_factory.mktemp("dit16"), "cogvideox-5b", seed=8, in_channels=16, out_channels=16)


def tiny_pipeline(folder, dtype: torch.dtype) -> CogVideoPipeline:
    manager = ModelManager(torch_dtype=dtype, device="cpu", file_path_list=[folder])
    return CogVideoPipeline(
        dit=manager.fetch_model("cog_dit", require=True),
        text_encoder=None,
        vae_encoder=None,
        vae_decoder=None,
        scheduler_config=CONFIG_5B,
        device="cpu",
        torch_dtype=dtype,
    )


def embeddings(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    shape = (1, TINY_DIT["max_text_seq_length"], TINY_DIT["text_embed_dim"])
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def loop_from_facts(dit, posi, nega, *, steps: int, cfg: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """DiffSynth's sampling as REFERENCE.md section 8 describes it."""
    shape = (1, 16, FRAMES // 4 + 1, HEIGHT // 8, WIDTH // 8)
    x = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)
    alphas, ts = fact_alphas(), fact_timesteps(steps)
    for i, t in enumerate(ts):
        timestep = torch.tensor([t], dtype=torch.float32)
        v = dit(x, timestep, posi)
        if cfg != 1.0:
            v_nega = dit(x, timestep, nega)
            v = v_nega + cfg * (v - v_nega)
        x = fact_step(v, x, alphas[t], alphas[ts[i + 1]] if i + 1 < len(ts) else 1.0)
    return x


def ours(pipe: CogVideoPipeline, posi, nega, *, steps: int, cfg: float, seed: int) -> torch.Tensor:
    return pipe(
        prompt_emb=posi,
        negative_prompt_emb=nega,
        num_frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=steps,
        cfg_scale=cfg,
        seed=seed,
        sampler="diffsynth",
        output_type="latent",
        progress_bar=False,
    )


# fp32 and bf16, with and without guidance (two DiT calls per step, latents in the pipeline's dtype).
CASES = [
    pytest.param(torch.float32, 1.0, id="fp32-nocfg"),
    pytest.param(torch.float32, 7.0, id="fp32-cfg7"),
    pytest.param(torch.bfloat16, 7.0, id="bf16-cfg7"),
    pytest.param(torch.bfloat16, 1.0, id="bf16-nocfg"),
]


@pytest.mark.parametrize("dtype,cfg", CASES)
def test_pipeline_reproduces_the_reference_loop_bitwise(dit16_folder, dtype: torch.dtype, cfg: float) -> None:
    pipe = tiny_pipeline(dit16_folder, dtype)
    posi, nega = embeddings(dtype)
    with torch.no_grad():
        expected = loop_from_facts(pipe.dit, posi, nega, steps=4, cfg=cfg, seed=6, dtype=dtype)
    got = ours(pipe, posi, nega, steps=4, cfg=cfg, seed=6)
    assert got.dtype == dtype and got.shape == expected.shape
    assert torch.equal(got, expected)


@requires_diffsynth
@pytest.mark.parametrize("dtype,cfg", CASES)
def test_pipeline_reproduces_diffsynth_studio_bitwise(dit16_folder, dtype: torch.dtype, cfg: float) -> None:
    pipe = tiny_pipeline(dit16_folder, dtype)
    posi, nega = embeddings(dtype)
    expected = diffsynth_final_latents(
        pipe.dit,
        {"a red fox": posi, "blurry": nega},
        torch_dtype=dtype,
        prompt="a red fox",
        negative_prompt="blurry",
        cfg_scale=cfg,
        num_frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=4,
        seed=6,
    )
    got = ours(pipe, posi, nega, steps=4, cfg=cfg, seed=6)
    assert got.dtype == dtype and torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------------
# Frames: DiffSynth converts decoded pixels to uint8 by truncating ((x + 1) * 127.5); diffusers' way rounds


def decoded_pixels() -> torch.Tensor:
    """Pixels [3, F, H, W] a little beyond [-1, 1] (as a VAE decoder overshoots), in bf16 steps."""
    g = torch.Generator().manual_seed(11)
    return (torch.rand(3, FRAMES, HEIGHT, WIDTH, generator=g) * 2.2 - 1.1).to(torch.bfloat16).float()


@requires_diffsynth
def test_diffsynth_conventions_convert_frames_as_diffsynth_studio_does() -> None:
    from diffsynth_cog.pipeline.sampling import DIFFSYNTH, DIFFUSERS

    video = decoded_pixels()
    expected = [np.asarray(f) for f in load_reference().CogVideoPipeline.tensor2video(None, video)]
    got = [np.asarray(f) for f in DIFFSYNTH.frames(video)]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    rounded = np.stack([np.asarray(f) for f in DIFFUSERS.frames(video)])
    assert (rounded != np.stack(expected)).mean() > 0.2  # rounding differs by one grey level in many values


@requires_diffsynth
@pytest.mark.parametrize("conventions", [None, "diffsynth"])
def test_sampler_diffsynth_returns_diffsynth_studios_frames(
    dit16_folder, monkeypatch: pytest.MonkeyPatch, conventions: str | None
) -> None:
    pipe = tiny_pipeline(dit16_folder, torch.float32)
    video = decoded_pixels()
    monkeypatch.setattr(pipe, "decode_latents", lambda latents, tiled, progress: video[None])
    posi, nega = embeddings(torch.float32)
    sampler = "diffsynth" if conventions is None else "ddim"
    frames = pipe(
        prompt_emb=posi, negative_prompt_emb=nega, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
        num_inference_steps=1, seed=6, sampler=sampler, conventions=conventions, progress_bar=False,
    )  # fmt: skip
    expected = load_reference().CogVideoPipeline.tensor2video(None, video)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, expected, strict=True))
