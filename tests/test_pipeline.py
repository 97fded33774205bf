"""CogVideoPipeline end to end against diffusers' CogVideoXPipeline on tiny models.

Both load the same model folder written by diffusers (``save_pretrained``); we load it through
ModelManager. Given the same initial latents, both must reach the same final latents.
Tolerance 1e-5 relative in fp32: the same operations in a slightly different order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TINY_DIT, save_tiny_model_folder

from diffsynth_cog import CogVideoPipeline, ModelManager
from diffsynth_cog.configs import check_num_frames
from diffsynth_cog.models.tiling import TileSpec

RTOL = 1e-5
HEIGHT, WIDTH = 32, 48  # latents 4 x 6 = the tiny DiT's base grid
FRAMES = 17  # 5 latent frames, beyond the tiny DiT's sample_frames (9 -> 3 latent frames)
# diffusers tokenizes to max_sequence_length (default 226), which "must be consistent with
# transformer.config.max_text_seq_length"; our text encoder reads it from the transformer's config.
TEXT_LENGTH = TINY_DIT["max_text_seq_length"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b"), "cogvideox-5b", seed=4)


@pytest.fixture(scope="module")
def ours(folder):
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.load_models([folder])
    return CogVideoPipeline.from_model_manager(manager)


def reference(folder, sampler: str):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import AutoTokenizer, T5EncoderModel

    cls = CogVideoXDDIMScheduler if sampler == "ddim" else CogVideoXDPMScheduler
    pipe = CogVideoXPipeline(
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=T5EncoderModel.from_pretrained(folder / "text_encoder"),
        vae=AutoencoderKLCogVideoX.from_pretrained(folder / "vae"),
        transformer=CogVideoXTransformer3DModel.from_pretrained(folder / "transformer"),
        scheduler=cls.from_pretrained(folder / "scheduler"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_latents(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8, generator=g)


@pytest.mark.parametrize(
    "sampler,cfg,dynamic",
    [("ddim", 6.0, False), ("ddim", 1.0, False), ("dpm", 6.0, False), ("dpm", 1.0, False), ("ddim", 6.0, True)],
)
def test_final_latents_match_diffusers(folder, ours, sampler, cfg, dynamic):
    latents = initial_latents()
    ref = reference(folder, sampler)
    prompt, negative = "a red fox running through snow", "blurry"
    expected = ref(
        prompt=prompt,
        negative_prompt=negative,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=6,
        guidance_scale=cfg,
        use_dynamic_cfg=dynamic,
        latents=latents.transpose(1, 2).clone(),
        generator=torch.Generator().manual_seed(11),
        output_type="latent",
        max_sequence_length=TEXT_LENGTH,
    ).frames.transpose(1, 2)
    got = ours(
        prompt=prompt,
        negative_prompt=negative,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=6,
        cfg_scale=cfg,
        use_dynamic_cfg=dynamic,
        sampler=sampler,
        latents=latents.clone(),
        generator=torch.Generator().manual_seed(11),
        output_type="latent",
        progress_bar=False,
    )
    assert got.shape == expected.shape
    assert rel_err(got, expected) < RTOL


def test_decoded_video_matches_diffusers(folder, ours):
    latents = initial_latents(1)
    ref = reference(folder, "ddim")
    kwargs = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=3)
    expected = ref(
        prompt="a cat",
        guidance_scale=6.0,
        latents=latents.transpose(1, 2).clone(),
        output_type="np",
        max_sequence_length=TEXT_LENGTH,
        **kwargs,
    )
    got = ours(prompt="a cat", cfg_scale=6.0, latents=latents.clone(), output_type="np", progress_bar=False, **kwargs)
    expected = expected.frames[0]  # [F, H, W, 3] in [0, 1]
    assert got.shape == expected.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert np.abs(got - expected).max() < 1e-4


def test_pil_output_seed_and_callback(ours):
    seen = []
    frames = ours(
        prompt="a boat",
        height=HEIGHT,
        width=WIDTH,
        num_frames=9,
        num_inference_steps=3,
        seed=7,
        progress_bar=False,
        callback=lambda i, t, x: seen.append((i, t, tuple(x.shape))),
    )
    assert len(frames) == 9 and frames[0].size == (WIDTH, HEIGHT)
    assert [s[0] for s in seen] == [0, 1, 2] and all(s[2] == (1, 4, 3, 4, 6) for s in seen)
    again = ours(
        prompt="a boat", height=HEIGHT, width=WIDTH, num_frames=9, num_inference_steps=3, seed=7, progress_bar=False
    )
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, again, strict=True))


def test_video_to_video_runs_the_last_steps_of_the_schedule(ours):
    # Strength s runs the last round(s * N) steps, starting from the encoded video noised to the first of
    # them. (Numerical parity with diffusers' video-to-video pipeline: the parity tests.)
    src = ours(
        prompt="a boat", height=HEIGHT, width=WIDTH, num_frames=9, num_inference_steps=2, seed=1, progress_bar=False
    )
    kwargs = dict(prompt="a boat", height=HEIGHT, width=WIDTH, num_frames=9, num_inference_steps=10, seed=2)
    for strength, steps in [(0.2, [199, 99]), (1.0, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99])]:
        seen: list[int] = []
        ours(
            input_video=src,
            denoising_strength=strength,
            output_type="latent",
            progress_bar=False,
            callback=lambda i, t, x, seen=seen: seen.append(t),
            **kwargs,
        )
        assert seen == steps


@pytest.mark.parametrize("frames", [48, 50, 0])
def test_invalid_frame_count_suggests_nearest_valid(frames):
    with pytest.raises(ValueError, match="8k\\+1.*Nearest valid values"):
        check_num_frames(frames)


def test_invalid_size_and_output_type_are_rejected(ours):
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(prompt="x", height=40, width=48, num_frames=9, progress_bar=False)
    with pytest.raises(ValueError, match="output_type"):
        ours(prompt="x", height=32, width=48, num_frames=9, output_type="gif", progress_bar=False)
    with pytest.raises(ValueError, match="latents must have shape"):
        ours(prompt="x", height=32, width=48, num_frames=9, latents=torch.zeros(1, 4, 2, 4, 6), progress_bar=False)


def test_model_cpu_offload_gives_the_same_latents(ours):
    latents = initial_latents(2)
    kwargs = dict(prompt="a tree", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=2)
    base = ours(latents=latents.clone(), output_type="latent", progress_bar=False, **kwargs)
    for mode in ("model", "sequential"):
        ours.offloader.set_mode(mode)
        try:
            got = ours(latents=latents.clone(), output_type="latent", progress_bar=False, **kwargs)
        finally:
            ours.disable_offload()
        assert torch.equal(got, base), mode


def test_tiled_dit_matches_untiled_when_one_tile_covers_the_frame(ours):
    latents = initial_latents(3)
    kwargs = dict(prompt="a tree", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=2)
    base = ours(latents=latents.clone(), output_type="latent", progress_bar=False, **kwargs)
    same = ours(latents=latents.clone(), output_type="latent", progress_bar=False, dit_tiled=True, **kwargs)
    assert torch.equal(same, base)
    tiled = ours(
        latents=latents.clone(),
        output_type="latent",
        progress_bar=False,
        dit_tiled=TileSpec((32, 32), (0.5, 0.5)),
        **kwargs,
    )
    # Several tiles (their stitching is checked number by number in test_denoiser.py).
    assert tiled.shape == base.shape and torch.isfinite(tiled).all() and not torch.equal(tiled, base)


@pytest.mark.parametrize("frames", [9, 17])  # 3 latent frames = learned positions; 5 = beyond them
def test_image_to_video_matches_diffusers(tmp_path_factory, frames):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXTransformer3DModel,
    )
    from PIL import Image
    from transformers import AutoTokenizer, T5EncoderModel

    folder = save_tiny_model_folder(tmp_path_factory.mktemp("tiny-i2v"), "cogvideox-5b-i2v", seed=6)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    latents = torch.randn(
        1, 4, (frames - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(5)
    )
    ref = CogVideoXImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=T5EncoderModel.from_pretrained(folder / "text_encoder"),
        vae=AutoencoderKLCogVideoX.from_pretrained(folder / "vae"),
        transformer=CogVideoXTransformer3DModel.from_pretrained(folder / "transformer"),
        scheduler=CogVideoXDDIMScheduler.from_pretrained(folder / "scheduler"),
    )
    ref.set_progress_bar_config(disable=True)
    common = dict(prompt="waves", height=HEIGHT, width=WIDTH, num_frames=frames, num_inference_steps=3)
    expected = ref(
        image=image,
        guidance_scale=6.0,
        latents=latents.transpose(1, 2).clone(),
        generator=torch.Generator().manual_seed(9),
        output_type="latent",
        max_sequence_length=TEXT_LENGTH,  # the tiny DiT's (its learned positions cover exactly that)
        **common,
    ).frames.transpose(1, 2)
    # No manual text length: the manager's text encoder takes the tiny I2V DiT's 7 tokens from its config.
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
    pipe = CogVideoPipeline.from_model_manager(manager)
    got = pipe(
        input_image=image,
        cfg_scale=6.0,
        latents=latents.clone(),
        generator=torch.Generator().manual_seed(9),
        output_type="latent",
        progress_bar=False,
        **common,
    )
    assert rel_err(got, expected) < RTOL
    with pytest.raises(ValueError, match="image-to-video model"):
        pipe(progress_bar=False, **common)
