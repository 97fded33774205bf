"""CogVideoX 1.5 LoRA post-training end to end on the CPU, tiny model folders: prepare (the family's clip rules,
1.5 I2V image latents scaled as the pipeline scales them) -> train (the loss falls) -> export in diffusers format
(DiffSynth refused) -> the LoRA merged by ``ModelManager.load_lora`` gives the trained weights, and diffusers' own
``load_lora_weights`` on a CogVideoXPipeline with the 1.5 transformer gives the trained model's output."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from test_training import HEIGHT, NUM_FRAMES, WIDTH, trained_and_initial_loss, write_dataset
from tiny_models import load_diffusers_pipeline, make_diffusers_vae, save_tiny_model_folder

from diffsynth_cog import ModelManager
from diffsynth_cog.cli.main import main
from diffsynth_cog.configs import dit_preset
from diffsynth_cog.errors import LoRAError
from diffsynth_cog.lora import export_lora, load_lora_state_dict, lora_layers, lora_state_dict
from diffsynth_cog.training.cache import CacheError, CacheInfo, LatentCacheDataset
from diffsynth_cog.training.config import TrainConfig
from diffsynth_cog.training.data import VideoClipDataset, load_dataset_index
from diffsynth_cog.training.module import pad_to_temporal_patches
from diffsynth_cog.training.prepare import _cache_info, check_clip, load_encoders
from diffsynth_cog.training.trainer import preflight, run_training

pytestmark = pytest.mark.usefixtures("one_thread")

T2V, I2V = "cogvideox1.5-5b", "cogvideox1.5-5b-i2v"
# Beyond the block Linear layers, 1.5's own Linear layers: the patch embedding (a Linear on 1.5) and the ofs MLP.
TARGETS = {"T2V": ("attn1.to_q", "attn1.to_v", "ff.0", "patch_embed"), "I2V": ("attn1.to_q", "ff.2", "ofs_embed.0")}


def prepare_argv(dataset: Path, model: Path, cache: Path, frames: int = NUM_FRAMES, height: int = HEIGHT) -> list:
    argv = ["prepare", "--dataset", str(dataset), "--model", str(model), "--cache", str(cache)]
    argv += ["--num-frames", str(frames), "--height", str(height), "--width", str(WIDTH)]
    return argv + ["--dtype", "fp32", "--device", "cpu", "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module", params=["T2V", "I2V"])
def run15(request, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny 1.5 model folder, a one-clip cache and a 30-step LoRA run on it."""
    root = tmp_path_factory.mktemp(f"train15-{request.param}")
    preset = T2V if request.param == "T2V" else I2V
    model = save_tiny_model_folder(root / "model", preset, seed=0)
    # The 1.5 I2V VAE config says invert_scale_latents, as the released one does.
    make_diffusers_vae(seed=0, invert_scale_latents=preset == I2V).save_pretrained(model / "vae")
    dataset = write_dataset(root / "data", 1)
    assert main(prepare_argv(dataset, model, root / "cache")) == 0
    config = TrainConfig(
        model=str(model),
        cache_dir=str(root / "cache"),
        output_dir=str(root / "run"),
        lora_targets=TARGETS[request.param],
        lora_rank=8,
        learning_rate=1e-2,
        max_steps=30,
        checkpoint_every_n_steps=30,
        log_every_n_steps=5,
        num_workers=0,
        tensorboard=False,
        image_noise=None,
    )
    result = run_training(config, progress=False)
    return SimpleNamespace(kind=request.param, preset=preset, root=root, model=model, dataset=dataset, result=result)


def fixed_loss(module, cache: Path) -> float:
    """The first record's loss at fixed timesteps and noise (at the padded length), with its clean image."""
    item = LatentCacheDataset(cache)[0]
    t = torch.tensor([20, 300, 600, 900])
    expand = lambda x: x[None].float().expand(len(t), *x.shape)  # noqa: E731
    x0 = pad_to_temporal_patches(expand(item["latents"]), module.dit.family)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    image = expand(item["image_latents"]) if "image_latents" in item else None
    with torch.no_grad():
        return module.v_loss(x0, expand(item["prompt_emb"]), t, noise, image).item()


def test_15_prepare_reads_the_family_and_scales_i2v_image_latents_as_the_pipeline(run15) -> None:
    info = CacheInfo.load(run15.root / "cache")
    assert info.latent_shape == (4, 3, HEIGHT // 8, WIDTH // 8)  # 9 frames -> 3 latent frames, stored unpadded
    if run15.kind == "T2V":
        assert info.image_latent_shape is None and info.image_latent_scale is None
        return
    # The 1.5 I2V pipeline divides its image's latents by the factor (invert_scale_latents): prepare does too.
    assert info.image_latent_scale == pytest.approx(1 / 0.7)
    encoders = load_encoders(run15.model, dtype=torch.float32)
    video = VideoClipDataset(load_dataset_index(run15.dataset), NUM_FRAMES, HEIGHT, WIDTH)[0]["video"]
    with torch.no_grad():
        first = encoders.vae_encoder.encode(video[None, :, :1], tiled=True)[0]
    assert torch.allclose(LatentCacheDataset(run15.root / "cache")[0]["image_latents"], first / 0.7, rtol=1e-6)
    # A cache whose image latents were scaled the 1.0 way does not fit the 1.5 I2V DiT: refused, saying what to do.
    values = {**info.to_dict(), "image_latent_scale": 0.7}
    config = TrainConfig(model=str(run15.model), cache_dir=str(run15.root / "cache"), output_dir="unused")
    with pytest.raises(CacheError, match=r"takes them multiplied by 1.42857.*prepare the cache again"):
        CacheInfo.from_dict(values).check_dit(preflight(config)[0])


def test_15_lora_training_loss_falls(run15) -> None:
    result = run15.result
    assert result.global_step == 30 and result.lora_path is not None
    trained = lora_state_dict(result.module.dit)
    after, before = trained_and_initial_loss(result.module, lambda m: fixed_loss(m, run15.root / "cache"))
    load_lora_state_dict(result.module.dit, trained)  # trained_and_initial_loss zeroed B: the other tests need it
    assert after < 0.5 * before, (before, after)


def _trained_weights(module) -> dict[str, torch.Tensor]:
    """Our layer name -> base weight + scale * B @ A of the trained model (fp32)."""
    return {n: (layer.weight + layer.delta_weight()).detach() for n, layer in lora_layers(module.dit).items()}


def test_15_export_is_diffusers_format_and_merges_back_to_the_trained_weights(run15, tmp_path: Path) -> None:
    module = run15.result.module
    path = run15.result.lora_path
    with safe_open(str(path), framework="pt") as handle:
        header, keys = handle.metadata(), set(handle.keys())
    assert header["lora_format"] == "diffusers"  # the family's layout: 1.5 has no DiffSynth files
    if run15.kind == "T2V":
        assert "transformer.patch_embed.proj.lora_A.weight" in keys
    else:
        assert "transformer.ofs_embedding.linear_1.lora_B.weight" in keys
    with pytest.raises(LoRAError, match="DiffSynth-Studio has no CogVideoX 1.5"):
        export_lora(module.dit, tmp_path / "diffsynth.safetensors", format="diffsynth")

    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[run15.model / "transformer"])
    manager.load_lora(path)
    merged = dict(manager.fetch_model("cog_dit", require=True).named_parameters())
    for name, weight in _trained_weights(module).items():
        assert torch.allclose(merged[f"{name}.weight"], weight, rtol=1e-5, atol=1e-6), name


def test_15_diffusers_load_lora_weights_reproduces_the_trained_model(run15) -> None:
    pytest.importorskip("peft")
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    module = run15.result.module
    cls = CogVideoXPipeline if run15.kind == "T2V" else CogVideoXImageToVideoPipeline
    pipe = load_diffusers_pipeline(cls, run15.model)
    pipe.load_lora_weights(str(run15.result.lora_path))
    config = module.dit.config
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, config.in_channels, 4, HEIGHT // 8, WIDTH // 8, generator=g)
    emb = torch.randn(1, config.max_text_seq_length, config.text_embed_dim, generator=g)
    t = torch.tensor([400])
    module.dit.eval()
    with torch.no_grad():
        ours = module.denoiser.call_dit(x, t, emb)
        spatial = module.dit.family.vae_spatial
        rope = pipe._prepare_rotary_positional_embeddings(HEIGHT, WIDTH, x.shape[2], "cpu")
        ofs = torch.full((1,), 2.0) if run15.kind == "I2V" else None
        theirs = pipe.transformer(
            hidden_states=x.transpose(1, 2),
            encoder_hidden_states=emb,
            timestep=t,
            ofs=ofs,
            image_rotary_emb=rope,
            return_dict=False,
        )[0].transpose(1, 2)
    assert spatial == pipe.vae_scale_factor_spatial
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
    pipe.unload_lora_weights()  # and without the LoRA the output differs: the comparison saw the LoRA
    with torch.no_grad():
        base = pipe.transformer(
            hidden_states=x.transpose(1, 2), encoder_hidden_states=emb, timestep=t, ofs=ofs, image_rotary_emb=rope
        )[0].transpose(1, 2)
    assert ((base - theirs).norm() / theirs.norm()).item() > 1e-3


def test_15_prepare_checks_the_released_sizes_and_the_position_grid(tmp_path: Path, caplog) -> None:
    released = dit_preset(T2V)
    for frames in (81, 161):  # 1360x768 (sides multiples of 16) at both native lengths
        check_clip(released, frames, 768, 1360)
    text = SimpleNamespace(max_length=released.max_text_seq_length, d_model=released.text_embed_dim)
    vae = SimpleNamespace(
        config=SimpleNamespace(
            temporal_compression_ratio=4,
            spatial_compression=8,
            latent_channels=16,
            scaling_factor=0.7,
            invert_scale_latents=True,
        )
    )
    common = dict(frame_interval=1, dtype=torch.bfloat16, sample_posterior=False, seed=0, tiled=True, model_paths={})
    info = _cache_info(
        text, vae, num_frames=161, height=768, width=1360, image_latents=True, dit_config=dit_preset(I2V), **common
    )
    assert info.latent_shape == (16, 41, 96, 170) and info.image_latent_scale == pytest.approx(1 / 0.7)
    with pytest.raises(ValueError, match="multiples of 16"):
        check_clip(released, 81, 770, 1360)
    with pytest.raises(ValueError, match="8k\\+1|8k \\+ 1"):
        check_clip(released, 80, 768, 1360)
    # The CLI refuses a clip beyond the tiny 1.5 model's position grid (96x112 pixels) before loading anything.
    model = save_tiny_model_folder(tmp_path / "model", T2V, seed=0)
    dataset = write_dataset(tmp_path / "data", 1)
    caplog.clear()
    assert main(prepare_argv(dataset, model, tmp_path / "cache", height=128)) != 0
    assert "exceeds CogVideoX1.5-5B's position grid of 96x112 pixels" in caplog.text
    assert not (tmp_path / "cache").exists()
