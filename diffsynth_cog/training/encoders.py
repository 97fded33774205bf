"""The two frozen encoders of the prepare step, and what they make of one clip.

:func:`load_encoders` loads the T5 text encoder and the VAE encoder (no decoder) of a model folder into
:class:`Encoders`. The prepare step (:mod:`diffsynth_cog.training.prepare`) hands each clip and its caption
to a ``_ClipEncoder``, which turns them into one record's tensors in the cache's storage dtype (layout in
:mod:`diffsynth_cog.training.cache_layout`), checks their shapes and gives the record's safetensors metadata.

Latents are the posterior MEAN by default. The VAE posterior is a Gaussian; diffusers' trainers draw
a fresh sample from it at every step, which a cache cannot do: a cached draw is frozen, so it adds
the same fixed perturbation in every epoch rather than acting as augmentation. The mean is the
latent the decoder reconstructs from, and it is bit-reproducible, so a record redone after an
interruption, or by another rank, is identical to the original. ``sample_posterior=True`` stores
one draw instead, from a generator seeded by ``(seed, index)`` so that each record's draw does not
depend on rank count or resume order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.loading.model_folder import resolve_model_folder
from diffsynth_cog.loading.text_encoder_loader import load_text_encoder
from diffsynth_cog.loading.vae_loader import load_vae_encoder
from diffsynth_cog.models.text_encoder import CogTextEncoder
from diffsynth_cog.models.vae import CogVAE, CogVAEEncoder
from diffsynth_cog.training.cache_layout import CACHE_FORMAT, IMAGE_LATENTS_KEY, LATENTS_KEY, PROMPT_EMB_KEY, CacheInfo
from diffsynth_cog.training.data import VideoSample


@dataclass(frozen=True)
class Encoders:
    """The two frozen encoders of the prepare step, the paths they were loaded from and the transformer config of
    the model folder (None without one): the family the cache is for (``prepare_cache(dit_config=...)``)."""

    text_encoder: CogTextEncoder
    vae_encoder: CogVAEEncoder
    paths: dict[str, str]
    dit_config: DiTConfig | None = None


# --------------------------------------------------------------------------------------------- loading
def load_encoders(
    model_dir: str | os.PathLike[str] | None = None,
    *,
    text_encoder_path: str | os.PathLike[str] | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
    vae_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    vae_dtype: torch.dtype | None = None,
    max_text_length: int | None = None,
    vae_scaling_factor: float | None = None,
) -> Encoders:
    """The T5 text encoder and the VAE encoder (no decoder) for :func:`~diffsynth_cog.training.prepare.prepare_cache`.

    ``model_dir``: a CogVideoX model folder (``text_encoder/``, ``tokenizer/``, ``vae/``, and
    ``transformer/`` whose ``max_text_seq_length`` sets the prompt length and whose family sets the
    VAE scale when the VAE has no config.json). Any of ``text_encoder_path`` / ``tokenizer_path`` /
    ``vae_path`` overrides the folder's part (or replaces ``model_dir`` altogether). ``dtype``:
    weights of both encoders (``vae_dtype`` for the VAE alone). ``max_text_length``: tokens per
    prompt (default: the transformer config's, else 226).
    """
    if model_dir is None and (text_encoder_path is None or vae_path is None):
        raise ValueError("pass model_dir, or both text_encoder_path and vae_path")
    folder = resolve_model_folder(model_dir, text_encoder=text_encoder_path, tokenizer=tokenizer_path, vae=vae_path)
    text_path, vae_folder = folder.require("text_encoder"), folder.require("vae")
    text_encoder = load_text_encoder(
        text_path,
        tokenizer_path=folder.require("tokenizer"),
        dtype=dtype,
        device=device,
        max_length=max_text_length if max_text_length is not None else folder.max_text_seq_length,
    )
    vae_encoder = load_vae_encoder(
        vae_folder,
        dtype=vae_dtype or dtype,
        device=device,
        scaling_factor=vae_scaling_factor if vae_scaling_factor is not None else folder.vae_scaling_factor,
    ).eval()
    vae_encoder.requires_grad_(False)
    paths = {"text_encoder": str(text_path), "vae": str(vae_folder), "tokenizer": str(folder.require("tokenizer"))}
    return Encoders(text_encoder=text_encoder, vae_encoder=vae_encoder, paths=paths, dit_config=folder.dit_config)


# --------------------------------------------------------------------------------------------- encoding
def posterior_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for record ``index``'s posterior draw: same draw whatever rank or order encodes it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


@dataclass(frozen=True)
class _ClipEncoder:
    """Encodes one clip (and its prompt) into a record's tensors, in the cache's storage dtype."""

    text_encoder: CogTextEncoder
    vae_encoder: CogVAEEncoder | CogVAE
    info: CacheInfo
    device: torch.device
    vae_dtype: torch.dtype
    scale: float  # the VAE's scaling factor
    dtype: torch.dtype
    tiled: bool
    sample_posterior: bool
    seed: int
    image_latents: bool

    @classmethod
    def build(
        cls,
        text_encoder: CogTextEncoder,
        vae_encoder: CogVAEEncoder | CogVAE,
        info: CacheInfo,
        *,
        device: str | torch.device | None,
        dtype: torch.dtype,
        tiled: bool,
        sample_posterior: bool,
        seed: int,
        image_latents: bool,
    ) -> _ClipEncoder:
        param = next(vae_encoder.parameters())
        return cls(
            text_encoder=text_encoder,
            vae_encoder=vae_encoder,
            info=info,
            device=torch.device(device) if device is not None else param.device,
            vae_dtype=param.dtype,
            scale=float(vae_encoder.config.scaling_factor),
            dtype=dtype,
            tiled=tiled,
            sample_posterior=sample_posterior,
            seed=seed,
            image_latents=image_latents,
        )

    def encode(self, item: Mapping[str, object], sample: VideoSample) -> dict[str, torch.Tensor]:
        index, prompt = int(item["index"]), str(item["prompt"])
        with torch.inference_mode():
            prompt_emb = self.text_encoder.encode(prompt, device=self.device, names=[sample.label])[0]  # [L, d]
            video = item["video"].unsqueeze(0).to(device=self.device, dtype=self.vae_dtype)  # [1, 3, F, H, W]
            generator = posterior_generator(self.seed, index) if self.sample_posterior else None
            latents = self.vae_encoder.encode(
                video, tiled=self.tiled, sample=self.sample_posterior, generator=generator
            )[0]
            # Scale in fp32 (x0 of training), then round once to the storage dtype.
            latents = (latents.float() * self.scale).to(self.dtype).cpu()  # [C, T, h, w]
            prompt_emb = prompt_emb.to(self.dtype).cpu()
            record = {LATENTS_KEY: latents, PROMPT_EMB_KEY: prompt_emb}
            if self.image_latents:  # the first frame alone, as an image (1 frame -> 1 latent frame)
                first = self.vae_encoder.encode(
                    video[:, :, :1], tiled=self.tiled, sample=self.sample_posterior, generator=generator
                )
                image_scale = self.info.image_latent_scale
                record[IMAGE_LATENTS_KEY] = (first[0].float() * image_scale).to(self.dtype).cpu()  # [C, 1, h, w]
        return record

    def check_shapes(self, index: int, record: Mapping[str, torch.Tensor]) -> None:
        """RuntimeError if a tensor's shape is not the one cache_info.json promises."""
        shapes = {LATENTS_KEY: self.info.latent_shape, PROMPT_EMB_KEY: self.info.prompt_emb_shape}
        shapes[IMAGE_LATENTS_KEY] = self.info.image_latent_shape
        for key, tensor in record.items():
            expected = shapes[key]
            if tuple(tensor.shape) != tuple(expected):
                raise RuntimeError(f"clip {index}: {key} came out {list(tensor.shape)}, expected {list(expected)}")

    def metadata(self, index: int, prompt: str, sample: VideoSample, key: str) -> dict[str, str]:
        """The safetensors metadata of record ``index``."""
        return {
            "format": CACHE_FORMAT,
            "index": str(index),
            "prompt": prompt,
            "source": str(sample.path),
            "num_frames": str(self.info.num_frames),
            "height": str(self.info.height),
            "width": str(self.info.width),
            "frame_interval": str(self.info.frame_interval),
            "scaling_factor": repr(self.scale),
            "posterior": self.info.posterior,
            "key": key,
        }
