"""The LightningModule of long-video LoRA post-training: a frozen CogVideoX DiT plus trainable LoRA.

Only the DiT lives in the training process (ExVideo's recipe): prompts and clips were encoded ahead
of time by ``diffsynth-cog prepare``, so a batch is ``{"latents": [B, C, T, h, w] (scaled x0),
"prompt_emb": [B, L, d]}`` read from the latent cache.

Loss (CogVideoX's, as in diffusers' and CogVideo's trainers): per sample t ~ U{t_min..t_max},
noise ~ N(0, I), x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, v_pred = DiT(x_t, t, prompt_emb),
loss = mean(1 / (1 - a_t) * (x0_hat - x0)^2) with x0_hat = sqrt(a_t) x_t - sqrt(1 - a_t) v_pred.

Randomness is a pure function of (seed, global step, micro-batch in the accumulation window, rank)
(:func:`step_seed`), never of a generator's running state, so a run resumed from a checkpoint draws
exactly the timesteps and noise the uninterrupted run would have drawn.

Precision: the base weights are bf16 on GPUs (fp32 on CPU or with ``precision: "fp32"``), the LoRA
parameters fp32 (ExVideo: extension module in fp32, the rest bf16). The module manages dtypes
itself; Lightning runs in "32-true" mode (no autocast, no casting of the module), which also keeps
DeepSpeed from casting the fp32 LoRA parameters to bf16. Memory switches (``base_quantization``,
``activation_offload``, ``optimizer``): see :mod:`diffsynth_cog.training.memory`.

The DiT is called the way the sampler calls it, through a :class:`~diffsynth_cog.denoise.denoiser.Denoiser`
(embed -> attention part -> token split -> blocks -> project -> gather -> unpatchify), so an
attention part (e.g. a sparse mask) or a token split (sequence parallelism) given to the module
trains exactly what inference runs.

Image-to-video (a DiT whose in_channels are twice its out_channels, e.g. CogVideoX-5B-I2V): the
batch also holds ``"image_latents"`` [B, C, 1, h, w], the first frame encoded alone by ``prepare``.
As the reference trainers do, it is zero-padded in time to the clip's latent frames and concatenated
to the noisy latents on the channels (``[x_t, image]``, the pipeline's order), after noise
augmentation (``image_noise``: sigma = exp(N(mean, std)) per sample, added in latent space since the
VAE is not in the training process; CogVideoX's trainers add it to the pixels before encoding) and
``image_dropout``. The loss is on the video latents alone.

CogVideoX 1.5 (temporal patches of ``patch_size_t`` = 2 latent frames): the DiT runs whole temporal patches, so
the step builds its input as the 1.5 pipeline does (``pipeline.sampling.latent_plan``): the cached latents (21
frames at 81 pixel frames) are padded at the FRONT to whole patches (22), the noise is drawn at the padded length,
the I2V condition is the image latent zero-padded to that length (``sampling.image_condition``: the image lines up
with latent frame 0), and the DiT adds the family's ``ofs`` embedding (2.0) on 1.5 I2V. The padded frame is a
copy of the first latent frame (:func:`pad_to_temporal_patches`), as CogVideo's own 1.5 LoRA trainers make it
(THUDM/CogVideo ``finetune/models/cogvideox_*/lora_trainer.py``: ``T % patch_size_t`` copies of the first frame
prepended). The loss covers it like any other frame (as those trainers do; 1/22 of the loss at 81 frames): it
shares the first temporal patch, hence the same tokens, with the first real frame, and the pipeline denoises it
at every step and feeds it back as input before dropping it at the end, so its prediction is trained toward what
the model sees there in training rather than left free. The 1.5 I2V image latents are scaled per the family
(``sampling.image_latent_scale``: divided by the VAE factor, ``invert_scale_latents``), as the pipeline scales
them at inference, by ``prepare``; CogVideo's trainer multiplies instead, which the released pipeline does not.

Checkpoints hold the LoRA weights only (plus optimizer and loop state): :meth:`on_save_checkpoint`
drops the frozen base from Lightning's ``state_dict``, and the DeepSpeed strategy is built with
``exclude_frozen_parameters=True`` (its engine writes the module itself). Resuming loads with
``strict_loading = False`` after :meth:`on_load_checkpoint` has checked the LoRA keys.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

import lightning.pytorch as pl
import torch

from diffsynth_cog.configs import DiTConfig, dit_family
from diffsynth_cog.denoise.denoiser import AttentionPart, Denoiser, TokenSplit
from diffsynth_cog.denoise.masks import parse_attention
from diffsynth_cog.errors import StateDictMismatchError
from diffsynth_cog.families import Family
from diffsynth_cog.loading.dit_loader import load_dit
from diffsynth_cog.loading.model_folder import ModelFolder, resolve_model_folder
from diffsynth_cog.lora import inject_lora, lora_layers, lora_state_dict
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.pipeline.sampling import image_condition
from diffsynth_cog.schedulers import SchedulerConfig, add_noise, alphas_cumprod, scheduler_preset
from diffsynth_cog.training.config import TrainConfig
from diffsynth_cog.training.loss import v_prediction_loss
from diffsynth_cog.training.memory import activation_offload, build_optimizer
from diffsynth_cog.training.sequence import data_parallel_coords, sequence_parallel_split

logger = logging.getLogger(__name__)

# Our entry in every checkpoint: what an export needs without the model files (configs, LoRA layout).
CHECKPOINT_KEY = "diffsynth_cog"
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_STEM = "step{step:07d}"  # step0000250.ckpt; validation videos step0000250_0.mp4


# --------------------------------------------------------------------------------------------- model files
def model_folder(model: str | os.PathLike[str]) -> ModelFolder:
    """The training model: a CogVideoX model folder, its ``transformer/`` folder, or a transformer weights file."""
    return resolve_model_folder(model, part="transformer")


def read_dit_config(model: str | os.PathLike[str]) -> DiTConfig:
    """The transformer's config without loading weights (config.json, else inferred from tensor headers)."""
    return model_folder(model).require_dit_config()


def read_scheduler_config(model: str | os.PathLike[str], dit_config: DiTConfig) -> SchedulerConfig:
    """The model's scheduler config; without one, the preset of its family (2B: SNR shift 3, 5B: none)."""
    path = model_folder(model).scheduler_config
    if path is not None:
        return SchedulerConfig.from_file(path)
    preset = dit_family(dit_config)
    logger.warning("%s: no scheduler/scheduler_config.json beside the transformer; using the %s preset", model, preset)
    return scheduler_preset(preset)


def base_dtype(precision: str, device: torch.device) -> torch.dtype:
    """dtype of the frozen base weights: bf16 on GPUs unless fp32 is asked for (LoRA is always fp32)."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return torch.float32
    return torch.bfloat16


# --------------------------------------------------------------------------------------------- randomness
def step_seed(seed: int, step: int, micro_batch: int = 0, rank: int = 0) -> int:
    """A 63-bit seed for one micro-batch, from (seed, optimizer step, micro-batch in the step, rank).

    A hash rather than ``seed + step``: nearby seeds of different runs must not share streams, and
    Python's ``hash()`` is salted per process, so it cannot be used across ranks or resumes.
    """
    text = f"diffsynth_cog/{seed}/{step}/{micro_batch}/{rank}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def pad_to_temporal_patches(x0: torch.Tensor, family: Family) -> torch.Tensor:
    """Clean latents [B, C, T, h, w] -> [B, C, T', h, w] with T' = ``family.padded_latent_frames(T)`` (whole temporal
    patches; T itself on CogVideoX 1.0): the first latent frame repeated T' - T times at the front, where the
    pipeline's padding frame sits (see the module docstring)."""
    padding = family.padded_latent_frames(x0.shape[2]) - x0.shape[2]
    if padding == 0:
        return x0
    return torch.cat([x0[:, :, :1].expand(-1, -1, padding, -1, -1), x0], dim=2)


def lora_layout(dit: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Layer name -> {"rank", "alpha"} of every LoRA layer (what an export needs to rebuild them)."""
    return {name: {"rank": layer.rank, "alpha": layer.alpha} for name, layer in lora_layers(dit).items()}


# --------------------------------------------------------------------------------------------- the module
class CogLoRAModule(pl.LightningModule):
    """A frozen CogVideoX DiT with LoRA layers, trained with the v-prediction loss.

    The DiT is loaded in :meth:`configure_model` (after :meth:`setup` read the scheduler), on the
    strategy's device, so optimizers and DeepSpeed only ever see the LoRA parameters as trainable.
    ``dit`` may be passed in instead (tests, notebooks, benchmarks); it must not carry LoRA layers yet.
    ``attention`` / ``split``: the attention part and token split of every training DiT call (see
    :class:`~diffsynth_cog.denoise.denoiser.Denoiser`); by default the config's: ``attention`` (a sparse mask,
    else dense) and ``sequence_parallel`` (the Ulysses split of ``training.sequence``, built in
    :meth:`configure_model` once the process group exists; else whole calls).
    ``scheduler_config``: instead of the model folder's (needed when ``config.model`` is not a folder).
    """

    def __init__(
        self,
        config: TrainConfig,
        dit: CogDiT | None = None,
        *,
        attention: str | AttentionPart | None = None,
        split: TokenSplit | None = None,
        scheduler_config: SchedulerConfig | None = None,
    ) -> None:
        super().__init__()
        self.train_config = config
        # JSON-compatible values only: checkpoints stay loadable with torch.load(weights_only=True).
        self.save_hyperparameters({"train_config": config.to_dict()})
        # The checkpoints hold the LoRA weights only; on_load_checkpoint checks them against the model.
        self.strict_loading = False
        self._given_dit = dit
        self._attention, self._split = attention, split
        self.dit: CogDiT | None = None
        self.denoiser: Denoiser | None = None
        self.scheduler_config: SchedulerConfig | None = scheduler_config
        # a_t table (float64 [num_train_timesteps]); a plain attribute, not a buffer, so it is never
        # saved in a checkpoint nor cast by .to(dtype).
        self.alphas: torch.Tensor | None = None
        self._last_batch_end: float | None = None
        self._tokens_per_sample = 0

    # -- building ------------------------------------------------------------------------------

    def _root_device(self) -> torch.device:
        if self._trainer is not None:
            return self.trainer.strategy.root_device
        return self.device

    def setup(self, stage: str) -> None:
        if self.alphas is not None:
            return
        if self.scheduler_config is None:
            if self._given_dit is not None:
                dit_config = self._given_dit.config
            else:
                dit_config = read_dit_config(self.train_config.model)
            self.scheduler_config = read_scheduler_config(self.train_config.model, dit_config)
        if self.scheduler_config.prediction_type != "v_prediction":
            raise ValueError(
                f"{self.train_config.model}: scheduler prediction_type is {self.scheduler_config.prediction_type!r}; "
                "this trainer implements CogVideoX's v-prediction loss only"
            )
        top = self.train_config.timestep_range[1]
        if top >= self.scheduler_config.num_train_timesteps:
            raise ValueError(
                f"timestep_range max {top} is outside the scheduler's 0..{self.scheduler_config.num_train_timesteps - 1}"
            )
        self.alphas = alphas_cumprod(self.scheduler_config)

    def configure_model(self) -> None:
        if self.dit is not None:
            return
        cfg = self.train_config
        device = self._root_device()
        dtype = base_dtype(cfg.precision, device)
        if self._given_dit is not None:
            dit = self._given_dit.to(device=device, dtype=dtype)
        else:
            dit = load_dit(model_folder(cfg.model).require("transformer"), dtype=dtype, device=device)
        if lora_layers(dit):
            raise ValueError("configure_model: the DiT already carries LoRA layers; pass a plain DiT")
        dit.requires_grad_(False)
        if cfg.base_quantization != "none":
            from diffsynth_cog.quantization import quantize_dit

            # Before the LoRA: inject_lora wraps each quantized layer as the base of a LoRALinear.
            quantize_dit(dit, cfg.base_quantization)
        if cfg.gradient_checkpointing:
            dit.enable_gradient_checkpointing()
        # A seeded init of the A matrices (B starts at zero), so two runs with one seed start equal
        # (with or without a quantized base: the same layers, in the same order).
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        inject_lora(dit, cfg.lora_spec(), generator=generator)
        dit.train()
        self.dit = dit
        attention, split = self._attention, self._split
        if attention is None and cfg.attention is not None:
            attention = parse_attention(cfg.attention)
        if split is None and cfg.sequence_parallel > 1:
            split = sequence_parallel_split(cfg.sequence_parallel, dit.config.num_attention_heads)
        self.denoiser = Denoiser(dit, attention=attention, split=split)
        trainable = sum(p.numel() for p in dit.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in dit.parameters() if not p.requires_grad)
        logger.info(
            "DiT on %s: %d frozen %s base parameters (block layers quantized: %s), %d trainable fp32 LoRA "
            "parameters; activation offload %s, optimizer %s; parts %s",
            device,
            frozen,
            str(dtype).removeprefix("torch."),
            cfg.base_quantization,
            trainable,
            cfg.activation_offload,
            cfg.optimizer,
            self.denoiser.parts(),
        )

    def _require_dit(self) -> CogDiT:
        if self.dit is None or self.alphas is None:
            raise RuntimeError("CogLoRAModule: call setup() and configure_model() first (Lightning does)")
        return self.dit

    # -- the loss ------------------------------------------------------------------------------

    def sample_noise(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] (long) uniform in ``timestep_range`` and noise like x0 [B, C, T, h, w] (float32)."""
        low, high = self.train_config.timestep_range
        t = torch.randint(low, high + 1, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        return t, noise

    @property
    def image_to_video(self) -> bool:
        """Whether the DiT takes the first frame's latent as extra input channels (CogVideoX-5B-I2V)."""
        c = self._require_dit().config
        return c.in_channels == 2 * c.out_channels

    def dit_input(self, x_t: torch.Tensor, image_latents: torch.Tensor | None) -> torch.Tensor:
        """The DiT's input for noisy latents x_t [B, C, T, h, w] (T whole temporal patches): x_t itself, or for an
        image-to-video DiT ``[x_t, image]`` on the channels, the image latent [B, C, 1, h, w] zero-padded to T frames
        as the pipeline pads it (``sampling.image_condition``)."""
        if not self.image_to_video:
            return x_t
        if image_latents is None:
            raise ValueError(
                "the DiT is image-to-video (in_channels = 2 x out_channels): the batch needs 'image_latents' "
                "(prepare the cache with --image-latents)"
            )
        patch_t = self._require_dit().config.temporal_patch
        image = image_condition(image_latents.to(x_t.dtype), x_t.shape[2], patch_t)
        return torch.cat([x_t, image], dim=1)  # [B, 2C, T, h, w]

    def augment_image(self, image_latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise augmentation and dropout of the I2V condition [B, C, 1, h, w] (see the module docstring)."""
        cfg, image = self.train_config, image_latents.float()
        b, device = image.shape[0], image.device
        if cfg.image_noise is not None:
            mean, std = cfg.image_noise
            sigma = (torch.randn(b, generator=generator, device=device) * std + mean).exp()  # [B]
            noise = torch.randn(image.shape, generator=generator, device=device)
            image = image + sigma.view(b, 1, 1, 1, 1) * noise
        if cfg.image_dropout > 0:
            keep = torch.rand(b, generator=generator, device=device) >= cfg.image_dropout  # [B]
            image = image * keep.view(b, 1, 1, 1, 1)
        return image

    def v_loss(
        self,
        x0: torch.Tensor,
        prompt_emb: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        image_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The CogVideoX training loss for given x0 [B, C, T, h, w], prompt_emb [B, L, d], t [B], noise
        (and for an image-to-video DiT the first frame's latent [B, C, 1, h, w]).

        On CogVideoX 1.5, x0 may be the cache's latents (T = 21 at 81 frames) or already padded; it is padded to
        whole temporal patches (:func:`pad_to_temporal_patches`) and ``noise`` must have the padded shape."""
        x0 = pad_to_temporal_patches(x0.float(), self._require_dit().family)
        if noise.shape != x0.shape:
            raise ValueError(
                f"noise has shape {list(noise.shape)}, the latents padded to whole temporal patches "
                f"{list(x0.shape)}: draw the noise at the padded length (pad_to_temporal_patches)"
            )
        x_t = add_noise(x0, noise.float(), t, self.alphas)  # [B, C, T, h, w] float32
        x_in = self.dit_input(x_t, image_latents)
        with activation_offload(self.train_config.activation_offload):
            v_pred = self.denoiser.call_dit(x_in, t, prompt_emb)  # [B, C, T, h, w] in the base dtype
        return v_prediction_loss(v_pred, x0, x_t, t, self.alphas)

    def step_generator(self, micro_batch: int, device: torch.device, step: int | None = None) -> torch.Generator:
        """The generator of one micro-batch (see :func:`step_seed`); ``step`` defaults to the global step."""
        step = self.global_step if step is None else step
        seed = step_seed(self.train_config.seed, step, micro_batch, self.data_parallel_rank)
        return torch.Generator(device=device).manual_seed(seed)

    @property
    def data_parallel_rank(self) -> int:
        """This rank's sample stream: the rank, or with ``sequence_parallel`` its group's index (every rank of
        a group trains the same sample with the same timesteps and noise)."""
        if self._trainer is None:  # called directly (tests, benchmarks): one stream
            return 0
        return data_parallel_coords(self.global_rank, self.trainer.world_size, self.train_config.sequence_parallel)[0]

    def batch_loss(self, batch: dict[str, Any], micro_batch: int = 0, step: int | None = None) -> torch.Tensor:
        """The loss of one micro-batch, with its (t, noise) drawn from :meth:`step_generator`."""
        # [B, C, T, h, w], already scaled by the VAE factor; padded to whole temporal patches (1.5) before the
        # noise is drawn, so that the noise has the padded length, as the pipeline draws it.
        x0 = pad_to_temporal_patches(batch["latents"].float(), self._require_dit().family)
        generator = self.step_generator(micro_batch, x0.device, step)
        t, noise = self.sample_noise(x0, generator)
        image = batch.get("image_latents")
        if image is not None and self.image_to_video:
            image = self.augment_image(image.to(x0.device), generator)
        return self.v_loss(x0, batch["prompt_emb"], t, noise, image)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0, prompt_emb = batch["latents"], batch["prompt_emb"]
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        loss = self.batch_loss(batch, batch_idx % accumulate)

        b, _, frames, h, w = x0.shape
        config = self._require_dit().config
        p, patches_t = config.patch_size, config.family.padded_latent_frames(frames) // config.temporal_patch
        self._tokens_per_sample = patches_t * (h // p) * (w // p) + prompt_emb.shape[1]
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=b)
        if self._trainer is not None and self.trainer.optimizers:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("train/lr", float(lr), on_step=True, on_epoch=False, batch_size=b)
        return loss

    # -- throughput ------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        self._last_batch_end = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        # Wall time between consecutive batch ends: data loading, forward, backward and (every
        # grad_accumulation batches) the optimizer step. On GPUs the logged loss synchronises often
        # enough that the average over a logging interval is the real rate.
        now = time.perf_counter()
        if self._last_batch_end is not None and now > self._last_batch_end:
            samples = batch["latents"].shape[0] * self.trainer.world_size // self.train_config.sequence_parallel
            rate = samples / (now - self._last_batch_end)
            self.log("train/samples_per_s", rate, on_step=True, on_epoch=False, batch_size=1)
            self.log("train/tokens_per_s", rate * self._tokens_per_sample, on_step=True, on_epoch=False, batch_size=1)
        self._last_batch_end = now

    # -- optimisation ------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.train_config
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: the LoRA layers were not injected")
        optimizer = build_optimizer(
            params,
            cfg.optimizer,
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            deepspeed_offload=cfg.offload_optimizer,
        )
        warmup = cfg.warmup_steps

        def warmup_factor(step: int) -> float:
            # Linear warmup over the first `warmup` steps, then constant (ExVideo keeps lr constant).
            return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # -- checkpoints ------------------------------------------------------------------------------

    def trainable_state_keys(self) -> set[str]:
        """state_dict keys of the trainable (LoRA) parameters: ``dit.blocks.0.attn1.to_q.lora_A.weight``, ..."""
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def checkpoint_info(self) -> dict[str, Any]:
        """Our checkpoint entry: JSON-style values only (loadable with ``weights_only=True``)."""
        dit = self._require_dit()
        return {
            "version": CHECKPOINT_FORMAT_VERSION,
            "train_config": self.train_config.to_dict(),
            "dit_config": dit.config.to_dict(),
            "lora_layers": lora_layout(dit),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:
            keep = self.trainable_state_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_info()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        dit = self._require_dit()
        info = checkpoint.get(CHECKPOINT_KEY)
        if info is None:
            raise StateDictMismatchError(
                f"the checkpoint has no {CHECKPOINT_KEY!r} entry: it was not written by this trainer"
            )
        saved, current = info.get("lora_layers", {}), lora_layout(dit)
        if saved != current:
            differ = sorted(set(saved) ^ set(current)) or [n for n in current if saved.get(n) != current[n]]
            raise StateDictMismatchError(
                "the checkpoint's LoRA layers differ from this config's (lora_targets / lora_rank / lora_alpha "
                f"changed?): e.g. {differ[:5]}"
            )
        if "state_dict" in checkpoint:  # DeepSpeed loads its own module file; Lightning's .ckpt comes here
            expected, found = self.trainable_state_keys(), set(checkpoint["state_dict"])
            if found != expected:
                raise StateDictMismatchError(
                    f"the checkpoint's weights do not match the LoRA parameters: missing {sorted(expected - found)[:5]}, "
                    f"unexpected {sorted(found - expected)[:5]}"
                )

    def lora_weights(self) -> dict[str, torch.Tensor]:
        """The LoRA weights under the DiT's own names (``blocks.0.attn1.to_q.lora_A.weight``), fp32 CPU."""
        return lora_state_dict(self._require_dit())
