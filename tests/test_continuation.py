"""Video continuation: the kept latent frames follow the encoded context at every step and end exactly on it, the
extended video is the original frames untouched plus the new ones, and bad requests fail before any work. Tiny
CogVideoX-5B with its VAE, fp32 on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_model_folder

from diffsynth_cog import CogVideoPipeline, ModelManager
from diffsynth_cog.io.video import tensor_to_frames
from diffsynth_cog.pipeline.cog_video import seeded_generator
from diffsynth_cog.pipeline.continuation import KeptFrames, kept_latent_frames
from diffsynth_cog.schedulers import add_noise, make_sampler, scheduler_preset

HEIGHT, WIDTH = 32, 48


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b-continue"), "cogvideox-5b", seed=11)
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.load_models([root])
    return CogVideoPipeline.from_model_manager(manager)


def prompts(pipe):
    g = torch.Generator().manual_seed(2)
    c = pipe.dit.config
    return {
        "prompt_emb": torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g),
        "negative_prompt_emb": torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g),
    }


def video(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, HEIGHT, WIDTH, generator=g) * 2 - 1  # [1, 3, F, H, W] in [-1, 1]


def test_kept_frames_follow_the_encoded_context_and_end_exactly_on_it(pipe):
    clip = video(9)  # 3 latent frames; the first 5 pixel frames (2 latent frames) are kept
    seen = []
    got = pipe(
        input_video=clip,
        keep_frames=5,
        num_frames=9,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=3,
        denoising_strength=1.0,
        seed=4,
        output_type="latent",
        progress_bar=False,
        callback=lambda i, t, x: seen.append(x[:, :, :2].clone()),
        **prompts(pipe),
    )
    clean = pipe.encode_video(clip, False, seeded_generator(4))[:, :, :2]  # the call's first use of its generator
    assert torch.equal(got[:, :, :2], clean)
    # Between steps: the clean context noised to the next step's level with one fixed noise.
    sampler = make_sampler("ddim", pipe.scheduler_config, 3)
    alphas = sampler.alphas_cumprod.float()
    t1, t2 = sampler.timesteps.tolist()[1:]
    noise = (seen[0] - alphas[t1] ** 0.5 * clean) / (1 - alphas[t1]) ** 0.5
    assert torch.allclose(seen[1], add_noise(clean, noise, t2, alphas), atol=1e-5)
    assert torch.equal(seen[2], clean)
    assert not torch.equal(got[:, :, 2:], got[:, :, 1:2].expand(-1, -1, 1, -1, -1))


def test_extended_video_is_the_original_untouched_then_the_new_frames(pipe):
    original = tensor_to_frames(video(13, seed=1)[0])  # 13 PIL frames
    out = pipe.extend_video(
        original, 8, context_frames=9, num_inference_steps=2, seed=3, progress_bar=False, **prompts(pipe)
    )
    assert len(out) == 13 + 8
    assert all(a is b for a, b in zip(out[:13], original, strict=True))
    assert out[13].size == (WIDTH, HEIGHT)
    arr = pipe.extend_video(
        original,
        16,
        context_frames=9,
        num_inference_steps=1,
        seed=3,
        output_type="np",
        progress_bar=False,
        **prompts(pipe),
    )
    assert arr.shape == (13 + 16, HEIGHT, WIDTH, 3)
    want = np.stack([np.asarray(f, dtype=np.float32) / 255 for f in original])
    assert np.allclose(arr[:13], want, atol=1e-6)


def test_bad_continuations_fail_before_any_work(pipe):
    frames = video(13)
    for kwargs, message in (
        (dict(extend_by=4, context_frames=9), "multiple of 8"),
        (dict(extend_by=8, context_frames=5), "8k\\+1"),
        (dict(extend_by=8, context_frames=17), "exceeds"),
        (dict(extend_by=8, context_frames=9, num_frames=9), "sets num_frames"),
    ):
        with pytest.raises(ValueError, match=message):
            pipe.extend_video(frames, **kwargs)
    with pytest.raises(ValueError, match="keep_frames needs input_video"):
        pipe(keep_frames=5, num_frames=9, height=HEIGHT, width=WIDTH, **prompts(pipe))
    assert kept_latent_frames(1) == 1 and kept_latent_frames(17) == 5


def test_kept_frames_part_alone():
    sampler = make_sampler("ddim", scheduler_preset("cogvideox-5b"), 4)
    clean, noise = torch.randn(1, 2, 2, 3, 3), torch.randn(1, 2, 2, 3, 3)
    kept = KeptFrames(clean, noise, sampler)
    latents = torch.randn(1, 2, 5, 3, 3)
    ts = sampler.timesteps.tolist()
    after = kept(0, latents)
    assert torch.equal(after[:, :, 2:], latents[:, :, 2:])
    assert torch.equal(after[:, :, :2], add_noise(clean, noise, ts[1], sampler.alphas_cumprod.float()))
    assert torch.equal(kept(3, latents)[:, :, :2], clean)
