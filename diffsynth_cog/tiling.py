"""Spatial tiling of the DiT for resolutions above its base grid.

The latent frame is split into overlapping tiles (every tile sees all frames); each tile runs
through the DiT on its own, with positions computed for the tile, and the overlaps are blended
with linear ramps, so seams fade instead of showing.
"""

from __future__ import annotations

import torch

from diffsynth_cog.models.dit import CogDiT


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering ``size`` with tiles of ``tile`` every ``stride``; the last tile is
    shifted back to end exactly at ``size`` (no partial tiles)."""
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return sorted(set(starts))


def _ramp(length: int, ramp: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """Blend weights along one axis: rising over ``ramp`` samples at an inner edge, flat at an image edge."""
    pos = torch.arange(length, dtype=torch.float32)
    w = torch.ones(length)
    if ramp > 0:
        if not at_start:
            w = torch.minimum(w, (pos + 1) / (ramp + 1))
        if not at_end:
            w = torch.minimum(w, (length - pos) / (ramp + 1))
    return w


def tiled_dit_forward(
    dit: CogDiT,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_emb: torch.Tensor,
    tile_size: tuple[int, int] = (60, 90),
    tile_stride: tuple[int, int] = (30, 45),
) -> torch.Tensor:
    """``dit(latents, timestep, prompt_emb)`` computed on overlapping spatial tiles.

    latents [B, C_in, T, H, W] -> [B, C_out, T, H, W]. ``tile_size`` / ``tile_stride`` are in latent
    rows/columns; tile sizes must be multiples of the patch size (strides need not be: a tile's
    patches are aligned to its own corner).
    """
    b, _, t, h, w = latents.shape
    p = dit.config.patch_size
    th, tw = min(tile_size[0], h), min(tile_size[1], w)
    sh, sw = tile_stride
    if th % p or tw % p:
        raise ValueError(f"tile_size {tile_size} must be a multiple of the patch size {p}")
    if (th, tw) == (h, w):
        return dit(latents, timestep, prompt_emb)
    if not (0 < sh <= th and 0 < sw <= tw):
        raise ValueError(f"tile_stride {tile_stride} must be positive and at most the tile size {(th, tw)}")
    out = torch.zeros(b, dit.config.out_channels, t, h, w, device=latents.device, dtype=torch.float32)
    weight = torch.zeros(1, 1, 1, h, w, device=latents.device, dtype=torch.float32)
    rows, cols = tile_starts(h, th, sh), tile_starts(w, tw, sw)
    for r in rows:
        for c in cols:
            tile = dit(latents[:, :, :, r : r + th, c : c + tw], timestep, prompt_emb).float()
            wr = _ramp(th, th - sh, r == 0, r + th == h)
            wc = _ramp(tw, tw - sw, c == 0, c + tw == w)
            mask = (wr[:, None] * wc[None, :]).to(latents.device)[None, None, None]  # [1, 1, 1, th, tw]
            out[:, :, :, r : r + th, c : c + tw] += tile * mask
            weight[:, :, :, r : r + th, c : c + tw] += mask
    return (out / weight).to(latents.dtype)
