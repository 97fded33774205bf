"""The CogVideoX 3D causal VAE: encoder, decoder, temporal chunking and spatial tiling.

Layout of a video tensor: ``[B, C, F, H, W]`` (batch, channels, frames, rows, columns).

The VAE compresses space by ``2 ** (len(block_out_channels) - 1)`` (8) and time by
``temporal_compression_ratio`` (4). Time is *causal*: every 3D convolution pads its input on the
past side only, with copies of the first frame, so the first frame is encoded on its own and a
clip of ``F = 4k + 1`` frames maps to ``k + 1`` latent frames.

Long clips are processed in temporal chunks. The causal convolutions hand the last frames of
each chunk to the next one through an explicit cache (a plain ``dict[str, Tensor]`` that the
caller passes in and gets back), so a chunked pass sees the same convolution context as a
one-shot pass would. GroupNorm however normalises over the frames *of one chunk*, so the chunk
schedule is part of the model's numerics: we use the schedule the checkpoints were released
with (two latent frames per chunk, the first chunk absorbing the remainder).

Spatial tiling splits ``H x W`` into overlapping tiles, runs each tile through the temporal
chunk loop and blends the overlaps linearly. It bounds memory in space, at the price of
per-tile GroupNorm statistics (so tiled and untiled outputs agree only approximately).

The API works on *unscaled* latents: the pipeline multiplies by ``config.scaling_factor``
after encoding and divides by it before decoding.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffsynth_cog.configs import VAE_LATENT_FRAMES_PER_CHUNK, VAEConfig
from diffsynth_cog.models.tiling import DEFAULT_TILE_OVERLAP, TileGrid, TileSpec, map_tiles, pair
from diffsynth_cog.models.vae_blocks import (
    FIXED_NORM_EPS,
    CacheIO,
    CausalConv3d,
    ConvCache,
    DownBlock3D,
    GroupNorm,
    MidBlock3D,
    SpatialNorm3D,
    UpBlock3D,
    name_causal_convs,
    temporal_resampling_levels,
)

logger = logging.getLogger(__name__)


# Latent frames decoded per chunk. The released VAE was trained on two-latent-frame windows
# (8 pixel frames); other chunk sizes change the GroupNorm statistics and give visibly worse
# frames, so this is a property of the checkpoints rather than a tuning knob (it is why frame
# counts are 8k+1: configs.check_num_frames).
LATENT_FRAMES_PER_CHUNK = VAE_LATENT_FRAMES_PER_CHUNK


def temporal_chunks(num_frames: int, chunk: int) -> list[tuple[int, int]]:
    """Frame ranges ``[start, end)`` of the chunk schedule: ``max(num_frames // chunk, 1)`` chunks
    of ``chunk`` frames, the first one also taking the ``num_frames % chunk`` extra frames (the
    causal first frame, and any frames that do not fill a chunk)."""
    count = max(num_frames // chunk, 1)
    extra = num_frames % chunk
    return [(0 if i == 0 else chunk * i + extra, min(chunk * (i + 1) + extra, num_frames)) for i in range(count)]


def _run_chunks(
    part: CogVAEEncoder | CogVAEDecoder, x: torch.Tensor, chunks: list[tuple[int, int]], bar: tqdm
) -> torch.Tensor:
    """Runs ``part`` over the temporal chunks of x [B, C, T, H, W], carrying the conv cache, and
    joins the outputs along time.

    Chunks run channels-last on CUDA unless ``part.channels_last`` says otherwise: cuDNN's 3D
    convolutions run channels-last on tensor cores, and channels-first inputs cost a transpose in
    and out of every convolution (7% of a decode on an H200). Outputs come back contiguous.
    """
    use = x.is_cuda if part.channels_last is None else part.channels_last
    layout = torch.channels_last_3d if use else torch.contiguous_format
    cache: ConvCache | None = None
    outs = []
    for start, end in chunks:
        out, cache = part(x[:, :, start:end].contiguous(memory_format=layout), cache)  # [B, C', t, h, w]
        outs.append(out.contiguous())
        bar.update(1)
    return torch.cat(outs, dim=2)


def _check_5d(x: object, what: str, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.ndim != 5:
        hint = " (add a batch dimension with .unsqueeze(0))" if x.ndim == 4 else ""
        raise ValueError(f"{what} must be 5-D {layout}, got shape {list(x.shape)}{hint}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {x.dtype}")
    return x


class CogVAEEncoder(nn.Module):
    """Video -> latent distribution (mean and log-variance).

    ``forward(video_chunk, cache)`` runs one temporal chunk; :meth:`encode` runs the whole
    chunk schedule (and spatial tiling when asked).
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        time_levels = temporal_resampling_levels(config)
        last = len(channels) - 1
        self.conv_in = CausalConv3d(config.in_channels, channels[0])
        self.down_blocks = nn.ModuleList(
            DownBlock3D(
                channels[max(i - 1, 0)], channels[i], config, downsample=i < last, compress_time=i < time_levels
            )
            for i in range(len(channels))
        )
        self.mid_block = MidBlock3D(channels[-1], config, None)
        self.norm_out = GroupNorm(config.norm_num_groups, channels[-1], eps=FIXED_NORM_EPS)
        self.conv_out = CausalConv3d(channels[-1], 2 * config.latent_channels)
        name_causal_convs(self)
        # Activation layout of encode(): None = channels-last on CUDA (faster convolutions), else as set.
        self.channels_last: bool | None = None

    def forward(
        self, video: torch.Tensor, cache: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, ConvCache]:
        """One temporal chunk.

        video: [B, C_in, T, H, W] (T frames of the chunk; the first chunk of a clip has an odd
        count) -> moments [B, 2 * latent_channels, T', H/8, W/8] (mean then log-variance), and
        the cache to pass with the next chunk. ``cache=None`` starts a clip.
        """
        io = CacheIO(cache)
        h = self.conv_in(video, io)  # [B, C0, T, H, W]
        for block in self.down_blocks:
            h = block(h, io)  # [B, Ci, T', H/2^i, W/2^i]
        h = self.mid_block(h, io)
        h = F.silu(self.norm_out(h))
        return self.conv_out(h, io), io.new  # [B, 2 * latent, T', h, w]

    def forward_chunk(
        self, video: torch.Tensor, cache: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, ConvCache]:
        """Alias of ``self(video, cache)``: encodes one temporal chunk, returns (moments, new cache)."""
        return self(video, cache)

    @property
    def frames_per_chunk(self) -> int:
        """Pixel frames per temporal chunk (two latent frames' worth)."""
        return LATENT_FRAMES_PER_CHUNK * self.config.temporal_compression_ratio

    def check_video(self, video: torch.Tensor) -> None:
        """Raises ValueError unless ``video`` is [B, in_channels, 4k+1, H, W] with H, W multiples of 8."""
        cfg = self.config
        _check_5d(video, "video", "[B, C, F, H, W]")
        _, channels, frames, height, width = video.shape
        if channels != cfg.in_channels:
            raise ValueError(
                f"video has {channels} channels (dim 1 of shape {list(video.shape)}), the VAE expects "
                f"{cfg.in_channels}; layout is [B, C, F, H, W]"
            )
        r = cfg.temporal_compression_ratio
        if frames < 1 or (frames - 1) % r:
            below = max((frames - 1) // r * r + 1, 1)
            above = below + r if below < frames else below
            nearest = f"{below} or {above}" if below != above else f"{above}"
            raise ValueError(
                f"video has {frames} frames; the causal VAE needs {r}k+1 frames (nearest valid: {nearest})"
            )
        s = cfg.spatial_compression
        for name, size in (("height", height), ("width", width)):
            if size % s:
                below, above = size // s * s, size // s * s + s
                nearest = f"{below} or {above}" if below > 0 else f"{above}"
                raise ValueError(
                    f"video {name} {size} is not a multiple of the spatial compression {s} (nearest valid: {nearest})"
                )

    def encode_moments(
        self,
        video: torch.Tensor,
        *,
        tiled: bool = False,
        tile_sample_size: int | Sequence[int] | None = None,
        tile_overlap: float | Sequence[float] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """video [B, C, F, H, W] in [-1, 1] -> moments [B, 2 * latent_channels, (F-1)/r + 1, H/8, W/8].

        ``tile_sample_size`` (pixels, rows and columns; default half the config's sample size)
        and ``tile_overlap`` (fraction of a tile, default ``DEFAULT_TILE_OVERLAP``) only matter
        with ``tiled=True``, and only when the video is larger than one tile.
        """
        self.check_video(video)
        cfg = self.config
        s = cfg.spatial_compression
        height, width = video.shape[3], video.shape[4]
        chunks = temporal_chunks(video.shape[2], self.frames_per_chunk)
        if tiled:
            grid = _tile_grid(cfg, (height, width), tile_sample_size, tile_overlap, pixels_per_unit=1)
            if not grid.single:
                with tqdm(total=len(grid) * len(chunks), desc="VAE encode", disable=not progress) as bar:
                    return map_tiles(video, grid, lambda t, _: _run_chunks(self, t, chunks, bar), Fraction(1, s))
        with tqdm(total=len(chunks), desc="VAE encode", disable=not progress) as bar:
            return _run_chunks(self, video, chunks, bar)

    def encode(
        self,
        video: torch.Tensor,
        *,
        tiled: bool = False,
        tile_sample_size: int | Sequence[int] | None = None,
        tile_overlap: float | Sequence[float] | None = None,
        sample: bool = False,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """video [B, C, F, H, W] in [-1, 1], F = 4k+1 -> unscaled latents [B, L, k+1, H/8, W/8].

        Returns the posterior mean, or with ``sample=True`` ``mean + std * noise`` with noise
        drawn from ``generator`` (on the generator's device, then moved).
        """
        moments = self.encode_moments(
            video, tiled=tiled, tile_sample_size=tile_sample_size, tile_overlap=tile_overlap, progress=progress
        )
        mean, logvar = moments.chunk(2, dim=1)  # [B, L, t, h, w] each
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # clamp: exp must not overflow on outliers
        noise_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype).to(mean.device)
        return mean + std * noise


def _tile_grid(
    config: VAEConfig,
    size: tuple[int, int],
    tile_sample_size: int | Sequence[int] | None,
    tile_overlap: float | Sequence[float] | None,
    pixels_per_unit: int,
) -> TileGrid:
    """The tiles over ``size`` input units (pixels for the encoder, latents for the decoder). Tile sizes are
    in pixels; the default is half the config's sample size (the reference's ``enable_tiling``)."""
    s = config.spatial_compression
    default = ((config.sample_height // 2) // s * s, (config.sample_width // 2) // s * s)
    spec = TileSpec(
        pair(tile_sample_size, "tile_sample_size") if tile_sample_size is not None else default,
        tile_overlap if tile_overlap is not None else DEFAULT_TILE_OVERLAP,
    )
    if any(t % s for t in spec.size):
        raise ValueError(
            f"tile_sample_size {spec.size} must be positive multiples of {s} (when not given it is half "
            f"the config's sample_height x sample_width, {config.sample_height}x{config.sample_width})"
        )
    return spec.grid(size, pixels_per_unit, multiple=s // pixels_per_unit)


class CogVAEDecoder(nn.Module):
    """Latents -> video. ``forward(latent_chunk, cache)`` runs one temporal chunk; :meth:`decode`
    runs the whole chunk schedule (and spatial tiling when asked)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        channels = tuple(reversed(config.block_out_channels))
        time_levels = temporal_resampling_levels(config)
        last = len(channels) - 1
        self.conv_in = CausalConv3d(config.latent_channels, channels[0])
        self.mid_block = MidBlock3D(channels[0], config, config.latent_channels)
        self.up_blocks = nn.ModuleList(
            UpBlock3D(channels[max(i - 1, 0)], channels[i], config, upsample=i < last, compress_time=i < time_levels)
            for i in range(len(channels))
        )
        self.norm_out = SpatialNorm3D(channels[-1], config.latent_channels, config.norm_num_groups)
        self.conv_out = CausalConv3d(channels[-1], config.out_channels)
        name_causal_convs(self)
        # Activation layout of decode(): None = channels-last on CUDA (faster convolutions), else as set.
        self.channels_last: bool | None = None

    def forward(
        self, latents: torch.Tensor, cache: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, ConvCache]:
        """One temporal chunk.

        latents: [B, L, t, h, w] (unscaled) -> video [B, C_out, T, 8h, 8w] with T = 4t - 3 for
        the first chunk of a clip (odd t; ``cache=None``) and 4t for later chunks (even t), and
        the cache to pass with the next chunk.
        """
        io = CacheIO(cache)
        h = self.conv_in(latents, io)  # [B, C_top, t, h, w]
        h = self.mid_block(h, io, latents)
        for block in self.up_blocks:
            h = block(h, io, latents)  # [B, Ci, T', H', W']
        h = F.silu(self.norm_out(h, latents))  # [B, C0, T, 8h, 8w]
        return self.conv_out(h, io), io.new  # [B, C_out, T, 8h, 8w]

    def forward_chunk(
        self, latents: torch.Tensor, cache: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, ConvCache]:
        """Alias of ``self(latents, cache)``: decodes one temporal chunk, returns (frames, new cache)."""
        return self(latents, cache)

    def check_latents(self, latents: torch.Tensor) -> None:
        """Raises ValueError unless ``latents`` is [B, latent_channels, t >= 1, h >= 1, w >= 1]."""
        _check_5d(latents, "latents", "[B, C, T, H, W]")
        if latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"latents have {latents.shape[1]} channels (dim 1 of shape {list(latents.shape)}), the VAE expects "
                f"{self.config.latent_channels}; layout is [B, C, T, H, W]"
            )
        if min(latents.shape[2:]) < 1:
            raise ValueError(f"latents shape {list(latents.shape)} has an empty frame/row/column dimension")

    def decode(
        self,
        latents: torch.Tensor,
        *,
        tiled: bool = False,
        tile_sample_size: int | Sequence[int] | None = None,
        tile_overlap: float | Sequence[float] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Unscaled latents [B, L, t, h, w] -> video [B, C_out, 4(t-1)+1, 8h, 8w] in about [-1, 1].

        Latent frames go through the decoder two at a time (the first chunk takes one more when
        t is odd), carrying the causal cache. ``tile_sample_size`` (pixels of the decoded tile,
        rows and columns, multiples of 8; default half the config's sample size) and ``tile_overlap``
        (fraction of a tile, default ``DEFAULT_TILE_OVERLAP``) only matter with ``tiled=True``, and
        only when the latents are larger than one tile.
        """
        self.check_latents(latents)
        cfg = self.config
        s = cfg.spatial_compression
        height, width = latents.shape[3], latents.shape[4]
        chunks = temporal_chunks(latents.shape[2], LATENT_FRAMES_PER_CHUNK)
        if tiled:
            grid = _tile_grid(cfg, (height, width), tile_sample_size, tile_overlap, pixels_per_unit=s)
            if not grid.single:
                with tqdm(total=len(grid) * len(chunks), desc="VAE decode", disable=not progress) as bar:
                    return map_tiles(latents, grid, lambda t, _: _run_chunks(self, t, chunks, bar), s)
        with tqdm(total=len(chunks), desc="VAE decode", disable=not progress) as bar:
            return _run_chunks(self, latents, chunks, bar)


class CogVAE(nn.Module):
    """The CogVideoX VAE: ``.encoder`` and ``.decoder`` (either may be None when loaded alone).

    Latents are unscaled; multiply by ``config.scaling_factor`` before the DiT and divide after.
    """

    def __init__(self, config: VAEConfig, parts: Sequence[str] = ("encoder", "decoder")) -> None:
        super().__init__()
        unknown = set(parts) - {"encoder", "decoder"}
        if unknown or not parts:
            raise ValueError(f"parts must be a non-empty subset of ('encoder', 'decoder'), got {tuple(parts)}")
        self.config = config
        self.encoder = CogVAEEncoder(config) if "encoder" in parts else None
        self.decoder = CogVAEDecoder(config) if "decoder" in parts else None

    def _part(self, name: str) -> nn.Module:
        part = getattr(self, name)
        if part is None:
            raise RuntimeError(f"this CogVAE was built without its {name}; load it with parts including {name!r}")
        return part

    def encode(
        self,
        video: torch.Tensor,
        *,
        tiled: bool = False,
        tile_sample_size: int | Sequence[int] | None = None,
        tile_overlap: float | Sequence[float] | None = None,
        sample: bool = False,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """video [B, 3, F, H, W] in [-1, 1], F = 4k+1 -> unscaled latents [B, L, k+1, H/8, W/8].

        See :meth:`CogVAEEncoder.encode`.
        """
        encoder: CogVAEEncoder = self._part("encoder")  # type: ignore[assignment]
        return encoder.encode(
            video,
            tiled=tiled,
            tile_sample_size=tile_sample_size,
            tile_overlap=tile_overlap,
            sample=sample,
            generator=generator,
            progress=progress,
        )

    def decode(
        self,
        latents: torch.Tensor,
        *,
        tiled: bool = False,
        tile_sample_size: int | Sequence[int] | None = None,
        tile_overlap: float | Sequence[float] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Unscaled latents [B, L, t, h, w] -> video [B, 3, 4(t-1)+1, 8h, 8w].

        See :meth:`CogVAEDecoder.decode`.
        """
        decoder: CogVAEDecoder = self._part("decoder")  # type: ignore[assignment]
        return decoder.decode(
            latents, tiled=tiled, tile_sample_size=tile_sample_size, tile_overlap=tile_overlap, progress=progress
        )

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean: [B, 3, F, H, W] -> [B, 3, F, H, W]."""
        return self.decode(self.encode(video))
