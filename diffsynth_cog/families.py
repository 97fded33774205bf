"""The model-family seam: one frozen description per released CogVideoX family.

A :class:`Family` says everything about a family that the weights cannot tell and that more than one part
of the package needs: patch sizes, the VAE's factors and latent scaling, the text length, the position rule,
how an I2V model is conditioned on its image, the scheduler preset, the defaults of a generation, the frame
and size rules, and the published calibrations (TeaCache, RIFLEx). Every other module reads these numbers
from here (or from the DiT / VAE config, for what a config file holds), never from a literal.

Families: CogVideoX 1.0 (``cogvideox-2b``, ``cogvideox-5b``, ``cogvideox-5b-i2v``) and CogVideoX 1.5
(``cogvideox1.5-5b``, ``cogvideox1.5-5b-i2v``). :func:`family_of` tells them apart from a transformer config:
a temporal patch (``patch_size_t``) means 1.5; no RoPE means 2B; more input than output channels means I2V.

A new family is a new :class:`Family` entry in :data:`FAMILIES` (plus its DiT / VAE preset in ``configs`` and,
for a new checkpoint layout, its key map in ``loading.dit_loader``). This module imports nothing from the
package: ``configs`` builds on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

# Position rules of the DiT (:attr:`Family.positions`).
SINCOS = "sincos"  # a fixed 3D sin-cos table added to the video tokens (2B)
ROPE_FIT = "rope-fit"  # 3D RoPE, spatial coordinates fitted into the base grid (5B, 5B-I2V)
ROPE_SLICE = "rope-slice"  # 3D RoPE on integer coordinates sliced from the max grid (1.5)

# LoRA file layouts (``lora.layouts``): DiffSynth-Studio's names, diffusers / PEFT names.
LORA_DIFFSYNTH = "diffsynth"
LORA_DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class ImageConditioning:
    """How an image-to-video model sees its image: the image's VAE latent (the first frame) rides along as extra
    input channels, zero-padded in time to the latents' length; ``repeat_first`` more copies of the first
    latent frame are prepended when that length is not a whole number of temporal patches (1.5: the reference
    pads by the remainder ``T % patch_size_t``, which is 0 once the latents are padded); ``ofs``: the value
    fed to the DiT's ``ofs`` embedding (1.5 I2V: 2.0; None: the model has none)."""

    ofs: float | None = None


@dataclass(frozen=True)
class TeaCacheCalibration:
    """TeaCache's published polynomial for a family (highest power first) and the signal it was fitted on:
    ``"modulated"``, block 0's modulated video input (TeaCache4CogVideoX, 1.0 5B), or ``"embedding"``, the
    timestep (+ ofs) embedding (TeaCache4CogVideoX1.5). ``source`` names where the numbers are published."""

    coefficients: tuple[float, ...]
    signal: str
    source: str


@dataclass(frozen=True)
class Family:
    """One released CogVideoX family (see the module docstring). Sizes are pixels; frames are pixel frames."""

    name: str
    label: str  # the release's name, e.g. "CogVideoX1.5-5B"
    version: str  # "1.0" or "1.5"
    patch_size: int
    patch_size_t: int  # latent frames per temporal patch (1: every latent frame is its own patch row)
    vae_spatial: int  # pixels per latent row / column
    vae_temporal: int  # pixel frames per latent frame after the first
    vae_latent_frames_per_chunk: int  # the VAE decodes the latent frames after the first in chunks of this
    vae_scaling_factor: float
    invert_scale_latents: bool  # 1.5 I2V: the image latents are divided by the factor (the reference's quirk)
    text_length: int  # T5 tokens per prompt
    positions: str  # SINCOS, ROPE_FIT or ROPE_SLICE
    image: ImageConditioning | None  # None: text-to-video
    scheduler: str  # ``schedulers.scheduler_preset`` name of the released scheduler config
    default_height: int
    default_width: int
    default_frames: int
    trained_frames: int  # the longest clip the released model was trained on (1.0: 49; 1.5: 81 and 161)
    long_frames: int  # the most frames one pass makes without windows (1.0: the ExVideo LoRA's 129; 1.5: 161)
    fps: int
    teacache: TeaCacheCalibration | None
    riflex: tuple[int, int] | None  # RIFLEx (k, N_k) published for the family, N_k in RoPE temporal positions
    lora_layouts: tuple[str, ...]  # LoRA file layouts written for this family

    @property
    def is_i2v(self) -> bool:
        return self.image is not None

    @property
    def size_multiple(self) -> int:
        """Pixel sides must be multiples of this: the VAE's spatial factor times the DiT's patch (16)."""
        return self.vae_spatial * self.patch_size

    @property
    def frame_multiple(self) -> int:
        """Valid frame counts are ``frame_multiple * k + 1``: the VAE encodes the first frame alone, then
        ``vae_temporal`` frames per latent frame, and decodes the latent frames after the first in chunks."""
        return self.vae_temporal * self.vae_latent_frames_per_chunk

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of ``num_frames`` pixel frames (4k+1 -> k+1)."""
        return (num_frames - 1) // self.vae_temporal + 1

    def first_pixel_frame(self, latent_frame: int) -> int:
        """The first pixel frame that latent frame ``latent_frame`` decodes to (0 -> 0, t -> ``vae_temporal`` *
        (t - 1) + 1): where a window starting at that latent frame joins, in the video's frames."""
        return 0 if latent_frame <= 0 else self.vae_temporal * (latent_frame - 1) + 1

    def padded_latent_frames(self, latent_frames: int) -> int:
        """Latent frames the DiT runs on: rounded up to whole temporal patches (1.5: 21 -> 22)."""
        return -(-latent_frames // self.patch_size_t) * self.patch_size_t

    def trained_length(self, sample_frames: int) -> int:
        """The longest clip a model of this family was trained on, given its config's ``sample_frames``: the
        config's, unless the family released longer clips than its config says (1.5: 161; the config: 81)."""
        return max(sample_frames, self.trained_frames) if self.trained_frames > self.default_frames else sample_frames

    @property
    def generate_frames(self) -> int:
        """The length a generation makes when none is asked for: the long length where the released model must be
        extended to reach it (1.0: 129 frames, the ExVideo use case), else the released default (1.5: 81)."""
        return self.long_frames if self.trained_frames < self.long_frames else self.default_frames

    def default_size(self) -> tuple[int, int]:
        return self.default_height, self.default_width

    def defaults(self) -> dict[str, Any]:
        """What a front end shows and fills in: height, width, num_frames, fps."""
        return {
            "height": self.default_height,
            "width": self.default_width,
            "num_frames": self.default_frames,
            "fps": self.fps,
        }


_V10 = dict(
    version="1.0",
    patch_size=2,
    patch_size_t=1,
    vae_spatial=8,
    vae_temporal=4,
    vae_latent_frames_per_chunk=2,
    invert_scale_latents=False,
    text_length=226,
    default_height=480,
    default_width=720,
    default_frames=49,
    trained_frames=49,
    long_frames=129,
    fps=8,
    riflex=None,
    teacache=None,
    lora_layouts=(LORA_DIFFSYNTH, LORA_DIFFUSERS),
)
_V15 = {
    **_V10,
    "version": "1.5",
    "patch_size_t": 2,
    "vae_scaling_factor": 0.7,
    "positions": ROPE_SLICE,
    "scheduler": "cogvideox-5b",  # the 1.5 releases ship the 5B scheduler config (SNR shift 1.0)
    "default_height": 768,
    "default_width": 1360,
    "default_frames": 81,
    "trained_frames": 161,
    "long_frames": 161,
    "fps": 16,
    "lora_layouts": (LORA_DIFFUSERS,),  # DiffSynth-Studio has no 1.5: its LoRA files are 1.0 files
}
_TEACACHE_SOURCE_10 = "ali-vilab/TeaCache, eval/teacache (TeaCache4CogVideoX)"
_TEACACHE_SOURCE_15 = "ali-vilab/TeaCache, TeaCache4CogVideoX1.5/teacache_sample_video.py (commit 7c10efc)"

FAMILIES: MappingProxyType[str, Family] = MappingProxyType(
    {
        f.name: f
        for f in (
            Family(
                name="cogvideox-2b",
                label="CogVideoX-2B",
                vae_scaling_factor=1.15258426,
                positions=SINCOS,
                image=None,
                scheduler="cogvideox-2b",
                **_V10,
            ),
            Family(
                name="cogvideox-5b",
                label="CogVideoX-5B",
                vae_scaling_factor=0.7,
                positions=ROPE_FIT,
                image=None,
                scheduler="cogvideox-5b",
                **{
                    **_V10,
                    # RIFLEx (thu-ml/RIFLEx): intrinsic temporal frequency k (1-based), its period N_k.
                    "riflex": (2, 20),
                    "teacache": TeaCacheCalibration(
                        (-1538.80, 843.20, -134.36, 7.971, -0.0523), "modulated", _TEACACHE_SOURCE_10
                    ),
                },
            ),
            Family(
                name="cogvideox-5b-i2v",
                label="CogVideoX-5B-I2V",
                vae_scaling_factor=0.7,
                positions=ROPE_FIT,
                image=ImageConditioning(),
                scheduler="cogvideox-5b-i2v",
                **_V10,
            ),
            Family(
                name="cogvideox1.5-5b",
                label="CogVideoX1.5-5B",
                image=None,
                **{
                    **_V15,
                    "teacache": TeaCacheCalibration(
                        (2.50210439e02, -1.65061612e02, 3.57804877e01, -7.81551492e-01, 3.58559703e-02),
                        "embedding",
                        _TEACACHE_SOURCE_15,
                    ),
                },
            ),
            Family(
                name="cogvideox1.5-5b-i2v",
                label="CogVideoX1.5-5B-I2V",
                image=ImageConditioning(ofs=2.0),
                **{
                    **_V15,
                    "invert_scale_latents": True,
                    "teacache": TeaCacheCalibration(
                        (1.22842302e02, -1.04088754e02, 2.62981677e01, -3.06009921e-01, 3.71213220e-02),
                        "embedding",
                        _TEACACHE_SOURCE_15,
                    ),
                },
            ),
        )
    }
)
FAMILY_NAMES = tuple(FAMILIES)


class _DiTLike(Protocol):
    use_rotary_positional_embeddings: bool
    in_channels: int
    out_channels: int
    patch_size_t: int | None


def family_of(config: _DiTLike) -> Family:
    """The family of a transformer config (``configs.DiTConfig``): a temporal patch means CogVideoX 1.5; else no
    RoPE means 2B; an I2V model takes image latents beside the noise (``in_channels != out_channels``)."""
    i2v = config.in_channels != config.out_channels
    if config.patch_size_t is not None:
        return FAMILIES["cogvideox1.5-5b-i2v" if i2v else "cogvideox1.5-5b"]
    if not config.use_rotary_positional_embeddings:
        return FAMILIES["cogvideox-2b"]
    return FAMILIES["cogvideox-5b-i2v" if i2v else "cogvideox-5b"]


def get_family(name: str) -> Family:
    """A family by name; an unknown name raises ValueError listing the valid ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; valid: {list(FAMILIES)}") from None
