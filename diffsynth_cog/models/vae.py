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
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffsynth_cog.configs import VAE_LATENT_FRAMES_PER_CHUNK, VAEConfig
from diffsynth_cog.tiling import DEFAULT_TILE_OVERLAP, TileGrid, TileSpec, map_tiles, pair

logger = logging.getLogger(__name__)

ConvCache = dict[str, torch.Tensor]
"""Causal-convolution state between temporal chunks: conv module name -> its last input frames."""

# Latent frames decoded per chunk. The released VAE was trained on two-latent-frame windows
# (8 pixel frames); other chunk sizes change the GroupNorm statistics and give visibly worse
# frames, so this is a property of the checkpoints rather than a tuning knob (it is why frame
# counts are 8k+1: configs.check_num_frames).
LATENT_FRAMES_PER_CHUNK = VAE_LATENT_FRAMES_PER_CHUNK

# The checkpoints' spatial norms and the encoder's output norm use eps 1e-6 whatever
# ``norm_eps`` says (only the plain resnet GroupNorms follow ``norm_eps``). Every released
# config has norm_eps = 1e-6 anyway; we keep the split so a custom config loads like upstream.
FIXED_NORM_EPS = 1e-6

# Above this many input elements a convolution runs over overlapping windows of frames.
# Large single convolutions can exceed 32-bit indexing in some GPU kernels; the windows
# overlap by (time kernel - 1) frames, so the result is exactly the one-shot convolution.
MAX_CONV_INPUT_ELEMENTS = 2**30


def _conv_over_time(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for an input already padded in time, split into frame windows when huge.

    x: [B, C, T, H, W] -> [B, C_out, T - kt + 1, H', W'].
    """
    if x.numel() <= MAX_CONV_INPUT_ELEMENTS:
        return conv(x)
    kt = conv.kernel_size[0]
    t_out = x.shape[2] - kt + 1
    pieces = min(t_out, math.ceil(x.numel() / MAX_CONV_INPUT_ELEMENTS))
    step = math.ceil(t_out / pieces)
    outs = [conv(x[:, :, s : s + step + kt - 1]) for s in range(0, t_out, step)]
    return torch.cat(outs, dim=2)


def group_norm_stats_split(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``F.group_norm`` with the statistics computed by PyTorch's many-block reductions.

    The mean and the mean square are fp32 sums over each group (reading bf16 input without an
    fp32 copy), the variance is E[x^2] - E[x]^2 (identical math to Welford's update, but its
    fp32 rounding grows like 6e-8 * (mean / std)^2 relative to the variance: negligible next to
    a bf16 output's 2^-9 unless |mean| > ~100 std), and the normalisation is one fused
    multiply-add per element in fp32, one rounding to x's dtype. Any memory layout, no copy.
    x: [B, C, *] -> [B, C, *] (same layout as x)
    """
    b, c = x.shape[:2]
    per_group = c // num_groups
    groups = x.unflatten(1, (num_groups, per_group))  # [B, G, C/G, *] view
    dims = tuple(range(2, groups.ndim))
    acc = torch.promote_types(x.dtype, torch.float32)
    count = groups[0, 0].numel()
    mean = groups.sum(dims, dtype=acc) / count  # [B, G]
    mean_sq = torch.linalg.vector_norm(groups, 2, dims, dtype=acc).square() / count  # [B, G]
    rstd = torch.rsqrt((mean_sq - mean.square()).clamp_min(0) + eps)
    scale = rstd.repeat_interleave(per_group, dim=1)  # [B, C]
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if weight is not None:
        scale = scale * weight.to(acc)
        shift = shift * weight.to(acc)
    if bias is not None:
        shift = shift + bias.to(acc)
    shape = (b, c) + (1,) * (x.ndim - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape), out=torch.empty_like(x))


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, same math), fast for half-precision CUDA inference.

    PyTorch's CUDA GroupNorm reduces each (sample, group) pair in one thread block: at batch 1
    with 32 groups that is 32 blocks on a 132-SM GPU, and over the decoder's full-resolution
    activations those statistics took 35% of a 129-frame decode (``benchmarks/profile_vae.py``).
    bf16/fp16 CUDA inference therefore uses :func:`group_norm_stats_split`; fp32 inputs, CPU
    inputs and calls that record a gradient use PyTorch's own kernel (Welford statistics).
    x: [B, C, *] -> [B, C, *]
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and (x.requires_grad or (self.weight is not None and self.weight.requires_grad))
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not grad:
            return group_norm_stats_split(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d when ``x`` is stored channels-last (and not also plain contiguous), else contiguous."""
    if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


class _CacheIO:
    """The cache of the previous chunk (read only) and the one this chunk produces."""

    __slots__ = ("past", "new")

    def __init__(self, past: Mapping[str, torch.Tensor] | None) -> None:
        self.past: Mapping[str, torch.Tensor] = past if past is not None else {}
        self.new: ConvCache = {}


class CausalConv3d(nn.Module):
    """3D convolution that is causal in time and "same"-padded (zeros) in space.

    The input is extended on the past side by ``kt - 1`` frames: the cached last frames of the
    previous chunk when there is one, else copies of the first frame (no zero frames, so the
    first frame of a clip sees itself as its past).

    x: [B, C_in, T, H, W] -> [B, C_out, T, H, W]
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.time_kernel = kernel_size
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=(0, kernel_size // 2, kernel_size // 2))
        # Name under which this conv stores its frames in a ConvCache; set by the owning
        # encoder/decoder to its module path so caches are readable and unique.
        self.cache_key = ""

    def forward(self, x: torch.Tensor, io: _CacheIO | None = None) -> torch.Tensor:
        kt = self.time_kernel
        if kt > 1:
            layout = _layout_of(x)
            past = self._past(x, io)  # [B, C_in, kt - 1, H, W]
            # The cat's output layout follows its inputs; keep x's (the first chunk's past is an
            # expanded view, which has none).
            x = torch.cat([past, x], dim=2).contiguous(memory_format=layout)  # [B, C_in, T + kt - 1, H, W]
            if io is not None:
                # clone: a view would keep this chunk's whole padded input alive.
                io.new[self.cache_key] = x[:, :, -(kt - 1) :].clone()
        return _conv_over_time(self.conv, x)  # [B, C_out, T, H, W]

    def _past(self, x: torch.Tensor, io: _CacheIO | None) -> torch.Tensor:
        kt = self.time_kernel
        if io is None or not io.past:
            return x[:, :, :1].expand(-1, -1, kt - 1, -1, -1)
        past = io.past.get(self.cache_key)
        if past is None:
            raise ValueError(
                f"conv cache has no entry for {self.cache_key!r}: pass the cache returned by the previous chunk "
                "of this same module (or None for the first chunk)"
            )
        want = (x.shape[0], x.shape[1], kt - 1, x.shape[3], x.shape[4])
        if tuple(past.shape) != want:
            raise ValueError(
                f"conv cache entry {self.cache_key!r} has shape {list(past.shape)}, expected {list(want)} "
                "(was it produced by a chunk of another batch size or tile size?)"
            )
        return past.to(dtype=x.dtype)


class SpatialNorm3D(nn.Module):
    """GroupNorm whose scale and shift are predicted from the latent (decoder only).

    ``out = GroupNorm(f) * conv_y(z) + conv_b(z)``, with ``z`` resized (nearest) to ``f``'s
    frames and pixels. The first latent frame maps to the first output frame only (the causal
    first frame) when ``f`` has an odd frame count > 1.

    f: [B, C_f, T, H, W], z: [B, C_z, t, h, w] -> [B, C_f, T, H, W]
    """

    def __init__(self, channels: int, latent_channels: int, groups: int) -> None:
        super().__init__()
        self.norm_layer = GroupNorm(groups, channels, eps=FIXED_NORM_EPS)
        self.conv_y = nn.Conv3d(latent_channels, channels, 1)
        self.conv_b = nn.Conv3d(latent_channels, channels, 1)

    def forward(self, f: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # The 1x1x1 convolutions commute with nearest resizing (a resize only repeats values),
        # so they run at latent resolution, and the resize itself is a broadcast: the same
        # numbers as resizing z first, without full-resolution copies of z, scale or shift.
        scale = _conv_over_time(self.conv_y, z)  # [B, C_f, t, h, w]
        shift = _conv_over_time(self.conv_b, z)  # [B, C_f, t, h, w]
        return _modulate(self.norm_layer(f), scale, shift)  # [B, C_f, T, H, W]


def _modulate(normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``normed * resize(scale) + resize(shift)`` with a nearest resize of [B, C, t, h, w] to
    normed's [B, C, T, H, W].

    When T is odd and > 1 the first latent frame maps to the first frame only and the others
    are spread over the rest (the causal first frame is its own window). Integer ratios, the
    only ones the decoder produces, are done by broadcasting over split dimensions (in place
    when no gradient is recorded); anything else falls back to an explicit resize.
    """
    frames = normed.shape[2]
    if frames > 1 and frames % 2 == 1:
        pairs = [(slice(0, 1), slice(0, 1)), (slice(1, None), slice(1, None))]
    else:
        pairs = [(slice(None), slice(None))]
    in_place = not (torch.is_grad_enabled() and (normed.requires_grad or scale.requires_grad or shift.requires_grad))
    outs = []
    for dst, src in pairs:
        part, y, b = normed[:, :, dst], scale[:, :, src], shift[:, :, src]
        big, small = part.shape[2:], y.shape[2:]
        if any(n % m for n, m in zip(big, small, strict=True)):
            y, b = F.interpolate(y, size=tuple(big)), F.interpolate(b, size=tuple(big))
            small = big
        ratios = [n // m for n, m in zip(big, small, strict=True)]
        # [B, C, t, rt, h, rh, w, rw] view of the part; latent values broadcast over the r axes.
        split = part.view(*part.shape[:2], small[0], ratios[0], small[1], ratios[1], small[2], ratios[2])
        y = y[:, :, :, None, :, None, :, None]
        b = b[:, :, :, None, :, None, :, None]
        if in_place:
            split.mul_(y).add_(b)
        else:
            outs.append((split * y + b).view(part.shape))
    return normed if in_place else torch.cat(outs, dim=2)


def _per_frame_conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Applies a 2D conv to every frame. x: [B, C, T, H, W] -> [B, C_out, T, H', W']."""
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, C, H, W]
    out = conv(frames)  # [B*T, C_out, H', W']
    return out.reshape(b, t, *out.shape[1:]).transpose(1, 2)


class Downsample3D(nn.Module):
    """Halves H and W (stride-2 conv, zero pad on the bottom/right), and optionally time.

    Time is halved by averaging pairs of frames; with an odd frame count the first frame is
    kept alone (causal first frame). x: [B, C, T, H, W] -> [B, C, T', H/2, W/2] with
    T' = T (no time compression), T/2 (even T) or 1 + (T-1)/2 (odd T).
    """

    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compress_time:
            x = _halve_time(x)  # [B, C, T', H, W]
        x = F.pad(x, (0, 1, 0, 1))  # [B, C, T', H+1, W+1]
        return _per_frame_conv2d(self.conv, x)  # [B, C, T', H/2, W/2]


def _halve_time(x: torch.Tensor) -> torch.Tensor:
    """Averages consecutive frame pairs; an odd leading frame is kept as is."""
    if x.shape[2] % 2 == 1:
        first, rest = x[:, :, :1], x[:, :, 1:]
        if rest.shape[2] == 0:
            return first
        return torch.cat([first, rest.unflatten(2, (-1, 2)).mean(dim=3)], dim=2)
    return x.unflatten(2, (-1, 2)).mean(dim=3)


class Upsample3D(nn.Module):
    """Doubles H and W (nearest, then a 3x3 conv per frame), and optionally time.

    With time compression, an odd frame count > 1 keeps the first frame single and doubles the
    rest (T -> 2T - 1); an even count doubles every frame; a single frame stays single.
    x: [B, C, T, H, W] -> [B, C, T', 2H, 2W]
    """

    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        if self.compress_time and frames > 1:
            if frames % 2 == 1:
                first = F.interpolate(x[:, :, :1], scale_factor=(1, 2, 2))
                rest = F.interpolate(x[:, :, 1:], scale_factor=(2, 2, 2))
                x = torch.cat([first, rest], dim=2)  # [B, C, 2T - 1, 2H, 2W]
            else:
                x = F.interpolate(x, scale_factor=(2, 2, 2))  # [B, C, 2T, 2H, 2W]
        else:
            x = F.interpolate(x, scale_factor=(1, 2, 2))  # [B, C, T, 2H, 2W]
        return _per_frame_conv2d(self.conv, x)


class ResnetBlock3D(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1-projected when channels change) skip.

    The norms are plain GroupNorms in the encoder and latent-conditioned SpatialNorm3D in the
    decoder (``latent_channels`` given). x: [B, C_in, T, H, W] -> [B, C_out, T, H, W]
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, groups: int, eps: float, latent_channels: int | None = None
    ) -> None:
        super().__init__()
        self.norm1: nn.Module
        self.norm2: nn.Module
        if latent_channels is None:
            self.norm1 = GroupNorm(groups, in_channels, eps=eps)
            self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(in_channels, latent_channels, groups)
            self.norm2 = SpatialNorm3D(out_channels, latent_channels, groups)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def _norm(self, norm: nn.Module, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return norm(x, z) if isinstance(norm, SpatialNorm3D) else norm(x)

    def forward(self, x: torch.Tensor, io: _CacheIO | None, z: torch.Tensor | None = None) -> torch.Tensor:
        h = F.silu(self._norm(self.norm1, x, z))  # [B, C_in, T, H, W]
        h = self.conv1(h, io)  # [B, C_out, T, H, W]
        h = F.silu(self._norm(self.norm2, h, z))
        h = self.conv2(h, io)  # [B, C_out, T, H, W]
        skip = x if self.conv_shortcut is None else _conv_over_time(self.conv_shortcut, x)
        return h + skip


def _resnets(
    channels_in: int, channels_out: int, count: int, config: VAEConfig, latent_channels: int | None
) -> nn.ModuleList:
    return nn.ModuleList(
        ResnetBlock3D(
            channels_in if i == 0 else channels_out,
            channels_out,
            groups=config.norm_num_groups,
            eps=config.norm_eps,
            latent_channels=latent_channels,
        )
        for i in range(count)
    )


class DownBlock3D(nn.Module):
    """Resnets then (except in the last block) a Downsample3D. [B, C_in, T, H, W] -> [B, C_out, T', H', W']."""

    def __init__(
        self, channels_in: int, channels_out: int, config: VAEConfig, *, downsample: bool, compress_time: bool
    ) -> None:
        super().__init__()
        self.resnets = _resnets(channels_in, channels_out, config.layers_per_block, config, None)
        self.downsample = Downsample3D(channels_out, compress_time) if downsample else None

    def forward(self, x: torch.Tensor, io: _CacheIO | None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, io)
        return x if self.downsample is None else self.downsample(x)


class MidBlock3D(nn.Module):
    """Two resnets at the lowest resolution. [B, C, T, H, W] -> same."""

    def __init__(self, channels: int, config: VAEConfig, latent_channels: int | None) -> None:
        super().__init__()
        self.resnets = _resnets(channels, channels, 2, config, latent_channels)

    def forward(self, x: torch.Tensor, io: _CacheIO | None, z: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, io, z)
        return x


class UpBlock3D(nn.Module):
    """``layers_per_block + 1`` latent-conditioned resnets then (except last) an Upsample3D."""

    def __init__(
        self, channels_in: int, channels_out: int, config: VAEConfig, *, upsample: bool, compress_time: bool
    ) -> None:
        super().__init__()
        self.resnets = _resnets(channels_in, channels_out, config.layers_per_block + 1, config, config.latent_channels)
        self.upsample = Upsample3D(channels_out, compress_time) if upsample else None

    def forward(self, x: torch.Tensor, io: _CacheIO | None, z: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, io, z)
        return x if self.upsample is None else self.upsample(x)


def _time_levels(config: VAEConfig) -> int:
    """Number of resampling stages that also resample time (log2 of the temporal ratio)."""
    levels = int(math.log2(config.temporal_compression_ratio))
    stages = len(config.block_out_channels) - 1
    if levels > stages:
        raise ValueError(
            f"temporal_compression_ratio {config.temporal_compression_ratio} needs {levels} resampling stages, "
            f"but block_out_channels {config.block_out_channels} gives only {stages}"
        )
    return levels


def _name_causal_convs(root: nn.Module) -> None:
    for name, module in root.named_modules():
        if isinstance(module, CausalConv3d):
            module.cache_key = name


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
        time_levels = _time_levels(config)
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
        _name_causal_convs(self)
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
        io = _CacheIO(cache)
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
        time_levels = _time_levels(config)
        last = len(channels) - 1
        self.conv_in = CausalConv3d(config.latent_channels, channels[0])
        self.mid_block = MidBlock3D(channels[0], config, config.latent_channels)
        self.up_blocks = nn.ModuleList(
            UpBlock3D(channels[max(i - 1, 0)], channels[i], config, upsample=i < last, compress_time=i < time_levels)
            for i in range(len(channels))
        )
        self.norm_out = SpatialNorm3D(channels[-1], config.latent_channels, config.norm_num_groups)
        self.conv_out = CausalConv3d(channels[-1], config.out_channels)
        _name_causal_convs(self)
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
        io = _CacheIO(cache)
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
