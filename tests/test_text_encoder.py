"""The T5 text encoder: parity with diffusers' CogVideoX prompt encoding, tokenization, loading, errors.

The reference side loads the same folder with transformers' own ``from_pretrained`` and encodes
through diffusers' ``CogVideoXPipeline.encode_prompt``; our side goes through ``load_text_encoder``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import CogVideoXPipeline
from safetensors.torch import load_file, save_file
from tiny_text import make_tiny_t5, make_tiny_text_folder, make_tiny_tokenizer, randomize_, tiny_t5_config
from transformers import AutoTokenizer, T5EncoderModel, T5ForConditionalGeneration, T5Tokenizer

from diffsynth_cog.errors import ModelDetectionError, StateDictMismatchError, WeightsFileError, shorten
from diffsynth_cog.loading.text_encoder_loader import is_t5_checkpoint, load_text_encoder
from diffsynth_cog.models.text_encoder import CogTextEncoder

PROMPTS = [
    "a panda playing guitar in a bamboo forest, golden light, the camera slowly moves",
    "",
    "A small red bird flying over the river at sunset!",
]
LONG_PROMPT = " ".join(["a beautiful old city street at night with golden light"] * 40)  # > 226 tokens

# Our encoder and the reference run the same transformers module on the same token ids with the same
# weights (read through different loaders), so the results must be bit-identical; 1e-6 relative
# (fp32 round-off) only allows for a different but equivalent kernel order.
RTOL = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def model_root(tmp_path_factory) -> Path:
    return make_tiny_text_folder(tmp_path_factory.mktemp("cogvideox"))


@pytest.fixture(scope="module")
def reference_pipe(model_root: Path) -> CogVideoXPipeline:
    tokenizer = T5Tokenizer.from_pretrained(model_root / "tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(model_root / "text_encoder").eval()
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None, scheduler=None)


@pytest.fixture(scope="module")
def ours(model_root: Path) -> CogTextEncoder:
    return load_text_encoder(model_root / "text_encoder")


def reference_embeds(pipe: CogVideoXPipeline, prompts, max_length: int = 226) -> torch.Tensor:
    with torch.no_grad():
        return pipe._get_t5_prompt_embeds(prompts, max_sequence_length=max_length, device="cpu", dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# Fixtures are what they claim to be


def test_tiny_tokenizer_is_a_t5_tokenizer(tmp_path) -> None:
    folder = make_tiny_tokenizer(tmp_path / "tokenizer", vocab_size=160)
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == 260  # 160 pieces + 100 sentinels
    assert tok.convert_tokens_to_ids("<extra_id_0>") == 259
    ids = tok("a cat playing piano").input_ids
    assert ids[-1] == 1 and 2 not in ids  # ends with </s>, no unknown pieces


# ----------------------------------------------------------------------------------------------------
# Parity with diffusers


@pytest.mark.parametrize("prompt", PROMPTS, ids=["sentence", "empty", "punctuation"])
def test_embeddings_match_diffusers_get_t5_prompt_embeds(ours, reference_pipe, prompt: str) -> None:
    emb = ours.encode(prompt)
    ref = reference_embeds(reference_pipe, prompt)
    assert emb.shape == ref.shape == (1, 226, 32)
    assert rel_err(emb, ref) < RTOL


def test_batch_and_negative_prompt_match_diffusers_encode_prompt(ours, reference_pipe) -> None:
    batch = [PROMPTS[0], PROMPTS[2]]
    with torch.no_grad():
        ref_pos, ref_neg = reference_pipe.encode_prompt(
            batch, negative_prompt=None, do_classifier_free_guidance=True, device="cpu", dtype=torch.float32
        )
    pos, neg = ours.encode(batch), ours.encode(["", ""])  # diffusers' default negative prompt is ""
    assert pos.shape == (2, 226, 32)
    assert rel_err(pos, ref_pos) < RTOL and rel_err(neg, ref_neg) < RTOL
    # A batch is the same as its prompts encoded one at a time.
    assert rel_err(pos[1:], ours.encode(batch[1])) < RTOL


def test_padding_tokens_take_part_in_attention(ours) -> None:
    """No attention mask: the embedding of a short prompt depends on the padding after it."""
    ids = ours.tokenize("a cat")
    n = int((ids != 0).sum())
    with torch.no_grad():
        full = ours(ids)
        short = ours(ids[:, :n])
    assert rel_err(full[:, :n], short) > 1e-3


def test_encode_casts_to_the_requested_dtype(ours) -> None:
    emb = ours.encode("a dog", device="cpu", dtype=torch.bfloat16)
    assert emb.dtype == torch.bfloat16 and emb.device.type == "cpu"


# ----------------------------------------------------------------------------------------------------
# Tokenization


def test_tokenization_is_exactly_max_length(ours) -> None:
    ids = ours.tokenize(PROMPTS)
    assert ids.shape == (3, 226) and ids.dtype == torch.int64
    assert ids[1, 0] == 1 and (ids[1, 1:] == 0).all()  # "" is </s> then padding


def test_configured_max_length_is_used_and_matches_diffusers(model_root, reference_pipe) -> None:
    enc = load_text_encoder(model_root / "text_encoder", max_length=40)
    assert enc.tokenize("a cat").shape == (1, 40)
    emb = enc.encode(PROMPTS[0])
    assert emb.shape == (1, 40, 32)
    assert rel_err(emb, reference_embeds(reference_pipe, PROMPTS[0], max_length=40)) < RTOL


def test_long_prompt_is_truncated_with_a_warning_naming_the_cut_text(ours, reference_pipe, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="diffsynth_cog.models.text_encoder"):
        ids = ours.tokenize(["a cat", LONG_PROMPT])
    assert ids.shape == (2, 226) and ids[1, -1] == 1  # the closing </s> is kept
    warnings = [r.getMessage() for r in caplog.records if r.name == "diffsynth_cog.models.text_encoder"]
    assert len(warnings) == 1 and "prompt 1 is" in warnings[0] and "max_length 226" in warnings[0]
    # The cut text is the end of the prompt: re-joining the kept and the cut text gives the prompt back. The
    # warning quotes its start (shortened: a long prompt does not fill the log with one line).
    full_ids = ours.tokenizer(LONG_PROMPT).input_ids
    cut = ours.tokenizer.decode(full_ids[225:-1])
    assert repr(shorten(cut)) in warnings[0] and LONG_PROMPT.endswith(cut.strip())
    # And the truncated prompt encodes as diffusers encodes it.
    assert rel_err(ours.encode(LONG_PROMPT), reference_embeds(reference_pipe, LONG_PROMPT)) < RTOL


def test_prompt_of_exactly_max_length_is_not_truncated(ours, caplog) -> None:
    words = ours.tokenizer.convert_ids_to_tokens(ours.tokenize(LONG_PROMPT)[0, :225].tolist())
    prompt = ours.tokenizer.convert_tokens_to_string(words)
    assert len(ours.tokenizer(prompt).input_ids) == 226
    caplog.clear()  # the long prompt above warned
    with caplog.at_level(logging.WARNING, logger="diffsynth_cog.models.text_encoder"):
        ours.tokenize(prompt)
    assert not [r for r in caplog.records if r.name == "diffsynth_cog.models.text_encoder"]


def test_bad_prompts_are_rejected(ours) -> None:
    with pytest.raises(ValueError, match="no prompt given"):
        ours.encode([])
    with pytest.raises(TypeError, match="prompts must be strings"):
        ours.encode(["ok", None])


# ----------------------------------------------------------------------------------------------------
# Loading layouts


def assert_same_weights(ours: CogTextEncoder, ref: T5EncoderModel) -> None:
    ref_state = ref.state_dict()
    for name, tensor in ours.model.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
    assert ours.model.encoder.embed_tokens.weight is ours.model.shared.weight  # still tied


def test_whole_model_folder_loads_like_the_text_encoder_folder(model_root) -> None:
    enc = load_text_encoder(model_root)
    assert_same_weights(enc, T5EncoderModel.from_pretrained(model_root / "text_encoder"))
    assert not any(p.requires_grad for p in enc.parameters())


def test_sharded_checkpoint_loads(tmp_path) -> None:
    root = make_tiny_text_folder(tmp_path, max_shard_size="20KB")
    assert len(list((root / "text_encoder").glob("model-*.safetensors"))) > 1
    enc = load_text_encoder(root / "text_encoder" / "model.safetensors.index.json")
    assert_same_weights(enc, T5EncoderModel.from_pretrained(root / "text_encoder"))


def test_checkpoint_storing_the_tied_embedding_twice_or_only_in_the_encoder(model_root, tmp_path) -> None:
    ref = T5EncoderModel.from_pretrained(model_root / "text_encoder")
    state = load_file(model_root / "text_encoder" / "model.safetensors")
    assert "encoder.embed_tokens.weight" not in state  # what save_pretrained writes
    for variant, tensors in {
        "both": {**state, "encoder.embed_tokens.weight": state["shared.weight"].clone()},
        "encoder_only": {
            **{k: v for k, v in state.items() if k != "shared.weight"},
            "encoder.embed_tokens.weight": state["shared.weight"],
        },
    }.items():
        folder = tmp_path / variant / "text_encoder"
        folder.mkdir(parents=True)
        shutil.copy(model_root / "text_encoder" / "config.json", folder)
        save_file(tensors, folder / "model.safetensors")
        enc = load_text_encoder(folder, tokenizer_path=model_root / "tokenizer")
        assert_same_weights(enc, ref)


def test_full_t5_checkpoint_loads_its_encoder_like_transformers(model_root, tmp_path) -> None:
    """A T5ForConditionalGeneration checkpoint: the decoder and LM head are skipped, as transformers does."""
    config = tiny_t5_config(T5EncoderModel.from_pretrained(model_root / "text_encoder").config.vocab_size)
    config.architectures = ["T5ForConditionalGeneration"]
    full = T5ForConditionalGeneration(config)
    randomize_(full, seed=3)
    full.save_pretrained(tmp_path / "t5")
    enc = load_text_encoder(tmp_path / "t5", tokenizer_path=model_root / "tokenizer")
    assert_same_weights(enc, T5EncoderModel.from_pretrained(tmp_path / "t5"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_dtypes_follow_transformers(model_root, dtype) -> None:
    """float16 keeps the feed-forward output projections (wo) in float32, as from_pretrained does."""
    enc = load_text_encoder(model_root, dtype=dtype)
    ref = T5EncoderModel.from_pretrained(model_root / "text_encoder", dtype=dtype)
    ref_dtypes = {n: p.dtype for n, p in ref.named_parameters()}
    assert {n: p.dtype for n, p in enc.model.named_parameters()} == ref_dtypes
    assert (torch.float32 in ref_dtypes.values()) == (dtype == torch.float16)
    # Same weights and module: identical outputs in the half dtype too.
    ids = enc.tokenize(PROMPTS[0])
    with torch.no_grad():
        assert torch.equal(enc(ids), ref(input_ids=ids).last_hidden_state)


def test_is_t5_checkpoint(model_root, tmp_path) -> None:
    config = json.loads((model_root / "text_encoder" / "config.json").read_text())
    assert is_t5_checkpoint(config)
    shapes = {k: tuple(v.shape) for k, v in load_file(model_root / "text_encoder" / "model.safetensors").items()}
    assert is_t5_checkpoint(shapes)
    assert not is_t5_checkpoint({"_class_name": "CogVideoXTransformer3DModel", "model_type": None})
    assert not is_t5_checkpoint({"architectures": ["CLIPTextModel"]})
    assert not is_t5_checkpoint({"transformer_blocks.0.attn1.to_q.weight": (64, 64)})


# ----------------------------------------------------------------------------------------------------
# Errors


def test_missing_tokenizer_names_where_it_looked(model_root, tmp_path) -> None:
    folder = tmp_path / "lonely" / "text_encoder"
    shutil.copytree(model_root / "text_encoder", folder)
    with pytest.raises(FileNotFoundError) as info:
        load_text_encoder(folder)
    message = str(info.value)
    assert str(tmp_path / "lonely" / "tokenizer") in message and "tokenizer_path" in message
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_text_encoder(model_root / "text_encoder", tokenizer_path=tmp_path / "nowhere")


def test_corrupt_weights_are_a_clear_error(model_root, tmp_path) -> None:
    folder = tmp_path / "text_encoder"
    shutil.copytree(model_root / "text_encoder", folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(WeightsFileError, match=r"model.safetensors: truncated safetensors file"):
        load_text_encoder(folder, tokenizer_path=model_root / "tokenizer")
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    with pytest.raises(WeightsFileError, match="corrupt safetensors header"):
        load_text_encoder(folder, tokenizer_path=model_root / "tokenizer")


def test_unknown_missing_or_mismatched_keys_are_named(model_root, tmp_path) -> None:
    state = load_file(model_root / "text_encoder" / "model.safetensors")
    cases = {
        "extra": ({**state, "encoder.adapter.weight": torch.zeros(3)}, "encoder.adapter.weight"),
        "missing": ({k: v for k, v in state.items() if "final_layer_norm" not in k}, "encoder.final_layer_norm.weight"),
        "untied": ({**state, "encoder.embed_tokens.weight": state["shared.weight"] + 1}, "differs from shared.weight"),
    }
    for name, (tensors, expected) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(model_root / "text_encoder" / "config.json", folder)
        save_file(tensors, folder / "model.safetensors")
        with pytest.raises(StateDictMismatchError, match=expected):
            load_text_encoder(folder, tokenizer_path=model_root / "tokenizer")


def test_wrong_config_is_a_clear_error(model_root, tmp_path) -> None:
    folder = tmp_path / "text_encoder"
    shutil.copytree(model_root / "text_encoder", folder)
    (folder / "config.json").unlink()
    with pytest.raises(WeightsFileError, match="no config.json beside the text encoder weights"):
        load_text_encoder(folder, tokenizer_path=model_root / "tokenizer")
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(ModelDetectionError, match="not a T5 text encoder"):
        load_text_encoder(folder, tokenizer_path=model_root / "tokenizer")


def test_tokenizer_larger_than_the_embedding_table_is_rejected(tmp_path) -> None:
    make_tiny_tokenizer(tmp_path / "tokenizer", vocab_size=160)
    make_tiny_t5(tmp_path / "text_encoder", vocab_size=200)  # 260 tokens, 200 rows
    with pytest.raises(ModelDetectionError, match="260 tokens but the text encoder .* only embeds 200"):
        load_text_encoder(tmp_path)
