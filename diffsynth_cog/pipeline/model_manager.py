"""ModelManager: finds out what each path holds, loads it, and hands models to pipelines.

Accepted paths (DiffSynth-Studio's example passes the first three kinds as they are):
  * a ``text_encoder/`` folder (T5 encoder; the tokenizer is found in ``../tokenizer``);
  * a ``transformer/`` folder (config.json + shards);
  * a single weights file (e.g. ``vae/diffusion_pytorch_model.safetensors`` with no config beside it);
  * a whole model folder (``text_encoder/``, ``tokenizer/``, ``transformer/``, ``vae/``, ``scheduler/``).

What a path holds is decided from its config.json when there is one, else from tensor names and
shapes (header-only, no tensor data is read for detection). What lies beside it (tokenizer, scheduler
config, the prompt length and the VAE's latent scale) comes from
:func:`~diffsynth_cog.loading.model_folder.resolve_model_folder`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffsynth_cog.errors import ModelDetectionError
from diffsynth_cog.loading.dit_loader import is_dit_checkpoint, load_dit
from diffsynth_cog.loading.model_folder import ModelFolder, declared_part, is_model_folder, resolve_model_folder
from diffsynth_cog.loading.state_dict import resolve_weights, tensor_shapes
from diffsynth_cog.loading.text_encoder_loader import is_t5_checkpoint, load_text_encoder
from diffsynth_cog.loading.vae_loader import is_vae_checkpoint, load_vae
from diffsynth_cog.lora import LoRAMergeReport, merge_lora, restore_base_weights
from diffsynth_cog.schedulers import SchedulerConfig

logger = logging.getLogger(__name__)

MODEL_NAMES = ("cog_dit", "cog_vae_encoder", "cog_vae_decoder", "cog_text_encoder")

# What detect() calls each part of a model folder.
_KIND_OF_PART = {"transformer": "dit", "vae": "vae", "text_encoder": "text_encoder"}
_PART_OF_KIND = {kind: part for part, kind in _KIND_OF_PART.items()}


@dataclass
class LoadedModel:
    """One loaded model: the name pipelines fetch it by, where it came from, and the module."""

    name: str
    path: Path
    model: torch.nn.Module


@dataclass
class LoadedLoRA:
    path: Path
    alpha: float
    report: LoRAMergeReport


@dataclass
class ModelManager:
    """Loads CogVideoX models from raw files; ``fetch_model(name)`` gives them to pipelines.

    Args:
        torch_dtype: dtype of the loaded weights (bf16 is what the 5B model is meant to run in).
        device: where weights are placed when loaded. Pipelines may move them (offload modes).
        file_path_list: paths to load right away (same as calling ``load_models``).
    """

    torch_dtype: torch.dtype = torch.bfloat16
    device: str | torch.device = "cpu"
    file_path_list: Sequence[str | os.PathLike[str]] = ()
    records: list[LoadedModel] = field(default_factory=list)
    loras: list[LoadedLoRA] = field(default_factory=list)
    tokenizer_path: Path | None = None
    scheduler_config: SchedulerConfig | None = None
    scheduler_config_path: Path | None = None

    def __post_init__(self) -> None:
        if self.file_path_list:
            self.load_models(self.file_path_list)

    # -- detection ---------------------------------------------------------------------------

    @staticmethod
    def detect(path: str | os.PathLike[str]) -> str:
        """'dit', 'vae', 'text_encoder' or 'model_folder' for ``path``; ModelDetectionError otherwise."""
        p = Path(path)
        if not p.exists():
            raise ModelDetectionError(f"{p}: no such file or folder")
        if is_model_folder(p):
            return "model_folder"
        part = declared_part(p)
        if part is not None:
            return _KIND_OF_PART[part]
        source = resolve_weights(p)
        shapes = tensor_shapes(source)
        if is_dit_checkpoint(shapes):
            return "dit"
        if is_vae_checkpoint(shapes):
            return "vae"
        if is_t5_checkpoint(shapes):
            return "text_encoder"
        sample = sorted(shapes)[:5]
        raise ModelDetectionError(
            f"{p}: not a CogVideoX transformer, VAE or T5 text encoder (first keys: {sample}); "
            "pass a transformer/, vae/ or text_encoder/ folder, a weights file of one of them, or a whole model folder"
        )

    # -- loading -----------------------------------------------------------------------------

    def load_models(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        for path in paths:
            self.load_model(path)

    def load_model(self, path: str | os.PathLike[str]) -> list[LoadedModel]:
        """Loads whatever ``path`` holds; returns the records added."""
        p = Path(path)
        kind = self.detect(p)
        if kind == "model_folder":
            folder = resolve_model_folder(p)
            added = [record for part in folder.weight_parts() for record in self.load_model(part)]
            self._use_side_files(folder)
            return added
        folder = resolve_model_folder(p, part=_PART_OF_KIND[kind])
        dtype, device = self.torch_dtype, self.device
        if kind == "dit":
            model = load_dit(p, dtype=dtype, device=device)
            added = [self._add("cog_dit", p, model)]
            self._use_side_files(folder)
        elif kind == "vae":
            vae = load_vae(p, dtype=dtype, device=device, scaling_factor=folder.vae_scaling_factor)
            added = [self._add("cog_vae_encoder", p, vae.encoder), self._add("cog_vae_decoder", p, vae.decoder)]
        else:
            # The tokenizer beside the encoder, else one found beside a transformer loaded earlier.
            tokenizer = folder.tokenizer or self.tokenizer_path
            model = load_text_encoder(p, tokenizer_path=tokenizer, dtype=dtype, device=device)
            added = [self._add("cog_text_encoder", p, model)]
        self._match_text_length()
        return added

    def _add(self, name: str, path: Path, model: torch.nn.Module) -> LoadedModel:
        if any(r.name == name for r in self.records):
            logger.warning("%s loaded again from %s; the newest one is used", name, path)
            self.records = [r for r in self.records if r.name != name]
        record = LoadedModel(name=name, path=path, model=model)
        self.records.append(record)
        logger.info("loaded %s from %s", name, path)
        return record

    def _use_side_files(self, folder: ModelFolder) -> None:
        """The tokenizer and scheduler config found beside a transformer (in its model folder)."""
        if self.tokenizer_path is None:
            self.tokenizer_path = folder.tokenizer
        if folder.scheduler_config is not None:
            self.scheduler_config_path = folder.scheduler_config
            self.scheduler_config = SchedulerConfig.from_file(folder.scheduler_config)
            logger.info("scheduler config from %s", self.scheduler_config_path)

    def _match_text_length(self) -> None:
        """The text encoder pads and truncates prompts to the DiT's ``max_text_seq_length``.

        Loaded from a model folder, both already agree (the resolver reads the transformer's config);
        this covers a text encoder and a DiT loaded from different places.
        """
        dit, text_encoder = self.fetch_model("cog_dit"), self.fetch_model("cog_text_encoder")
        if dit is None or text_encoder is None:
            return
        wanted = int(dit.config.max_text_seq_length)
        if text_encoder.max_length != wanted:
            logger.info(
                "text encoder: %d tokens per prompt, the DiT's max_text_seq_length (it was loaded with %d)",
                wanted,
                text_encoder.max_length,
            )
            text_encoder.max_length = wanted

    # -- access ------------------------------------------------------------------------------

    def fetch_model(self, name: str, require: bool = False) -> torch.nn.Module | None:
        if name not in MODEL_NAMES:
            raise ValueError(f"unknown model name {name!r}; valid: {MODEL_NAMES}")
        for record in reversed(self.records):
            if record.name == name:
                return record.model
        if require:
            loaded = [r.name for r in self.records]
            raise ModelDetectionError(f"{name} is not loaded (loaded: {loaded}); pass its path to load_models")
        return None

    def fetch_record(self, name: str) -> LoadedModel | None:
        return next((r for r in reversed(self.records) if r.name == name), None)

    # -- LoRA --------------------------------------------------------------------------------

    def load_lora(self, path: str | os.PathLike[str], lora_alpha: float = 1.0) -> LoRAMergeReport:
        """Merges a LoRA file into the loaded DiT (DiffSynth or diffusers/PEFT keys).

        A file that does not fit the DiT raises and leaves the weights exactly as they were.
        """
        dit = self.fetch_model("cog_dit", require=True)
        report = merge_lora(dit, path, alpha=lora_alpha)
        self.loras.append(LoadedLoRA(path=Path(path), alpha=lora_alpha, report=report))
        return report

    def clear_loras(self) -> None:
        """Restores the DiT's base weights bitwise, removing every merged LoRA."""
        dit = self.fetch_model("cog_dit")
        if dit is not None and self.loras:
            restore_base_weights(dit)
        self.loras.clear()
