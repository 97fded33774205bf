"""CogVideoPipeline on CogVideoX 1.5 against diffusers' CogVideoXPipeline / CogVideoXImageToVideoPipeline, tiny models.

Both sides load the same model folder written by diffusers and draw from the same seed: the latents are padded to
whole temporal patches (noise drawn at the padded length), the I2V image latents are divided by the scaling factor
(``invert_scale_latents``) and the DiT gets ofs = 2.0; the padding is dropped before decoding. diffusers' "latent"
output keeps the padding frames (at the front); ours drops them, so we compare against its latents without them.
fp32, relative error 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TINY_DIT, load_diffusers_pipeline, make_diffusers_vae, save_tiny_model_folder

from diffsynth_cog import CogVideoPipeline, ModelManager
from diffsynth_cog.pipeline.checks import latent_shape_for

RTOL = 1e-5
TEXT_LENGTH = TINY_DIT["max_text_seq_length"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _folder(root, preset: str, sampler: str):
    folder = save_tiny_model_folder(root, preset, seed=4, sampler=sampler)
    # The 1.5 I2V VAE config says invert_scale_latents (the reference divides the image latents by the factor).
    make_diffusers_vae(seed=4, invert_scale_latents=preset.endswith("i2v")).save_pretrained(folder / "vae")
    return folder


def _ours(folder) -> CogVideoPipeline:
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
    return CogVideoPipeline.from_model_manager(manager)


@pytest.fixture(scope="module", params=["ddim", "dpm"])
def t2v(request, tmp_path_factory):
    folder = _folder(tmp_path_factory.mktemp("tiny-15"), "cogvideox1.5-5b", request.param)
    return request.param, folder, _ours(folder)


# frames 9 -> 3 latent frames + 1 padding = 2 temporal patches (even); 17 -> 5 + 1 = 3 patches (odd).
@pytest.mark.parametrize(
    "frames,height,width,cfg,dynamic",
    [(17, 32, 48, 6.0, False), (9, 48, 32, 6.0, True), (9, 32, 48, 1.0, False)],
)
def test_15_final_latents_match_diffusers(t2v, frames, height, width, cfg, dynamic):
    from diffusers import CogVideoXPipeline

    sampler, folder, ours = t2v
    ref = load_diffusers_pipeline(CogVideoXPipeline, folder, sampler)
    common = dict(prompt="a red fox", negative_prompt="blurry", height=height, width=width, num_frames=frames)
    expected = ref(
        num_inference_steps=4,
        guidance_scale=cfg,
        use_dynamic_cfg=dynamic,
        generator=torch.Generator().manual_seed(11),
        output_type="latent",
        max_sequence_length=TEXT_LENGTH,
        **common,
    ).frames.transpose(1, 2)
    got = ours(
        num_inference_steps=4,
        cfg_scale=cfg,
        use_dynamic_cfg=dynamic,
        sampler=sampler,
        seed=11,
        output_type="latent",
        progress_bar=False,
        **common,
    )
    latent_frames = (frames - 1) // 4 + 1
    assert expected.shape[2] == latent_frames + 1  # the reference keeps its front padding in "latent" output
    assert got.shape == expected[:, :, 1:].shape
    assert rel_err(got, expected[:, :, 1:]) < RTOL


def test_15_decoded_video_matches_diffusers(t2v):
    from diffusers import CogVideoXPipeline

    sampler, folder, ours = t2v
    if sampler != "ddim":
        pytest.skip("one sampler is enough for the decode")
    ref = load_diffusers_pipeline(CogVideoXPipeline, folder, sampler)
    common = dict(prompt="a cat", height=32, width=48, num_frames=9)
    expected = ref(
        num_inference_steps=2,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
        max_sequence_length=TEXT_LENGTH,
        **common,
    ).frames[0]
    got = ours(num_inference_steps=2, cfg_scale=6.0, seed=3, output_type="np", progress_bar=False, **common)
    assert got.shape == expected.shape == (9, 32, 48, 3)
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("frames", [9, 17])
def test_15_image_to_video_matches_diffusers(tmp_path_factory, frames):
    from diffusers import CogVideoXImageToVideoPipeline

    folder = _folder(tmp_path_factory.mktemp("tiny-15-i2v"), "cogvideox1.5-5b-i2v", "ddim")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    ref = load_diffusers_pipeline(CogVideoXImageToVideoPipeline, folder)
    common = dict(prompt="waves", height=32, width=48, num_frames=frames, num_inference_steps=3)
    expected = ref(
        image=image,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(9),
        output_type="latent",
        max_sequence_length=TEXT_LENGTH,
        **common,
    ).frames.transpose(1, 2)
    pipe = _ours(folder)
    got = pipe(input_image=image, cfg_scale=6.0, seed=9, output_type="latent", progress_bar=False, **common)
    assert rel_err(got, expected[:, :, 1:]) < RTOL


def test_15_rules_refuse_before_any_work(t2v):
    _, _, ours = t2v
    config = ours.dit.config
    # 81 frames: 21 latent frames, padded to 22 = 11 temporal patches; sides multiples of 16.
    assert latent_shape_for(config, 81, 32, 48) == (1, 4, 22, 4, 6)
    with pytest.raises(ValueError, match=r"num_frames must be 8k\+1"):
        ours(prompt="x", num_frames=13, height=32, width=48, progress_bar=False)
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(prompt="x", num_frames=9, height=40, width=48, progress_bar=False)
    # The tiny model's RoPE grid is 12x14 latents = 96x112 px.
    with pytest.raises(ValueError, match=r"128x48 exceeds CogVideoX1.5-5B's position grid of 96x112 pixels"):
        ours(prompt="x", num_frames=9, height=128, width=48, progress_bar=False)
    with pytest.raises(ValueError, match="DiffSynth-Studio 1.1.x, which has no CogVideoX1.5-5B"):
        ours(prompt="x", num_frames=9, height=32, width=48, sampler="diffsynth", progress_bar=False)
    with pytest.raises(ValueError, match="conventions='diffsynth' follow DiffSynth-Studio 1.1.x, which has no"):
        ours(prompt="x", num_frames=9, height=32, width=48, conventions="diffsynth", progress_bar=False)
    video = torch.zeros(1, 3, 9, 32, 48)
    with pytest.raises(ValueError, match="input_video .* not supported on CogVideoX1.5-5B"):
        ours(prompt="x", num_frames=9, height=32, width=48, input_video=video, progress_bar=False)
