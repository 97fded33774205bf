"""The contract between the DiT and the denoiser's parts: where a call's tokens sit (``TokenLayout``)
and what flows between the DiT's stages (``DiTState``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffsynth_cog.models.attention import Attend


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one DiT call sit: ``n_text`` text tokens, then the video tokens of a
    ``grid`` = (temporal patches, patch rows, patch columns), flattened temporal patch by temporal patch,
    row by row. A temporal patch holds ``patch_t`` latent frames (1 for CogVideoX 1.0, where the first axis
    is simply the latent frames; 2 for CogVideoX 1.5). Parts that reason in time (masks, windows) count
    in whole temporal patches: a "frame" of the token grid is one temporal patch."""

    n_text: int
    grid: tuple[int, int, int]
    patch_t: int = 1

    @property
    def latent_frames(self) -> int:
        """Latent frames the video tokens cover (temporal patches x ``patch_t``)."""
        return self.grid[0] * self.patch_t

    @property
    def tokens_per_frame(self) -> int:
        """Tokens of one temporal patch (one latent frame for CogVideoX 1.0)."""
        return self.grid[1] * self.grid[2]

    @property
    def n_video(self) -> int:
        return self.grid[0] * self.tokens_per_frame

    @property
    def n_tokens(self) -> int:
        return self.n_text + self.n_video


@dataclass(frozen=True)
class DiTState:
    """What flows between the DiT's stages: the two token streams, the shared conditioning, and how
    the blocks attend.

    video [B, Lv, D], text [B, Lt, D], cond [B, time_embed_dim], rope: cos/sin [Lt + Lv, head_dim] or None;
    shape: (B, T, H, W) of the latents; layout: the full token sequence; attend: the attention part.
    Parts of the denoiser may hand the blocks a share of the tokens (a sequence split): then video, text
    and rope hold that share, while shape and layout still describe the whole call.
    """

    video: torch.Tensor
    text: torch.Tensor
    cond: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None
    shape: tuple[int, int, int, int]
    layout: TokenLayout
    attend: Attend
