"""Loading the CogVideoX VAE from diffusers-format weights.

Accepts a ``vae/`` folder (config.json + weights), a single ``.safetensors`` file with or
without a config.json beside it (DiffSynth-Studio's example loads
``vae/diffusion_pytorch_model.safetensors`` alone), or a sharded checkpoint. With no
config.json the architecture is inferred from tensor names and shapes.

Key mapping (diffusers -> ours) is almost the identity; the differences are single-element
ModuleLists we do not keep and the spatial norms' pointwise convs, which are plain Conv3d here:

    *.downsamplers.0.*         -> *.downsample.*
    *.upsamplers.0.*           -> *.upsample.*
    *.conv_y.conv.* / *.conv_b.conv.* -> *.conv_y.* / *.conv_b.*
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence

import torch

from diffsynth_cog.configs import DEFAULT_VAE_SCALING_FACTOR, VAE_SCALING_FACTORS, VAEConfig
from diffsynth_cog.errors import ModelDetectionError, StateDictMismatchError
from diffsynth_cog.loading.build import build_and_load
from diffsynth_cog.loading.convert import ConversionReport, account_keys, model_shapes
from diffsynth_cog.loading.state_dict import WeightsSource, resolve_weights, tensor_shapes
from diffsynth_cog.models.vae import CogVAE, CogVAEDecoder, CogVAEEncoder

logger = logging.getLogger(__name__)

DIFFUSERS_CLASS_NAME = "AutoencoderKLCogVideoX"
PARTS = ("encoder", "decoder")

_RENAMES = (
    (".downsamplers.0.", ".downsample."),
    (".upsamplers.0.", ".upsample."),
    (".conv_y.conv.", ".conv_y."),
    (".conv_b.conv.", ".conv_b."),
)


def vae_rename(key: str) -> str | None:
    """diffusers ``AutoencoderKLCogVideoX`` key -> our ``CogVAE`` key (None: not a VAE key)."""
    if not key.startswith(("encoder.", "decoder.")):
        return None
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def _part_rename(part: str) -> Callable[[str], str | None]:
    """Rename onto a standalone encoder or decoder (the ``part.`` prefix dropped)."""
    prefix = part + "."

    def rename(key: str) -> str | None:
        ours = vae_rename(key)
        return ours[len(prefix) :] if ours is not None and ours.startswith(prefix) else None

    return rename


def _ignore_parts(wanted: Sequence[str]) -> Callable[[str], str | None]:
    skipped = tuple(p for p in PARTS if p not in wanted)

    def ignorable(key: str) -> str | None:
        for part in skipped:
            if key.startswith(part + "."):
                return f"{part} weights not requested (parts={tuple(wanted)})"
        return None

    return ignorable


def _block_indices(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    if found != set(range(len(found))):
        raise StateDictMismatchError(f"{prefix}* indices are not contiguous: {sorted(found)}")
    return sorted(found)


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, source: str) -> tuple[int, ...]:
    try:
        return tuple(shapes[key])
    except KeyError:
        raise StateDictMismatchError(f"{source}: key {key!r} is missing; cannot infer the VAE architecture") from None


def is_vae_checkpoint(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """True when the keys and shapes look like a CogVideoX VAE (encoder, decoder or both)."""
    enc = shapes.get("encoder.conv_in.conv.weight")
    dec = shapes.get("decoder.conv_in.conv.weight")
    enc_ok = enc is not None and len(enc) == 5 and "encoder.conv_out.conv.weight" in shapes
    dec_ok = dec is not None and len(dec) == 5 and "decoder.norm_out.conv_y.conv.weight" in shapes
    return enc_ok or dec_ok


def infer_vae_config(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    scaling_factor: float = DEFAULT_VAE_SCALING_FACTOR,
    norm_num_groups: int = 32,
    temporal_compression_ratio: int = 4,
    source: str = "weights",
) -> VAEConfig:
    """The VAE architecture from tensor names and shapes alone.

    Inferred: in/out/latent channels, block_out_channels, layers_per_block (from the encoder,
    the decoder, or both, which must then agree). Not visible in the weights, so taken from the
    arguments (CogVideoX values by default): ``scaling_factor``, ``norm_num_groups`` (GroupNorm
    parameters have one entry per channel whatever the grouping), ``temporal_compression_ratio``
    (time pooling has no weights), and norm eps / sample size (config defaults).
    """
    if not is_vae_checkpoint(shapes):
        sample = ", ".join(sorted(shapes)[:5])
        raise ModelDetectionError(
            f"{source}: not a CogVideoX VAE checkpoint (no 'encoder.conv_in.conv.weight' / "
            f"'decoder.conv_in.conv.weight' with their output layers); first keys found: {sample or 'none'}"
        )
    has_enc = "encoder.conv_in.conv.weight" in shapes
    has_dec = "decoder.conv_in.conv.weight" in shapes
    found: dict[str, dict[str, object]] = {}
    if has_enc:
        found["encoder"] = _encoder_values(shapes, source)
    if has_dec:
        found["decoder"] = _decoder_values(shapes, source)
    if has_enc and has_dec:
        _check_halves_agree(found["encoder"], found["decoder"], source)
    values: dict[str, object] = {**found.get("decoder", {}), **found.get("encoder", {})}
    # A file holding one half cannot show the other half's pixel channels; RGB is the only case.
    values.setdefault("in_channels", values.get("out_channels", 3))
    values.setdefault("out_channels", values["in_channels"])
    channels = values["block_out_channels"]
    assert isinstance(channels, tuple)
    if any(c % norm_num_groups for c in channels):
        raise ValueError(
            f"{source}: norm_num_groups={norm_num_groups} does not divide block_out_channels {channels}; the group "
            "count is not stored in the weights, pass the right norm_num_groups (or a config.json)"
        )
    n = len(channels)
    config = VAEConfig(
        **values,  # type: ignore[arg-type]
        norm_num_groups=norm_num_groups,
        temporal_compression_ratio=temporal_compression_ratio,
        scaling_factor=scaling_factor,
        down_block_types=("CogVideoXDownBlock3D",) * n,
        up_block_types=("CogVideoXUpBlock3D",) * n,
    )
    logger.info(
        "%s: inferred VAE config from shapes: block_out_channels=%s layers_per_block=%d latent_channels=%d "
        "(assumed: norm_num_groups=%d temporal_compression_ratio=%d scaling_factor=%s)",
        source,
        config.block_out_channels,
        config.layers_per_block,
        config.latent_channels,
        norm_num_groups,
        temporal_compression_ratio,
        scaling_factor,
    )
    return config


def _encoder_values(shapes: Mapping[str, tuple[int, ...]], source: str) -> dict[str, object]:
    """The VAEConfig fields the encoder's weights show."""
    blocks = _block_indices(shapes, "encoder.down_blocks.")
    channels = tuple(_shape(shapes, f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight", source)[0] for i in blocks)
    return dict(
        in_channels=_shape(shapes, "encoder.conv_in.conv.weight", source)[1],
        latent_channels=_shape(shapes, "encoder.conv_out.conv.weight", source)[0] // 2,
        block_out_channels=channels,
        layers_per_block=len(_block_indices(shapes, "encoder.down_blocks.0.resnets.")),
    )


def _decoder_values(shapes: Mapping[str, tuple[int, ...]], source: str) -> dict[str, object]:
    """The VAEConfig fields the decoder's weights show."""
    blocks = _block_indices(shapes, "decoder.up_blocks.")
    channels = tuple(
        _shape(shapes, f"decoder.up_blocks.{i}.resnets.0.conv1.conv.weight", source)[0] for i in reversed(blocks)
    )
    return dict(
        out_channels=_shape(shapes, "decoder.conv_out.conv.weight", source)[0],
        latent_channels=_shape(shapes, "decoder.conv_in.conv.weight", source)[1],
        block_out_channels=channels,
        layers_per_block=len(_block_indices(shapes, "decoder.up_blocks.0.resnets.")) - 1,
    )


def _check_halves_agree(encoder: Mapping[str, object], decoder: Mapping[str, object], source: str) -> None:
    """Raises StateDictMismatchError where the encoder and the decoder tell different architectures."""
    for name in ("latent_channels", "block_out_channels", "layers_per_block"):
        if encoder[name] != decoder[name]:
            raise StateDictMismatchError(
                f"{source}: encoder and decoder disagree on {name}: {encoder[name]} vs {decoder[name]}"
            )


def vae_config_for(source: WeightsSource, *, scaling_factor: float | None = None) -> VAEConfig:
    """The config of the weights in ``source``: its config.json when present, else inferred.

    ``scaling_factor`` overrides the file's value; the value used is logged either way.
    """
    if source.config is not None:
        class_name = source.config.get("_class_name")
        if class_name is not None and class_name != DIFFUSERS_CLASS_NAME:
            raise ModelDetectionError(
                f"{source.config_path}: describes a {class_name}, not a CogVideoX VAE ({DIFFUSERS_CLASS_NAME})"
            )
        config = VAEConfig.from_dict(source.config, source=str(source.config_path))
        if scaling_factor is not None and scaling_factor != config.scaling_factor:
            config = dataclasses.replace(config, scaling_factor=scaling_factor)
            logger.info(
                "VAE scaling_factor=%s (given; config.json says %s)",
                scaling_factor,
                source.config.get("scaling_factor"),
            )
        else:
            logger.info("VAE scaling_factor=%s (from %s)", config.scaling_factor, source.config_path)
        return config
    if scaling_factor is None:
        logger.warning(
            "%s: no config.json beside the VAE weights; the latent scaling_factor cannot be read from weights, "
            "using %s (CogVideoX-5B/5B-I2V). Pass scaling_factor=%s for CogVideoX-2B.",
            source.path,
            DEFAULT_VAE_SCALING_FACTOR,
            VAE_SCALING_FACTORS["cogvideox-2b"],
        )
        scaling_factor = DEFAULT_VAE_SCALING_FACTOR
    else:
        logger.info("VAE scaling_factor=%s (given)", scaling_factor)
    return infer_vae_config(tensor_shapes(source), scaling_factor=scaling_factor, source=str(source.path))


def _check_parts(parts: Sequence[str]) -> tuple[str, ...]:
    parts = tuple(parts)
    if not parts or any(p not in PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {parts}")
    return parts


def plan_vae_load(
    path: str | os.PathLike[str], *, parts: Sequence[str] = PARTS, scaling_factor: float | None = None
) -> ConversionReport:
    """What loading would do with every key, from file headers only (no tensor data read)."""
    parts = _check_parts(parts)
    source = resolve_weights(path)
    config = vae_config_for(source, scaling_factor=scaling_factor)
    with torch.device("meta"):
        model = CogVAE(config, parts=parts)
    return account_keys(
        tensor_shapes(source), model_shapes(model), vae_rename, source=str(source.path), ignorable=_ignore_parts(parts)
    )


def load_vae(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    parts: Sequence[str] = PARTS,
    scaling_factor: float | None = None,
) -> CogVAE:
    """Loads a :class:`CogVAE` from a folder, a single weights file or a shard index.

    With ``parts=("decoder",)`` the encoder's keys are accounted as ignored and ``.encoder``
    is None (likewise for the encoder alone). Raises WeightsFileError for unreadable files,
    ModelDetectionError for weights of another model, StateDictMismatchError for keys or
    shapes that do not fit.
    """
    parts = _check_parts(parts)
    source = resolve_weights(path)
    config = vae_config_for(source, scaling_factor=scaling_factor)
    model = build_and_load(
        lambda: CogVAE(config, parts=parts),
        source,
        vae_rename,
        dtype=dtype,
        device=device,
        ignorable=_ignore_parts(parts),
    )
    assert isinstance(model, CogVAE)
    return model


def _load_part(
    part: str,
    make: Callable[[VAEConfig], torch.nn.Module],
    path: str | os.PathLike[str],
    dtype: torch.dtype,
    device: str | torch.device,
    scaling_factor: float | None,
) -> torch.nn.Module:
    source = resolve_weights(path)
    config = vae_config_for(source, scaling_factor=scaling_factor)
    return build_and_load(
        lambda: make(config),
        source,
        _part_rename(part),
        dtype=dtype,
        device=device,
        ignorable=_ignore_parts((part,)),
    )


def load_vae_encoder(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    scaling_factor: float | None = None,
) -> CogVAEEncoder:
    """Only the encoder (its ``.config`` attached); decoder keys are accounted as ignored."""
    model = _load_part("encoder", CogVAEEncoder, path, dtype, device, scaling_factor)
    assert isinstance(model, CogVAEEncoder)
    return model


def load_vae_decoder(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    scaling_factor: float | None = None,
) -> CogVAEDecoder:
    """Only the decoder (its ``.config`` attached); encoder keys are accounted as ignored."""
    model = _load_part("decoder", CogVAEDecoder, path, dtype, device, scaling_factor)
    assert isinstance(model, CogVAEDecoder)
    return model
