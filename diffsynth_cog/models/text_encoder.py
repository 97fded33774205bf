"""The T5 text encoder of CogVideoX: transformers' ``T5EncoderModel`` plus its tokenizer.

CogVideoX conditions on the T5-v1.1-XXL encoder's last hidden states for a prompt tokenized to
exactly ``max_length`` (226) tokens: padded with ``<pad>`` to that length, truncated (keeping the
final ``</s>``) when longer. The encoder runs WITHOUT an attention mask, so the padding tokens take
part in attention and their hidden states are part of the conditioning, as in training.

Loading (weights without pickle, tokenizer, prompt length from the model folder) lives in
:mod:`diffsynth_cog.loading.text_encoder_loader`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import T5EncoderModel

from diffsynth_cog.configs import DEFAULT_MAX_LENGTH
from diffsynth_cog.errors import shorten

logger = logging.getLogger(__name__)


class CogTextEncoder(nn.Module):
    """Prompt(s) -> T5 hidden states [B, max_length, d_model].

    ``model`` is a transformers ``T5EncoderModel``; ``tokenizer`` a T5 tokenizer. The weights are
    frozen (CogVideoX never trains the text encoder).
    """

    def __init__(self, model: T5EncoderModel, tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (one token and </s>), got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def d_model(self) -> int:
        return int(self.model.config.d_model)

    def tokenize(self, prompts: str | Sequence[str], names: Sequence[str] | None = None) -> torch.Tensor:
        """Token ids [B, max_length] (LongTensor, CPU): right-padded with <pad>, truncated to fit.

        A prompt longer than ``max_length`` tokens loses its end (the final </s> is kept); a warning
        names the prompt (``names[i]``, e.g. "metadata.json record 3"; default "prompt i") and the text that was cut.
        """
        batch = _as_batch(prompts)
        ids = self.tokenizer(
            batch,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        full = self.tokenizer(batch, add_special_tokens=True).input_ids
        for i, seq in enumerate(full):
            if len(seq) > self.max_length:
                # Truncation keeps max_length - 1 tokens and the closing </s> (the last id of seq).
                removed = self.tokenizer.decode(seq[self.max_length - 1 : -1])
                logger.warning(
                    "%s is %d tokens long, more than max_length %d; this part was cut off: %r",
                    names[i] if names is not None else f"prompt {i}",
                    len(seq),
                    self.max_length,
                    shorten(removed),
                )
        return ids

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> last hidden states [B, L, d_model], no attention mask (padding attends)."""
        return self.model(input_ids=input_ids).last_hidden_state  # [B, L, d_model]

    @torch.no_grad()
    def encode(
        self,
        prompts: str | Sequence[str],
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Embeddings [B, max_length, d_model] of one prompt or a list of them.

        ``device``: where the token ids are placed and the result returned (default: the device of
        the weights; with layer-wise offloading pass the compute device). ``dtype``: the result's
        dtype (default: the encoder's output dtype). ``names``: how a too-long prompt's warning names each.
        """
        if device is None:
            device = self.model.shared.weight.device
        ids = self.tokenize(prompts, names).to(device)  # [B, L]
        emb = self(ids)  # [B, L, d_model]
        return emb.to(device=device, dtype=dtype or emb.dtype)


def _as_batch(prompts: str | Sequence[str]) -> list[str]:
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    if not batch:
        raise ValueError("no prompt given (an empty list)")
    bad = [type(p).__name__ for p in batch if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, found {bad}")
    return batch
