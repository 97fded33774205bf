"""Model configurations as frozen dataclasses, with named presets.

Every size-specific number of the CogVideoX family lives here and nowhere else: the model
code reads it from a config. A config is validated once, when it is built, so a bad value
fails before any weight is allocated.

Presets: ``cogvideox-2b``, ``cogvideox-5b``, ``cogvideox-5b-i2v`` (DiT) and
``cogvideox-2b`` / ``cogvideox-5b`` / ``cogvideox-5b-i2v`` (VAE: the same architecture,
with a different latent scaling factor for 2B).

Also the home of the family rules (:func:`dit_family`: no RoPE means 2B; the VAE scaling factor
of each family) and of the input checks every entry point shares (:func:`check_num_frames`,
:func:`check_size`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from diffsynth_cog.families import FAMILIES as FAMILY_TABLE
from diffsynth_cog.families import FAMILY_NAMES, Family, family_of
from diffsynth_cog.validators import config_from_dict
from diffsynth_cog.validators import is_int as _is_int
from diffsynth_cog.validators import is_number as _is_number

# -- family constants ---------------------------------------------------------------------------------

# -- family constants ---------------------------------------------------------------------------------
# The numbers themselves live in ``families`` (one description per family); these names are views of them.

FAMILIES = FAMILY_NAMES
_V10 = FAMILY_TABLE["cogvideox-5b"]
# T5 tokens per prompt: DiTConfig.max_text_seq_length of every CogVideoX model.
DEFAULT_MAX_LENGTH = _V10.text_length
# The latent scale is a statistic of the training latents, not a weight: it cannot be read from
# VAE weights, only from a config.json or from the family of the transformer it belongs to.
VAE_SCALING_FACTORS: dict[str, float] = {name: f.vae_scaling_factor for name, f in FAMILY_TABLE.items()}
DEFAULT_VAE_SCALING_FACTOR = VAE_SCALING_FACTORS["cogvideox-5b"]
# Pixel frames per latent frame of the causal VAE (after the first frame, which is encoded alone).
TEMPORAL_COMPRESSION = _V10.vae_temporal
# Latent frames the VAE decodes per temporal chunk: the released checkpoints were trained on two-latent-frame
# windows (models/vae.py). After the first latent frame they decode in pairs, so only an even number of latent
# frames after the first decodes to exactly the frames encoded.
VAE_LATENT_FRAMES_PER_CHUNK = _V10.vae_latent_frames_per_chunk
# Valid frame counts are FRAME_MULTIPLE * k + 1 (49, 57, ..., 129).
FRAME_MULTIPLE = _V10.frame_multiple
# Pixel sides: the VAE's 8x spatial compression times the DiT's 2x2 patches.
SIZE_MULTIPLE = _V10.size_multiple
# How the Ulysses all-to-all moves q/k/v (parallel/peer.py): here, torch-free, so the command line's parser
# offers them without importing torch.
ULYSSES_TRANSPORTS = ("auto", "nccl", "p2p")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class DiTConfig:
    """CogVideoX transformer (CogVideoX 1.0: 2B, 5B, 5B-I2V; CogVideoX 1.5: 5B, 5B-I2V).

    Field names follow diffusers' ``CogVideoXTransformer3DModel`` config.json so a config file
    maps onto this class one to one. CogVideoX 1.5 sets ``patch_size_t`` (latent frames per temporal
    patch; its patch embedding is then a Linear over (t, h, w) patches, with a bias whatever ``patch_bias``
    says, as in the reference) and, for I2V, ``ofs_embed_dim`` (an ``ofs`` embedding added to the time
    embedding).
    """

    num_attention_heads: int = 48
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    time_embed_dim: int = 512
    text_embed_dim: int = 4096
    num_layers: int = 42
    patch_size: int = 2
    patch_size_t: int | None = None  # CogVideoX 1.5: 2; None: every latent frame is patchified alone
    patch_bias: bool = True
    ofs_embed_dim: int | None = None  # CogVideoX 1.5 I2V: 512
    # Pixel-space frame count of the training clips (49 -> 13 latent frames). diffusers keeps
    # this in pixel space for backwards compatibility; we do the same so config.json loads as is.
    sample_frames: int = 49
    sample_height: int = 60  # latent rows of the base grid (480 px / 8)
    sample_width: int = 90  # latent columns of the base grid (720 px / 8)
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = DEFAULT_MAX_LENGTH
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = True
    use_learned_positional_embeddings: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    attention_bias: bool = True
    norm_eps: float = 1e-5
    norm_elementwise_affine: bool = True
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        _check(self.num_attention_heads > 0 and self.attention_head_dim > 0, "heads and head dim must be positive")
        _check(self.num_layers > 0, f"num_layers must be positive, got {self.num_layers}")
        _check(self.patch_size > 0, f"patch_size must be positive, got {self.patch_size}")
        _check(
            self.sample_height % self.patch_size == 0 and self.sample_width % self.patch_size == 0,
            f"sample_height/sample_width ({self.sample_height}x{self.sample_width}) must be multiples of "
            f"patch_size {self.patch_size}",
        )
        _check(
            (self.sample_frames - 1) % self.temporal_compression_ratio == 0,
            f"sample_frames {self.sample_frames} must be k*{self.temporal_compression_ratio}+1",
        )
        if self.patch_size_t is not None:
            _check(self.patch_size_t >= 1, f"patch_size_t must be positive (or null), got {self.patch_size_t}")
            _check(
                self.use_rotary_positional_embeddings and not self.use_learned_positional_embeddings,
                "patch_size_t (CogVideoX 1.5) needs RoPE positions without a learned table "
                "(use_rotary_positional_embeddings=true, use_learned_positional_embeddings=false)",
            )
        else:
            _check(self.patch_bias, "patch_bias=False is only supported with patch_size_t (CogVideoX 1.5)")
        if self.ofs_embed_dim:
            _check(
                self.ofs_embed_dim == self.time_embed_dim,
                f"ofs_embed_dim {self.ofs_embed_dim} must equal time_embed_dim {self.time_embed_dim} "
                "(the ofs embedding is added to the time embedding)",
            )
        _check(self.activation_fn == "gelu-approximate", f"activation_fn {self.activation_fn!r} is not supported")
        _check(
            self.timestep_activation_fn == "silu", f"timestep_activation_fn {self.timestep_activation_fn!r} unsupported"
        )
        _check(self.norm_elementwise_affine, "norm_elementwise_affine=False is not supported")
        _check(
            self.use_rotary_positional_embeddings or not self.use_learned_positional_embeddings,
            "learned positional embeddings without RoPE do not exist in the CogVideoX family",
        )
        if self.use_rotary_positional_embeddings:
            # RoPE splits the head dim t:h:w = 1/4 : 3/8 : 3/8, each part made of (cos, sin) pairs.
            _check(
                self.attention_head_dim % 16 == 0,
                f"attention_head_dim {self.attention_head_dim} must be a multiple of 16 for 3D RoPE",
            )
        if not self.use_rotary_positional_embeddings or self.use_learned_positional_embeddings:
            _check(self.inner_dim % 16 == 0, f"inner dim {self.inner_dim} must be a multiple of 16 for 3D sin-cos")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def sample_latent_frames(self) -> int:
        """Latent frames of the base clip (13 for 49 pixel frames)."""
        return (self.sample_frames - 1) // self.temporal_compression_ratio + 1

    @property
    def temporal_patch(self) -> int:
        """Latent frames per temporal patch (1 for CogVideoX 1.0)."""
        return self.patch_size_t or 1

    @property
    def patch_in_dim(self) -> int:
        """Input features of one patch: in_channels x temporal_patch x patch_size^2."""
        return self.in_channels * self.temporal_patch * self.patch_size * self.patch_size

    @property
    def patch_out_dim(self) -> int:
        return self.temporal_patch * self.patch_size * self.patch_size * self.out_channels

    @property
    def family(self) -> Family:
        """The released family this transformer belongs to (``families.family_of``)."""
        return family_of(self)

    @property
    def uses_sincos_positions(self) -> bool:
        """2B adds a fixed 3D sin-cos table; I2V adds a learned one (sin-cos off its base shape)."""
        return not self.use_rotary_positional_embeddings or self.use_learned_positional_embeddings

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> DiTConfig:
        try:
            return config_from_dict(cls, values, source=source, ignored=frozenset({"dropout"}))
        except ValueError as e:
            if str(e).startswith(source):
                raise
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class VAEConfig:
    """CogVideoX 3D causal VAE (diffusers ``AutoencoderKLCogVideoX`` field names)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    layers_per_block: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    act_fn: str = "silu"
    temporal_compression_ratio: int = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = DEFAULT_VAE_SCALING_FACTOR
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False
    down_block_types: tuple[str, ...] = field(default=("CogVideoXDownBlock3D",) * 4)
    up_block_types: tuple[str, ...] = field(default=("CogVideoXUpBlock3D",) * 4)

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        _check(n >= 1, "block_out_channels must not be empty")
        _check(
            all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
            f"every block_out_channels {self.block_out_channels} must be divisible by norm_num_groups "
            f"{self.norm_num_groups}",
        )
        _check(self.act_fn == "silu", f"act_fn {self.act_fn!r} is not supported")
        _check(not self.use_quant_conv and not self.use_post_quant_conv, "quant convs are not used by CogVideoX")
        _check(
            self.down_block_types == ("CogVideoXDownBlock3D",) * n
            and self.up_block_types == ("CogVideoXUpBlock3D",) * n,
            "only CogVideoXDownBlock3D / CogVideoXUpBlock3D blocks exist in the CogVideoX VAE",
        )
        _check(self.temporal_compression_ratio in (1, 2, 4, 8), "temporal_compression_ratio must be a power of 2")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> VAEConfig:
        return config_from_dict(
            cls,
            values,
            source=source,
            ignored=frozenset({"shift_factor", "latents_mean", "latents_std", "force_upcast", "dropout"}),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_DIT_15 = dict(
    patch_size_t=2,
    patch_bias=False,
    sample_frames=81,
    sample_height=300,
    sample_width=300,
)
DIT_PRESETS: dict[str, DiTConfig] = {
    "cogvideox-2b": DiTConfig(
        num_attention_heads=30,
        num_layers=30,
        use_rotary_positional_embeddings=False,
    ),
    "cogvideox-5b": DiTConfig(),
    "cogvideox-5b-i2v": DiTConfig(in_channels=32, use_learned_positional_embeddings=True),
    # REFERENCE.md section 9: the released transformer configs of CogVideoX 1.5.
    "cogvideox1.5-5b": DiTConfig(**_DIT_15),
    "cogvideox1.5-5b-i2v": DiTConfig(in_channels=32, ofs_embed_dim=512, **_DIT_15),
}

VAE_PRESETS: dict[str, VAEConfig] = {
    name: VAEConfig(scaling_factor=f.vae_scaling_factor, invert_scale_latents=f.invert_scale_latents)
    for name, f in FAMILY_TABLE.items()
}


def _named(table: dict[str, Any], name: str, what: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; valid: {sorted(table)}") from None


def dit_preset(name: str) -> DiTConfig:
    return _named(DIT_PRESETS, name, "DiT preset")


def dit_preset_name(config: DiTConfig) -> str | None:
    """The preset this config is (all fields equal), or None for any other transformer."""
    return next((name for name, preset in DIT_PRESETS.items() if preset == config), None)


# Settings published for one model (weights) of a family apply to its released transformer only (the preset
# of the family's name): other transformers have none, and callers ask for explicit values instead of
# borrowing another model's calibration.
PUBLISHED_RIFLEX: dict[str, tuple[int, int]] = {n: f.riflex for n, f in FAMILY_TABLE.items() if f.riflex}
TEACACHE_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    n: f.teacache.coefficients for n, f in FAMILY_TABLE.items() if f.teacache is not None
}


def published_riflex(config: DiTConfig) -> tuple[int, int] | None:
    """RIFLEx (k, N_k) published for this transformer, or None."""
    return PUBLISHED_RIFLEX.get(dit_preset_name(config) or "")


def teacache_coefficients(config: DiTConfig) -> tuple[float, ...] | None:
    """TeaCache's fitted rescaling polynomial for this transformer (highest power first), or None."""
    return TEACACHE_COEFFICIENTS.get(dit_preset_name(config) or "")


def vae_preset(name: str) -> VAEConfig:
    return _named(VAE_PRESETS, name, "VAE preset")


# -- family rules -------------------------------------------------------------------------------------


def dit_family(config: DiTConfig) -> str:
    """The family name of a transformer config (``families.family_of``): ``cogvideox-2b``, ``cogvideox-5b``,
    ``cogvideox-5b-i2v``, ``cogvideox1.5-5b`` or ``cogvideox1.5-5b-i2v``. The family decides what the weights
    cannot tell: the scheduler's SNR shift, the VAE's latent scale, the defaults of a generation."""
    return family_of(config).name


def vae_scaling_factor(family: str) -> float:
    """The latent scaling factor the VAE of ``family`` was trained with (2B: 1.15258426, 5B and 1.5: 0.7)."""
    return _named(VAE_SCALING_FACTORS, family, "model family")


# -- input checks -------------------------------------------------------------------------------------


def check_num_frames(num_frames: int, multiple: int = FRAME_MULTIPLE, *, name: str = "num_frames") -> None:
    """Raises ValueError unless ``num_frames`` is ``multiple * k + 1`` (k >= 0; ``multiple`` = 8 for CogVideoX).

    The causal VAE encodes the first frame alone, then 4 frames per latent frame, and decodes the latent
    frames after the first in pairs: any other count comes out longer (53 frames are decoded as 56). Pass
    :func:`frame_multiple` of a model's temporal compression. The message names the value (as ``name``),
    the rule and the nearest valid values.
    """
    if _is_int(num_frames) and num_frames >= 1 and (num_frames - 1) % multiple == 0:
        return
    if not _is_int(num_frames):
        raise ValueError(f"{name} must be an integer {multiple}k+1 (e.g. 49, 129); got {num_frames!r}")
    below = (num_frames - 1) // multiple * multiple + 1 if num_frames > 1 else None
    above = below + multiple if below is not None else 1
    nearest = " or ".join(str(v) for v in (below, above) if v is not None)
    raise ValueError(
        f"{name} must be {multiple}k+1 (e.g. 49, 129: the VAE encodes the first frame alone, then "
        f"{multiple // VAE_LATENT_FRAMES_PER_CHUNK} frames per latent frame, and decodes the latent frames after the "
        f"first in pairs, so other counts come out longer); got {num_frames}. Nearest valid values: {nearest}"
    )


def frame_multiple(temporal_compression: int = TEMPORAL_COMPRESSION) -> int:
    """The step of the valid frame counts for a VAE with this temporal compression (4 -> 8: 49, 57, ..., 129)."""
    return temporal_compression * VAE_LATENT_FRAMES_PER_CHUNK


_SIZE_REASON = "the VAE's 8x compression times the DiT's 2x2 patches"


def _side_problem(value: object, multiple: int) -> str | None:
    """None for a positive multiple of ``multiple``; else '40 (nearest valid: 32 or 48)'."""
    if _is_int(value) and value > 0 and value % multiple == 0:
        return None
    if not _is_int(value):
        return f"{value!r}, not an integer"
    below = value // multiple * multiple
    nearest = " or ".join(str(v) for v in (below, below + multiple) if v > 0)
    return f"{value} (nearest valid: {nearest})"


def check_side(value: int, *, name: str, multiple: int = SIZE_MULTIPLE) -> None:
    """Raises ValueError unless the pixel side ``value`` (called ``name``) is a positive multiple of ``multiple``."""
    problem = _side_problem(value, multiple)
    if problem is not None:
        raise ValueError(f"{name} must be a positive multiple of {multiple} ({_SIZE_REASON}); got {problem}")


def check_size(height: int, width: int, multiple: int = SIZE_MULTIPLE) -> None:
    """Raises ValueError unless height and width are positive multiples of ``multiple`` (16 for CogVideoX)."""
    sides = {"height": _side_problem(height, multiple), "width": _side_problem(width, multiple)}
    problems = [f"{name} {problem}" for name, problem in sides.items() if problem is not None]
    if problems:
        raise ValueError(
            f"height and width must be positive multiples of {multiple} ({_SIZE_REASON}); got {height}x{width}: "
            + "; ".join(problems)
        )


def check_number(
    value: object,
    *,
    name: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    hint: str = "",
) -> None:
    """Raises ValueError unless ``value`` is a finite number (an integer with ``integer``) in the range.

    ``low`` / ``high`` bound it (inclusive, or exclusive with ``low_open`` / ``high_open``); the message
    names the value as ``name``, the valid range and what was found (NaN, a string, ...), then ``hint``.
    """
    kind = "an integer" if integer else "a number"
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {_bound(low)}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {_bound(high)}")
    wanted = kind + (" " + " and ".join(parts) if parts else "")
    ok = _is_int(value) if integer else _is_number(value)
    if ok:
        ok = (low is None or (value > low if low_open else value >= low)) and (
            high is None or (value < high if high_open else value <= high)
        )
    if not ok:
        raise ValueError(f"{name} must be {wanted}; got {value!r}" + (f". {hint}" if hint else ""))


def _bound(value: float) -> str:
    """A range bound as people read it: integers in full (a seed's 18446744073709551615), others short."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def check_cfg_scale(cfg_scale: object, *, name: str = "cfg_scale") -> None:
    """Guidance scale: a finite number >= 0 (values <= 1 turn guidance off: one DiT pass per step).

    NaN and negative values are refused: compared with 1 they would silently turn guidance off.
    """
    check_number(cfg_scale, name=name, low=0.0, hint="Values <= 1 turn classifier-free guidance off; 6-7 is usual")


def check_generation_numbers(
    *,
    cfg_scale: object = 7.0,
    num_inference_steps: object = 50,
    denoising_strength: object = 1.0,
    seed: object = None,
) -> None:
    """The numbers of one generation (pipeline call, command line, web UI): guidance, steps, strength, seed."""
    check_cfg_scale(cfg_scale)
    check_number(num_inference_steps, name="num_inference_steps", low=1, integer=True)
    check_number(
        denoising_strength,
        name="denoising_strength",
        low=0.0,
        high=1.0,
        low_open=True,
        hint="1.0 = from pure noise; smaller keeps more of the input video",
    )
    if seed is not None:
        check_number(seed, name="seed", low=-1, high=2**64 - 1, integer=True, hint="-1 = a random seed")
