"""The building blocks of the CogVideoX 3D causal VAE: causal 3D convolutions that carry their last frames
between temporal chunks (an explicit cache), GroupNorm with statistics reduced in float32 across the GPU,
spatially conditioned norms, resampling in space and time, resnet blocks and the encoder's and decoder's stages.

Layout of a video tensor: ``[B, C, F, H, W]``. ``models.vae`` assembles these into the encoder and decoder and runs
them over temporal chunks and spatial tiles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from diffsynth_cog.configs import VAEConfig

ConvCache = dict[str, torch.Tensor]
"""Causal-convolution state between temporal chunks: conv module name -> its last input frames."""

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


class CacheIO:
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

    def forward(self, x: torch.Tensor, io: CacheIO | None = None) -> torch.Tensor:
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

    def _past(self, x: torch.Tensor, io: CacheIO | None) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor, io: CacheIO | None, z: torch.Tensor | None = None) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor, io: CacheIO | None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, io)
        return x if self.downsample is None else self.downsample(x)


class MidBlock3D(nn.Module):
    """Two resnets at the lowest resolution. [B, C, T, H, W] -> same."""

    def __init__(self, channels: int, config: VAEConfig, latent_channels: int | None) -> None:
        super().__init__()
        self.resnets = _resnets(channels, channels, 2, config, latent_channels)

    def forward(self, x: torch.Tensor, io: CacheIO | None, z: torch.Tensor | None = None) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor, io: CacheIO | None, z: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, io, z)
        return x if self.upsample is None else self.upsample(x)


def temporal_resampling_levels(config: VAEConfig) -> int:
    """Number of resampling stages that also resample time (log2 of the temporal ratio)."""
    levels = int(math.log2(config.temporal_compression_ratio))
    stages = len(config.block_out_channels) - 1
    if levels > stages:
        raise ValueError(
            f"temporal_compression_ratio {config.temporal_compression_ratio} needs {levels} resampling stages, "
            f"but block_out_channels {config.block_out_channels} gives only {stages}"
        )
    return levels


def name_causal_convs(root: nn.Module) -> None:
    for name, module in root.named_modules():
        if isinstance(module, CausalConv3d):
            module.cache_key = name
