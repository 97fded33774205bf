"""LoRA post-training on CogVideoX 1.5 (T2V and I2V), tiny models on the CPU, fp32.

The training step builds the DiT input as the 1.5 pipeline does: latents padded at the front to whole temporal
patches (a copy of the first latent frame, as CogVideo's 1.5 trainers pad; noise drawn at the padded length),
the I2V image latent zero-padded to that length, the ofs embedding (2.0) on I2V, the family's scheduler. The
reference is diffusers' CogVideoXTransformer3DModel with the RoPE of diffusers' own pipeline and the alphas of
diffusers' scheduler, the loss written out by hand.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import diffusers_scheduler, make_diffusers_dit, save_diffusers_dit

from diffsynth_cog.configs import dit_preset
from diffsynth_cog.families import get_family
from diffsynth_cog.loading.dit_loader import load_dit
from diffsynth_cog.schedulers import scheduler_preset
from diffsynth_cog.training.config import TrainConfig
from diffsynth_cog.training.module import CogLoRAModule, pad_to_temporal_patches

pytestmark = pytest.mark.usefixtures("one_thread")

T2V, I2V = "cogvideox1.5-5b", "cogvideox1.5-5b-i2v"
LATENT_H, LATENT_W = 4, 6  # 32x48 pixels: 2x3 patches, inside the tiny 1.5 grid (12x14 latents)


def module_15(root: Path, preset: str, **changes) -> CogLoRAModule:
    """Our training module on the tiny diffusers transformer of ``preset`` (seed 3), LoRA rank 4, no image noise."""
    folder = save_diffusers_dit(root, preset, seed=3)
    dit = load_dit(folder, dtype=torch.float32)
    values = dict(model=str(folder), cache_dir="unused", output_dir=str(root / "out"), lora_rank=4)
    values.update(precision="fp32", accelerator="cpu", image_noise=None, **changes)
    module = CogLoRAModule(TrainConfig(**values), dit=dit, scheduler_config=scheduler_preset(dit.family.scheduler))
    module.setup("fit")
    module.configure_model()
    return module


def batch_15(latent_frames: int, i2v: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = make_diffusers_dit(T2V).config
    batch = {
        "latents": torch.randn(2, 4, latent_frames, LATENT_H, LATENT_W, generator=g),
        "prompt_emb": torch.randn(2, text.max_text_seq_length, text.text_embed_dim, generator=g),
    }
    if i2v:
        batch["image_latents"] = torch.randn(2, 4, 1, LATENT_H, LATENT_W, generator=g)
    return batch


def reference_loss(preset: str, batch: dict, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The 1.5 training loss written out with diffusers' transformer (same weights), its pipeline's RoPE and its
    scheduler's alphas: x0 padded at the front with a copy of its first frame, x_t = sqrt(a) x0 + sqrt(1-a) noise,
    x0_hat = sqrt(a) x_t - sqrt(1-a) v, loss = mean((x0_hat - x0)^2 / (1 - a)) over every frame, padding included."""
    from diffusers import CogVideoXPipeline

    model = make_diffusers_dit(preset, seed=3)
    x0 = batch["latents"]
    if x0.shape[2] % 2:  # patch_size_t = 2: one copy of the first latent frame in front
        x0 = torch.cat([x0[:, :, :1], x0], dim=2)
    b, c, frames, h, w = x0.shape
    a = diffusers_scheduler("ddim", 1.0).alphas_cumprod[t].double().view(b, 1, 1, 1, 1)
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).float()
    hidden = x_t.transpose(1, 2)  # [B, T, C, h, w], diffusers' layout
    ofs = None
    if preset == I2V:
        image = torch.zeros_like(hidden)
        image[:, 0] = batch["image_latents"][:, :, 0]  # the image at latent frame 0, zeros after (the pipeline's)
        hidden = torch.cat([hidden, image], dim=2)
        ofs = torch.full((b,), 2.0)
    spatial = get_family(preset).vae_spatial
    pipe = SimpleNamespace(transformer=model, vae_scale_factor_spatial=spatial)
    rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, h * spatial, w * spatial, frames, "cpu")
    with torch.no_grad():
        v = model(
            hidden_states=hidden,
            encoder_hidden_states=batch["prompt_emb"],
            timestep=t,
            ofs=ofs,
            image_rotary_emb=rope,
            return_dict=False,
        )[0].transpose(1, 2)
    x0_hat = a.sqrt() * x_t - (1 - a).sqrt() * v
    return ((x0_hat - x0) ** 2 / (1 - a)).mean().float()


@pytest.mark.parametrize("preset", [T2V, I2V])
@pytest.mark.parametrize("latent_frames", [3, 4])  # 9 frames -> 3 latent frames + 1 padding; 4: no padding
def test_15_training_step_loss_matches_diffusers_transformer_by_hand(tmp_path, preset, latent_frames) -> None:
    module = module_15(tmp_path, preset)
    batch = batch_15(latent_frames, preset == I2V)
    loss = module.batch_loss(batch, step=0)
    # The step's own draws: t and the noise at the padded length (whole temporal patches).
    padded = pad_to_temporal_patches(batch["latents"], module.dit.family)
    assert padded.shape[2] == 4 and torch.equal(padded[:, :, -latent_frames:], batch["latents"])
    t, noise = module.sample_noise(padded, module.step_generator(0, torch.device("cpu"), step=0))
    expected = reference_loss(preset, batch, t, noise)
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item(), (loss.item(), expected.item())
    loss.backward()  # the step trains the LoRA: lora_B gets gradients (B starts at zero, so A gets none yet)
    grads = [p.grad for n, p in module.dit.named_parameters() if p.requires_grad and "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_15_noise_must_have_the_padded_length(tmp_path) -> None:
    module = module_15(tmp_path, T2V)
    batch = batch_15(3, False)
    t = torch.tensor([10, 500])
    with pytest.raises(ValueError, match="draw the noise at the padded length"):
        module.v_loss(batch["latents"], batch["prompt_emb"], t, torch.randn(batch["latents"].shape))


def test_15_padding_repeats_the_first_latent_frame_in_front_and_leaves_1_0_alone() -> None:
    x0 = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 2, 2)
    padded = pad_to_temporal_patches(x0, get_family(T2V))
    assert padded.shape == (1, 2, 4, 2, 2)
    assert torch.equal(padded[:, :, 0], x0[:, :, 0]) and torch.equal(padded[:, :, 1:], x0)
    assert pad_to_temporal_patches(x0, get_family("cogvideox-5b")) is x0
    # The released sizes: 81 frames -> 21 latent frames -> 22; 161 -> 41 -> 42 (REFERENCE.md section 9).
    family = dit_preset(T2V).family
    assert [family.padded_latent_frames(family.latent_frames(n)) for n in (81, 161)] == [22, 42]


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "job,frames,degree", [("cogvideox15_81f_24gb.json", 81, 1), ("cogvideox15_161f_multi_gpu.json", 161, 2)]
)
def test_15_job_files_parse_and_fit_the_released_15_model(job, frames, degree) -> None:
    from diffsynth_cog.pipeline.sampling import latent_plan
    from diffsynth_cog.training.sequence import check_degree

    config = TrainConfig.from_json(REPO / "train" / job)
    released = dit_preset(T2V)
    size = (config.validation_num_frames, config.validation_height, config.validation_width)
    assert size == (frames, 768, 1360) and config.validation_fps == released.family.fps
    plan = latent_plan(released, *size)  # the family's frame, size and position-grid rules
    tokens = plan.shape[2] // released.temporal_patch * (768 // 16) * (1360 // 16)
    assert tokens == {81: 44_880, 161: 85_680}[frames]  # REFERENCE.md section 9
    assert config.sequence_parallel == degree
    check_degree(degree, released.num_attention_heads, config.devices * config.num_nodes)
    if degree == 1:  # one GPU, 24 GiB: the switches of the 1.0 24 GiB job
        low_memory = TrainConfig.from_json(REPO / "train" / "exvideo_129f_24gb.json")
        for name in ("base_quantization", "activation_offload", "optimizer", "strategy", "lora_targets", "lora_rank"):
            assert getattr(config, name) == getattr(low_memory, name), name
