"""Loading the T5 text encoder of CogVideoX and its tokenizer.

Weights are read without pickle from a ``text_encoder/`` folder (config.json plus model.safetensors
or a sharded index) or from a whole model folder; the model is built on the meta device and the
tensors are assigned in place, so no memory is spent on a random initialisation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from diffsynth_cog.errors import ModelDetectionError, StateDictMismatchError, WeightsFileError
from diffsynth_cog.loading.convert import account_keys, model_shapes
from diffsynth_cog.loading.model_folder import resolve_model_folder
from diffsynth_cog.loading.state_dict import WeightsSource, iter_tensors, resolve_weights, tensor_shapes
from diffsynth_cog.models.text_encoder import CogTextEncoder

logger = logging.getLogger(__name__)

# T5 keeps one token embedding, ``shared.weight``; the encoder's ``embed_tokens`` is the same tensor.
# Checkpoints store it under either name or both.
SHARED_KEY = "shared.weight"
TIED_KEY = "encoder.embed_tokens.weight"
_T5_PROBE_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"


# ----------------------------------------------------------------------------------------------------
# Detection


def is_t5_checkpoint(config_or_shapes: Mapping[str, Any]) -> bool:
    """True for a T5 config dict (config.json) or a key -> shape mapping of T5 (encoder) weights."""
    m = config_or_shapes
    if "model_type" in m or "architectures" in m or "d_model" in m:  # a config.json
        if "model_type" in m:
            return m["model_type"] == "t5"
        return any(str(a).startswith("T5") for a in m.get("architectures") or [])
    keys = set(m)
    return (
        _T5_PROBE_KEY in keys
        and (SHARED_KEY in keys or TIED_KEY in keys)
        # UMT5 has a relative position table in every block; T5 only in the first.
        and "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in keys
    )


# ----------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(folder: Path) -> Any:
    """A T5 tokenizer from a folder (spiece.model and/or tokenizer.json, tokenizer_config.json); no network."""
    try:
        return T5Tokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, RuntimeError) as e:  # what transformers raises for bad files
        raise WeightsFileError(f"{folder}: cannot load the T5 tokenizer ({type(e).__name__}: {e})") from e


def _tensor_dtype(key: str, dtype: torch.dtype | None) -> torch.dtype | None:
    # transformers keeps T5's feed-forward output projections in float32 when asked for float16 (T5
    # v1.1 overflows there in fp16; its forward casts activations to the weight's dtype): do the same.
    if dtype == torch.float16 and key.endswith("DenseReluDense.wo.weight"):
        return torch.float32
    return dtype


def _load_t5(
    source: WeightsSource, config_dict: dict[str, Any], dtype: torch.dtype | None, device: str | torch.device
) -> T5EncoderModel:
    """Builds the encoder on meta from its config.json dict and assigns the checkpoint's tensors.

    Every checkpoint key is accounted for: encoder weights are used, a duplicate of the tied token
    embedding must equal ``shared.weight``, a full T5's decoder and LM head are skipped (logged);
    anything else is a StateDictMismatchError naming the keys.
    """
    try:
        config = T5Config.from_dict(config_dict)
    except (TypeError, ValueError) as e:
        raise WeightsFileError(f"{source.config_path}: not a usable T5 config ({e})") from e
    with torch.device("meta"):
        model = T5EncoderModel(config)
    target = {k: s for k, s in model_shapes(model).items() if k != TIED_KEY}

    shapes = tensor_shapes(source)  # headers only: a misfit fails before any data is read
    has_shared = SHARED_KEY in shapes

    def rename(key: str) -> str | None:
        if key == TIED_KEY and not has_shared:
            return SHARED_KEY  # only the encoder's copy was saved
        return key

    def ignorable(key: str) -> str | None:
        if key == TIED_KEY and has_shared:
            return f"duplicate of the tied {SHARED_KEY} (checked equal)"
        if key.startswith("decoder.") or key == "lm_head.weight":
            return "decoder / LM head of a full T5 checkpoint, unused by the encoder"
        return None

    report = account_keys(shapes, target, rename, source=str(source.path), ignorable=ignorable)
    report.raise_if_bad()
    skipped = [k for k in report.ignored if k != TIED_KEY]
    if skipped:
        logger.info("%s: skipped %d decoder / LM head tensors of a full T5 checkpoint", source.path, len(skipped))

    state: dict[str, torch.Tensor] = {}
    tied_copy: torch.Tensor | None = None
    # Read on the CPU (memory-mapped) and move only what is used: a full T5's decoder never reaches the device.
    for key, tensor in iter_tensors(source):
        if key in report.used:
            ours = report.used[key]
            state[ours] = tensor.to(device=device, dtype=_tensor_dtype(ours, dtype))
        elif key == TIED_KEY:
            tied_copy = tensor.to(device=device, dtype=dtype)
    if tied_copy is not None and not torch.equal(tied_copy, state[SHARED_KEY]):
        raise StateDictMismatchError(
            f"{source.path}: {TIED_KEY} differs from {SHARED_KEY}; T5 ties them, so this checkpoint cannot be loaded"
        )

    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) != {TIED_KEY}:
        raise StateDictMismatchError(
            f"{source.path}: load left {result.missing_keys} missing, {result.unexpected_keys} unused"
        )
    # assign=True replaced shared.weight only; point the encoder's embedding at the same tensor again.
    model.encoder.embed_tokens.weight = model.shared.weight
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"T5EncoderModel: tensors left on the meta device after loading: {on_meta[:5]}")
    return model


def load_text_encoder(
    path: str | os.PathLike[str],
    *,
    tokenizer_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    max_length: int | None = None,
) -> CogTextEncoder:
    """Loads the T5 encoder and its tokenizer.

    ``path``: a ``text_encoder/`` folder (config.json + model.safetensors or a sharded index), one of
    its weight files, or a whole CogVideoX model folder. ``tokenizer_path``: the tokenizer folder
    (default: found beside the encoder, see :func:`~diffsynth_cog.loading.model_folder.resolve_model_folder`).
    ``dtype``: of the weights (None: as stored). ``max_length``: tokens per prompt (default: the
    ``max_text_seq_length`` of the transformer in the same model folder, else 226).
    """
    folder = resolve_model_folder(path, part="text_encoder", tokenizer=tokenizer_path)
    source = resolve_weights(folder.require("text_encoder"))
    where = _folder_of(source.path)
    if source.config is None:
        raise WeightsFileError(
            f"{where}: no config.json beside the text encoder weights (the T5 sizes are read from it)"
        )
    if not is_t5_checkpoint(source.config):
        raise ModelDetectionError(
            f"{source.config_path}: model_type {source.config.get('model_type')!r}, architectures "
            f"{source.config.get('architectures')}: not a T5 text encoder"
        )
    # Find the tokenizer before reading gigabytes of weights, so a missing one fails fast.
    tokenizer = load_tokenizer(folder.require("tokenizer"))
    vocab_size = int(source.config.get("vocab_size", 0))
    if len(tokenizer) > vocab_size:
        raise ModelDetectionError(
            f"the tokenizer has {len(tokenizer)} tokens but the text encoder in {where} only embeds {vocab_size}: "
            "they do not belong together"
        )
    if max_length is None:
        max_length = folder.max_text_seq_length
        if folder.dit_config is not None:
            logger.info("prompts: %d tokens, the max_text_seq_length of %s", max_length, folder.transformer)
    model = _load_t5(source, source.config, dtype, device)
    model.requires_grad_(False)
    logger.info("loaded the T5 text encoder from %s (%s, max_length %d)", source.path, dtype, max_length)
    return CogTextEncoder(model, tokenizer, max_length=max_length).eval()


def _folder_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent
