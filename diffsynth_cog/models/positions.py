"""Position tables of the DiT: pure functions of the call's patch grid and the config, cached per shape.

RoPE (5B, 5B-I2V): cos/sin per token over (time, rows, columns), spatial coordinates fitted into the
config's base grid; CogVideoX 1.5: integer coordinates 0..n-1 on every axis, sliced from its max grid
(``families.ROPE_SLICE``; time counts temporal patches); RIFLEx lowers one temporal frequency (``diffsynth_cog.denoise.riflex`` decides the
setting, the rule is here). Sin-cos (2B): a fixed table added to the video tokens.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.families import ROPE_SLICE

RIFLEX_MARGIN = 0.9  # the lowered frequency's period is L / 0.9: the target length is 90 % of one period


def riflex_frequencies(frequencies: torch.Tensor, num_frames: int, k: int, n_k: int) -> torch.Tensor:
    """The temporal RoPE frequencies [d/2] for a call of ``num_frames`` latent frames under RIFLEx (k, N_k).

    Unchanged (the same tensor) when ``num_frames <= n_k``; otherwise a copy whose k-th (1-based) entry
    is ``0.9 * 2 pi / num_frames``.
    """
    if not 1 <= k <= frequencies.numel():
        raise ValueError(f"RIFLEx k={k} must be in 1..{frequencies.numel()} (the temporal RoPE frequencies)")
    if num_frames <= n_k:
        return frequencies
    lowered = frequencies.clone()
    lowered[k - 1] = RIFLEX_MARGIN * 2 * math.pi / num_frames
    return lowered


def resize_crop_region(grid_hw: tuple[int, int], base_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a grid of ``grid_hw`` patches sits when fitted (aspect kept) into the base grid.

    The RoPE coordinates of a frame span this region of the base grid, so a video of another
    size sees positions on the scale the model was trained on. Returns ((top, left), (bottom, right)).
    """
    (h, w), (base_h, base_w) = grid_hw, base_hw
    if h / w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / h * w))
    else:
        rw, rh = base_w, int(round(base_w / w * h))
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_frequencies(dim: int, theta: float) -> torch.Tensor:
    """The dim/2 rotation frequencies of one RoPE axis, ``theta^(-2j/dim)`` for j = 0..dim/2-1 (float32)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def _rope_axis(frequencies: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of one axis, each [len(positions), 2 * len(frequencies)], every frequency repeated for its
    (re, im) pair."""
    angles = torch.outer(positions, frequencies)  # [N, dim/2]
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


@lru_cache(maxsize=16)
def rope_table(
    config: DiTConfig, t: int, h: int, w: int, riflex: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE cos/sin for a ``t x h x w`` grid of patches: two float32 tensors [t*h*w, head_dim].

    Spatial coordinates cover the crop region of the base grid in ``n`` even steps from its start
    to ``end * (n - 1) / n`` (the reference's exact spacing); time is simply 0..t-1, so longer videos
    extend the positions without interpolation (ExVideo's choice). Under the slice rule (CogVideoX 1.5)
    every axis is 0..n-1 (``t`` temporal patches), the first rows / columns of the max grid. ``riflex`` = (k, N_k) lowers the k-th
    temporal frequency when t > N_k (``diffsynth_cog.denoise.riflex``); part of the cache key.
    """
    pos_t, pos_h, pos_w = rope_coordinates(config, t, h, w)
    d = config.attention_head_dim
    dim_t, dim_hw = d // 4, d // 8 * 3
    freq_t = rope_frequencies(dim_t, config.rope_theta)
    if riflex is not None:
        freq_t = riflex_frequencies(freq_t, t, *riflex)
    freq_hw = rope_frequencies(dim_hw, config.rope_theta)
    parts = [_rope_axis(freq_t, pos_t), _rope_axis(freq_hw, pos_h), _rope_axis(freq_hw, pos_w)]
    out = []
    for k in range(2):  # cos, then sin
        ct, ch, cw = (part[k] for part in parts)
        grid = torch.cat(
            [
                ct[:, None, None, :].expand(t, h, w, dim_t),
                ch[None, :, None, :].expand(t, h, w, dim_hw),
                cw[None, None, :, :].expand(t, h, w, dim_hw),
            ],
            dim=-1,
        )  # [t, h, w, head_dim]
        out.append(grid.reshape(t * h * w, d))
    return out[0], out[1]


def rope_coordinates(config: DiTConfig, t: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The RoPE coordinates (time, rows, columns) of a ``t x h x w`` patch grid under the family's rule."""
    p = config.patch_size
    base_h, base_w = config.sample_height // p, config.sample_width // p
    if config.family.positions == ROPE_SLICE:
        if h > base_h or w > base_w:
            raise ValueError(
                f"a {h}x{w} patch grid exceeds this transformer's RoPE grid of {base_h}x{base_w} patches "
                f"(sample_height/sample_width {config.sample_height}x{config.sample_width} latents): use a smaller "
                "size or DiT tiles"
            )
        return tuple(torch.arange(n, dtype=torch.float32) for n in (t, h, w))
    (top, left), (bottom, right) = resize_crop_region((h, w), (base_h, base_w))
    pos_h = torch.linspace(top, bottom * (h - 1) / h, h, dtype=torch.float32)
    pos_w = torch.linspace(left, right * (w - 1) / w, w, dtype=torch.float32)
    pos_t = torch.linspace(0, t * (t - 1) / t, t, dtype=torch.float32)
    return pos_t, pos_h, pos_w


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[N, dim] = [sin(pos * w_i), cos(pos * w_i)], w_i = 10000^(-i / (dim/2)); computed in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


@lru_cache(maxsize=16)
def sincos_table(config: DiTConfig, t: int, h: int, w: int) -> torch.Tensor:
    """Fixed 3D sin-cos position table [t*h*w, inner_dim] (float64), token order (t, h, w).

    A quarter of the channels encode time, the rest space; of the spatial half-and-half, the
    first half encodes the column and the second the row (the reference's layout).
    """
    dim = config.inner_dim
    s, ts = config.spatial_interpolation_scale, config.temporal_interpolation_scale
    cols = (torch.arange(w, dtype=torch.float32) / s).repeat(h)  # [h*w], column index of each patch
    rows = (torch.arange(h, dtype=torch.float32) / s).repeat_interleave(w)  # [h*w]
    spatial = torch.cat([_sincos_1d(dim * 3 // 8, cols), _sincos_1d(dim * 3 // 8, rows)], dim=1)  # [h*w, 3D/4]
    temporal = _sincos_1d(dim // 4, torch.arange(t, dtype=torch.float32) / ts)  # [t, D/4]
    table = torch.cat([temporal[:, None, :].expand(t, h * w, -1), spatial[None].expand(t, -1, -1)], dim=-1)
    return table.reshape(t * h * w, dim)
