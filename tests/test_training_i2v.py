"""Long image-to-video LoRA end to end on the CPU: prepare (first-frame image latents) -> train ->
export -> the I2V pipeline with the LoRA, on a tiny CogVideoX-5B-I2V model folder (in_channels = 2 x
latent channels, learned positions at 9 frames, 32x48 pixels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import (
    HEIGHT,
    NUM_FRAMES,
    WIDTH,
    frames_of,
    synthetic_clip,
    trained_and_initial_loss,
    write_dataset,
)
from tiny_models import save_tiny_model_folder

from diffsynth_cog.cli.main import main
from diffsynth_cog.training.cache import CacheError, CacheInfo, LatentCacheDataset
from diffsynth_cog.training.config import TrainConfig, TrainConfigError
from diffsynth_cog.training.data import VideoClipDataset, load_dataset_index
from diffsynth_cog.training.prepare import load_encoders
from diffsynth_cog.training.trainer import preflight, run_training

pytestmark = pytest.mark.usefixtures("one_thread")


def prepare(dataset: Path, model: Path, cache: Path, *extra: str) -> Path:
    argv = ["prepare", "--dataset", str(dataset), "--model", str(model), "--cache", str(cache)]
    argv += ["--num-frames", str(NUM_FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH)]
    argv += ["--dtype", "fp32", "--device", "cpu", "--num-workers", "0", "--no-progress", *extra]
    assert main(argv) == 0
    return cache


@pytest.fixture(scope="module")
def i2v(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("i2v")
    model = save_tiny_model_folder(root / "model", "cogvideox-5b-i2v", seed=0)
    dataset = write_dataset(root / "data", 1)
    image = root / "first_frame.png"
    Image.fromarray(synthetic_clip(0)[0]).save(image)
    return {
        "root": root,
        "model": model,
        "dataset": dataset,
        "cache": prepare(dataset, model, root / "cache"),
        "image": image,
    }


def i2v_config(i2v: dict[str, Path], output: Path, **changes) -> TrainConfig:
    values = dict(
        model=str(i2v["model"]),
        cache_dir=str(i2v["cache"]),
        output_dir=str(output),
        lora_rank=8,
        learning_rate=1e-2,
        max_steps=30,
        checkpoint_every_n_steps=30,
        log_every_n_steps=1,
        num_workers=0,
        tensorboard=False,
    )
    values.update(changes)
    return TrainConfig(**values)


def fixed_i2v_loss(module, cache: Path) -> float:
    """The loss of the first record at fixed timesteps and noise, with its clean image condition."""
    item = LatentCacheDataset(cache)[0]
    t = torch.tensor([20, 300, 600, 900])
    expand = lambda x: x[None].float().expand(len(t), *x.shape)  # noqa: E731
    noise = torch.randn((len(t), *item["latents"].shape), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return module.v_loss(
            expand(item["latents"]), expand(item["prompt_emb"]), t, noise, expand(item["image_latents"])
        ).item()


def test_prepare_stores_the_first_frame_encoded_alone_as_an_image(i2v: dict[str, Path], tmp_path: Path) -> None:
    info = CacheInfo.load(i2v["cache"])
    assert info.image_latent_shape == (4, 1, HEIGHT // 8, WIDTH // 8)  # the tiny VAE has 4 latent channels
    item = LatentCacheDataset(i2v["cache"])[0]
    assert item["image_latents"].shape == (4, 1, 4, 6)

    # What the I2V pipeline does with its input image: the frame alone through the VAE encoder, scaled.
    encoders = load_encoders(i2v["model"], dtype=torch.float32)
    video = VideoClipDataset(load_dataset_index(i2v["dataset"]), NUM_FRAMES, HEIGHT, WIDTH)[0]["video"]
    with torch.no_grad():
        first = encoders.vae_encoder.encode(video[None, :, :1], tiled=True)[0]
    expected = first * encoders.vae_encoder.config.scaling_factor
    assert torch.equal(item["image_latents"], expected.float())
    # Not the clip's first latent frame: the VAE's normalisation sees the whole clip.
    assert not torch.allclose(item["image_latents"], item["latents"][:, :1], atol=1e-3)

    # An I2V DiT refuses a cache without image latents, saying how to make one.
    plain = prepare(i2v["dataset"], i2v["model"], tmp_path / "plain", "--image-latents", "no")
    with pytest.raises(CacheError, match="prepare it again with --image-latents"):
        preflight(i2v_config(i2v, tmp_path / "out", cache_dir=str(plain)))
    # ... and validation videos of an I2V model need one image per prompt.
    with pytest.raises(TrainConfigError, match="one input image per validation prompt"):
        preflight(i2v_config(i2v, tmp_path / "out", validation_every_n_steps=5, validation_prompts=("a cat",)))


@pytest.mark.slow
def test_i2v_lora_prepare_train_export_generate(i2v: dict[str, Path], tmp_path: Path) -> None:
    config = i2v_config(
        i2v,
        tmp_path / "run",
        image_dropout=0.1,
        validation_every_n_steps=30,
        validation_prompts=("a cat",),
        validation_images=(str(i2v["image"]),),
        validation_num_inference_steps=2,
    )
    result = run_training(config, progress=False)
    assert result.global_step == 30 and result.lora_path is not None and result.lora_path.is_file()
    assert len(frames_of(tmp_path / "run" / "validation" / "step0000030_0.mp4")) == NUM_FRAMES

    module = result.module
    assert module.image_to_video and module.dit.config.in_channels == 8
    after, before = trained_and_initial_loss(module, lambda m: fixed_i2v_loss(m, i2v["cache"]))
    assert after < 0.5 * before, (before, after)

    # The exported LoRA changes what the I2V pipeline makes of the image (same seed, same image).
    common = ["generate", "--prompt", "a cat", "--model", str(i2v["model"]), "--device", "cpu", "--dtype", "fp32"]
    common += ["--input-image", str(i2v["image"]), "--num-frames", str(NUM_FRAMES), "--height", str(HEIGHT)]
    common += ["--width", str(WIDTH), "--steps", "4", "--cfg-scale", "3", "--seed", "5", "--no-download"]
    common += ["--no-progress"]
    videos = {}
    for name, lora in (("base", "none"), ("lora", str(result.lora_path)), ("again", "none")):
        videos[name] = tmp_path / f"{name}.mp4"
        assert main([*common, "--lora", lora, "--output", str(videos[name])]) == 0
    base, tuned, again = (frames_of(videos[n]) for n in ("base", "lora", "again"))
    assert base.shape == tuned.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
    assert np.array_equal(base, again)
    assert np.abs(tuned - base).mean() > 2.0, np.abs(tuned - base).mean()
    metadata = json.loads(json.dumps(config.to_dict()))
    assert metadata["image_dropout"] == 0.1 and metadata["image_noise"] == [-3.0, 0.5]


def test_i2v_condition_is_the_image_zero_padded_in_time_after_the_noisy_latents(i2v: dict[str, Path]) -> None:
    from diffsynth_cog.training.module import CogLoRAModule

    module = CogLoRAModule(i2v_config(i2v, i2v["root"] / "unused"))
    module.setup("fit")
    module.configure_model()
    x_t = torch.randn(2, 4, 3, 4, 6)
    image = torch.randn(2, 4, 1, 4, 6)
    x_in = module.dit_input(x_t, image)
    assert x_in.shape == (2, 8, 3, 4, 6)
    assert torch.equal(x_in[:, :4], x_t) and torch.equal(x_in[:, 4:, :1], image)
    assert not x_in[:, 4:, 1:].any()
    with pytest.raises(ValueError, match="needs 'image_latents'"):
        module.dit_input(x_t, None)
    # Noise augmentation and dropout draw from the step's generator: the same step gives the same condition.
    g1, g2 = (module.step_generator(0, torch.device("cpu"), step=4) for _ in range(2))
    assert torch.equal(module.augment_image(image, g1), module.augment_image(image, g2))
    assert not torch.equal(module.augment_image(image, module.step_generator(0, torch.device("cpu"), 5)), image)
