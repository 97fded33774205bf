"""Tiny T5 text-encoder fixtures in the real CogVideoX layout, built in well under a second.

* :func:`make_tiny_tokenizer` trains a small sentencepiece unigram model (T5's special ids: <pad> 0,
  </s> 1, <unk> 2, no <s>) and writes a T5 tokenizer folder like ``CogVideoX-5b/tokenizer``.
* :func:`make_tiny_t5` writes a small random ``T5EncoderModel`` with transformers' own
  ``save_pretrained`` (config.json + model.safetensors, or shards), like ``CogVideoX-5b/text_encoder``.
* :func:`make_tiny_text_folder` makes both under one root, as in a downloaded model folder.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import T5Config, T5EncoderModel

EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0..99>, appended after the sentencepiece vocabulary
MAX_LENGTH = 226

# Plain words so that test prompts tokenize into real pieces, plus made-up words for variety.
_WORDS = (
    "a the of in on and with at over under into video cat dog bird panda guitar piano playing sitting "
    "running flying walking garden forest river city street night sunset sunrise light red blue green "
    "golden small large old young beautiful camera slowly moves close up shot wide view scene water sky"
).split()
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pa", "den", "gar", "bel", "ox", "um", "is", "at")
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'-"


def _training_sentences(seed: int) -> list[str]:
    rng = random.Random(seed)
    invented = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    vocabulary = list(_WORDS) + invented
    sentences = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 14))) for _ in range(400)]
    # Every character at least once, so the model has a piece for it and nothing maps to <unk>.
    sentences.append(" ".join(_CHARS))
    return sentences


def make_tiny_tokenizer(directory: str | Path, *, vocab_size: int = 160, seed: int = 0) -> Path:
    """Trains a ``vocab_size``-piece unigram model and saves a T5 tokenizer folder into ``directory``.

    The tokenizer's length is ``vocab_size + 100`` (T5's sentinel tokens), as for the real T5
    (32000 + 100). Loadable with transformers' ``T5Tokenizer`` / ``AutoTokenizer``.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_sentences(seed)),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    (out / "spiece.model").write_bytes(model.getvalue())
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": extra}
    tokenizer_config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": MAX_LENGTH,
        "extra_ids": EXTRA_IDS,
        "legacy": True,
        "clean_up_tokenization_spaces": True,
        "sp_model_kwargs": {},
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    # As in the real folder: sentinels numbered down from the top of the vocabulary.
    added = {f"<extra_id_{i}>": vocab_size + EXTRA_IDS - 1 - i for i in range(EXTRA_IDS)}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2))
    return out


def tiny_t5_config(
    vocab_size: int, *, d_model: int = 32, d_ff: int = 48, num_layers: int = 2, num_heads: int = 4, d_kv: int = 8
) -> T5Config:
    """T5-v1.1 in miniature: gated-GELU feed-forward, untied LM head, relative position buckets."""
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        # Few buckets and a short max distance, so a 226-token prompt reaches the logarithmic buckets.
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        architectures=["T5EncoderModel"],
    )


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrites every parameter from a seeded generator (norm gains around 1, weights ~ 1/sqrt(fan_in))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "relative_attention_bias" in name or name.endswith(("shared.weight", "embed_tokens.weight")):
                p.copy_(noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)


def make_tiny_t5(
    directory: str | Path,
    vocab_size: int,
    *,
    d_model: int = 32,
    d_ff: int = 48,
    num_layers: int = 2,
    num_heads: int = 4,
    d_kv: int = 8,
    seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """Saves a random T5 encoder into ``directory`` with transformers' ``save_pretrained``.

    ``max_shard_size`` (e.g. "20KB") writes a sharded checkpoint with an index, like the real one.
    """
    out = Path(directory)
    model = T5EncoderModel(
        tiny_t5_config(vocab_size, d_model=d_model, d_ff=d_ff, num_layers=num_layers, num_heads=num_heads, d_kv=d_kv)
    )
    randomize_(model, seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    return out


def make_tiny_text_folder(root: str | Path, *, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """``root/tokenizer`` and ``root/text_encoder`` as in a CogVideoX model folder; returns ``root``.

    The embedding table is the tokenizer's length rounded up to a multiple of 8 (T5: 32100 -> 32128).
    """
    root = Path(root)
    vocab_size = 160
    make_tiny_tokenizer(root / "tokenizer", vocab_size=vocab_size, seed=seed)
    embed_rows = -(-(vocab_size + EXTRA_IDS) // 8) * 8
    make_tiny_t5(root / "text_encoder", embed_rows, seed=seed, max_shard_size=max_shard_size)
    return root
