"""Loading the CogVideoX transformer from diffusers-layout files (or our own saved keys).

``load_dit`` accepts a ``transformer/`` folder (config.json + safetensors, sharded or not), a
single weights file (config.json beside it if present; otherwise the architecture is inferred
from tensor names and shapes), and checks every key and shape.
"""

from __future__ import annotations

import logging
import os
import re

import torch

from diffsynth_cog.configs import DIT_PRESETS, DiTConfig
from diffsynth_cog.errors import ModelDetectionError
from diffsynth_cog.loading.build import build_and_load
from diffsynth_cog.loading.state_dict import WeightsSource, resolve_weights, tensor_shapes
from diffsynth_cog.models.dit import CogDiT

logger = logging.getLogger(__name__)

# diffusers name -> ours, for keys outside the blocks.
_TOP_LEVEL = {
    "patch_embed.proj.": "patch_embed.",
    "patch_embed.text_proj.": "text_proj.",
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "ofs_embedding.linear_1.": "ofs_embed.0.",  # CogVideoX 1.5 I2V
    "ofs_embedding.linear_2.": "ofs_embed.2.",
    "norm_final.": "norm_final.",
    "norm_out.linear.": "norm_out.linear.",
    "norm_out.norm.": "norm_out.norm.",
    "proj_out.": "proj_out.",
}
# diffusers name -> ours, inside transformer_blocks.N.
_IN_BLOCK = {
    "norm1.linear.": "norm1.linear.",
    "norm1.norm.": "norm1.norm.",
    "norm2.linear.": "norm2.linear.",
    "norm2.norm.": "norm2.norm.",
    "attn1.to_q.": "attn1.to_q.",
    "attn1.to_k.": "attn1.to_k.",
    "attn1.to_v.": "attn1.to_v.",
    "attn1.to_out.0.": "attn1.to_out.",
    "attn1.norm_q.": "attn1.norm_q.",
    "attn1.norm_k.": "attn1.norm_k.",
    "ff.net.0.proj.": "ff.0.",
    "ff.net.2.": "ff.2.",
}
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.*)$")
# DiffSynth-Studio 1.1.x CogDiT name -> ours, outside the blocks. Inside ``blocks.N`` its names are
# ours except the q/k norms, which it keeps on the block. (Names only: its patchify is a Conv3d.)
_DIFFSYNTH_TOP_LEVEL = {
    "patchify.proj.": "patch_embed.",
    "context_embedder.": "text_proj.",
    "time_embedder.timestep_embedder.0.": "time_embed.0.",
    "time_embedder.timestep_embedder.2.": "time_embed.2.",
}
_DIFFSYNTH_IN_BLOCK = {"norm_q.": "attn1.norm_q.", "norm_k.": "attn1.norm_k."}
_OUR_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
_OUR_KEY = re.compile(
    r"^(patch_embed|text_proj|pos_embedding|(time|ofs)_embed\.[02]|norm_final|norm_out\.(linear|norm)|proj_out"
    r"|blocks\.\d+\.(norm[12]\.(linear|norm)|attn1\.(to_[qkv]|to_out|norm_[qk])|ff\.[02]))(\.(weight|bias))?$"
)


def dit_rename(key: str) -> str | None:
    """diffusers transformer key (or one of ours, unchanged) -> our key; None if it is not a DiT key."""
    if key == "patch_embed.pos_embedding":
        return "pos_embedding"
    m = _BLOCK.match(key)
    if m:
        index, rest = m.groups()
        for theirs, ours in _IN_BLOCK.items():
            if rest.startswith(theirs):
                return f"blocks.{index}.{ours}{rest[len(theirs) :]}"
        return None
    for theirs, ours in _TOP_LEVEL.items():
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return key if _OUR_KEY.match(key) else None


def diffsynth_rename(key: str) -> str | None:
    """DiffSynth-Studio CogDiT key (or one of ours, unchanged) -> our key; None if it is not a DiT key.

    Works on parameter and module names alike (``context_embedder`` -> ``text_proj``)."""
    m = _OUR_BLOCK.match(key)
    if m:
        index, rest = m.groups()
        for theirs, ours in _DIFFSYNTH_IN_BLOCK.items():
            if (rest + ".").startswith(theirs):
                key = f"blocks.{index}.{ours}{rest[len(theirs) :]}".rstrip(".")
                break
    else:
        for theirs, ours in _DIFFSYNTH_TOP_LEVEL.items():
            if (key + ".").startswith(theirs):
                key = (ours + key[len(theirs) :]).rstrip(".")
                break
    return key if _OUR_KEY.match(key) else None


def dit_name_in(layout: str, key: str) -> str:
    """Our DiT key (a parameter or module name) -> the same in ``layout``: "diffusers" (the
    ``CogVideoXTransformer3DModel`` names) or "diffsynth" (DiffSynth-Studio's CogDiT). The inverse of
    ``dit_rename`` / ``diffsynth_rename``; raises ``KeyError`` for a name our DiT does not have."""
    if not _OUR_KEY.match(key) or (key == "pos_embedding" and layout == "diffsynth"):
        raise KeyError(f"{key!r} is not a CogVideoX DiT name (in {layout!r} naming)")
    if layout == "diffusers":
        if key == "pos_embedding":
            return "patch_embed.pos_embedding"
        top, in_block, block = _TOP_LEVEL, _IN_BLOCK, "transformer_blocks"
    elif layout == "diffsynth":
        top, in_block, block = _DIFFSYNTH_TOP_LEVEL, _DIFFSYNTH_IN_BLOCK, "blocks"
    else:
        raise ValueError(f"layout must be 'diffusers' or 'diffsynth', got {layout!r}")
    m = _OUR_BLOCK.match(key)
    if m:
        index, rest = m.groups()
        for theirs, ours in in_block.items():
            if (rest + ".").startswith(ours):
                return f"{block}.{index}.{theirs}{rest[len(ours) :]}".rstrip(".")
        return f"{block}.{index}.{rest}"
    for theirs, ours in top.items():
        if (key + ".").startswith(ours):
            return (theirs + key[len(ours) :]).rstrip(".")
    return key


def is_dit_checkpoint(shapes: dict[str, tuple[int, ...]]) -> bool:
    """True when the tensor names look like a CogVideoX transformer (either naming)."""
    names = {dit_rename(k) for k in shapes}
    return {"patch_embed.weight", "text_proj.weight", "proj_out.weight"} <= names and any(
        n is not None and n.startswith("blocks.0.attn1.to_q") for n in names
    )


def infer_dit_config(shapes: dict[str, tuple[int, ...]], source: str = "weights") -> DiTConfig:
    """The architecture from tensor shapes alone (for a weights file with no config.json beside it).

    Sizes come from the shapes. Which position scheme the model uses is not visible in the
    weights, except for the learned table (I2V): a model with no learned table is matched against
    the presets by its sizes, and an unknown size asks for a config.json.
    """
    ours = {dit_rename(k): v for k, v in shapes.items()}
    if len(ours.get("patch_embed.weight", ())) == 2:
        return _infer_temporal_patch_config(ours, source)
    try:
        dim, in_ch, p, _ = ours["patch_embed.weight"]
        _, text_dim = ours["text_proj.weight"]
        temb, _ = ours["time_embed.0.weight"]
        (head_dim,) = ours["blocks.0.attn1.norm_q.weight"]
        out_dim, _ = ours["proj_out.weight"]
    except (KeyError, ValueError) as e:
        raise ModelDetectionError(f"{source}: not a CogVideoX transformer (missing or misshapen {e})") from e
    num_layers = 1 + max(int(k.split(".")[1]) for k in ours if k and k.startswith("blocks."))
    sizes = dict(
        num_attention_heads=dim // head_dim,
        attention_head_dim=head_dim,
        in_channels=in_ch,
        out_channels=out_dim // (p * p),
        time_embed_dim=temb,
        text_embed_dim=text_dim,
        num_layers=num_layers,
        patch_size=p,
    )
    if "pos_embedding" in ours:
        # Learned [1, text + T*h*w, D] table: RoPE + learned (I2V). Its length fixes the base shape
        # only up to the frame/resolution split, so take the base grid from the matching preset.
        base = DIT_PRESETS["cogvideox-5b-i2v"]
        return DiTConfig(**{**base.to_dict(), **sizes})
    for name, preset in DIT_PRESETS.items():
        if preset.use_learned_positional_embeddings:
            continue
        if all(getattr(preset, k) == v for k, v in sizes.items()):
            logger.info("%s: no config.json; inferred preset %s from tensor shapes", source, name)
            return preset
    raise ModelDetectionError(
        f"{source}: a CogVideoX transformer of unknown size ({sizes}); put its config.json beside the weights"
    )


def _infer_temporal_patch_config(ours: dict[str | None, tuple[int, ...]], source: str) -> DiTConfig:
    """A Linear patch embedding (CogVideoX 1.5): its patch sizes cannot be told from one flattened shape, so the
    weights must match a 1.5 preset tensor for tensor (its ofs embedding tells I2V from T2V)."""
    for name, preset in DIT_PRESETS.items():
        if preset.patch_size_t is None:
            continue
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in CogDiT(preset).state_dict().items()}
        if expected == {k: tuple(v) for k, v in ours.items()}:
            logger.info("%s: no config.json; inferred preset %s from tensor shapes", source, name)
            return preset
    raise ModelDetectionError(
        f"{source}: a CogVideoX 1.5-style transformer (Linear patch embedding) that matches no 1.5 preset; put its "
        "config.json beside the weights"
    )


def load_dit(
    path: str | os.PathLike[str] | WeightsSource,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    config: DiTConfig | None = None,
) -> CogDiT:
    """Loads a CogDiT from a folder, a single file or a shard index (see module docstring)."""
    source = path if isinstance(path, WeightsSource) else resolve_weights(path)
    if config is None:
        if source.config is not None:
            config = DiTConfig.from_dict(source.config, source=str(source.config_path))
        else:
            config = infer_dit_config(tensor_shapes(source), source=str(source.path))
    return build_and_load(lambda: CogDiT(config), source, dit_rename, dtype=dtype, device=device)
