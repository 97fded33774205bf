"""Temporal windows frame by frame: the token-exact window mask computed with the call's dense kernel.

A temporal window (``window:W``: every video token sees the frames within +-W of its own, the text, and frame 0 as a
sink; text sees everything) keeps, for all the queries of one frame, the same keys: the text (and sink frame) at
the start of the [text, video] sequence and the band of frames f-W..f+W, which is contiguous. So instead of one
block-sparse kernel over the whole sequence (FlexAttention, :mod:`diffsynth_cog.denoise.masks`), the window can be
computed as one dense attention per frame, its queries against those keys, with the kernel the call would use
for dense attention (FlashAttention-3 on Hopper): no tile of it is partial, so nothing is evaluated element by
element, and it keeps the dense kernel's speed and precision. Where the band touches the sink frame the keys are
one slice of the sequence; beyond, the sink's keys and the band's are joined (a copy of the band's keys and values,
small beside the attention over them).

The mask is exactly the token-level one (``window:W:token``); the spec ``window:W:frame`` (``granularity="frame"``)
selects this way of computing it. Text queries attend to every token in one call; padding a sequence split adds
(tokens past the layout) is never a key, and padding queries see the text, as in the other masks.
"""

from __future__ import annotations

import torch

from diffsynth_cog.denoise.block_masks import FrameBands, dense_mask, frame_band_mask_mod
from diffsynth_cog.models.attention import Attend
from diffsynth_cog.models.tokens import TokenLayout


class FrameWindowAttention:
    """The attention of one token layout under a temporal window's ``bands`` (whole frames within +-W, frame 0 a
    sink if ``bands.sink``; :meth:`TemporalWindowAttention.bands <diffsynth_cog.denoise.masks.TemporalWindowAttention
    .bands>`), one ``kernel`` call per frame: q, k, v [B, L, H, D] -> [B, L, H, D], L >= the layout's tokens."""

    def __init__(self, layout: TokenLayout, bands: FrameBands, kernel: Attend, device: torch.device) -> None:
        window = sum(bands.keep) - 1  # the distances kept: 0..W
        per = layout.tokens_per_frame
        if window < 0 or not all(bands.keep[: window + 1]) or any(w < per for w in bands.width[: window + 1]):
            raise ValueError("frame-by-frame attention takes a temporal window: whole frames at distances 0..W only")
        self.layout, self.window, self.sink, self.kernel, self.device = layout, window, bands.sink, kernel, device
        self.mask_mod = frame_band_mask_mod(layout, bands, device)

    def key_ranges(self, frame: int) -> list[tuple[int, int]]:
        """The [start, end) token ranges of the keys frame ``frame``'s queries see (one or two ranges)."""
        n_text, per, t = self.layout.n_text, self.layout.tokens_per_frame, self.layout.grid[0]
        prefix = n_text + (per if self.sink else 0)  # the text, and the sink frame
        start = n_text + max(frame - self.window, 0) * per
        end = n_text + min(frame + self.window + 1, t) * per
        return [(0, end)] if start <= prefix else [(0, prefix), (start, end)]

    def dense_mask(self, length: int) -> torch.Tensor:
        """The mask as a [length, length] boolean tensor (True = attends): for tests."""
        return dense_mask(self.mask_mod, length, self.device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        layout, length = self.layout, q.shape[1]
        if length < layout.n_tokens:
            raise ValueError(f"attention over {length} tokens; the call's layout has {layout.n_tokens}")
        n_text, per, n_tokens = layout.n_text, layout.tokens_per_frame, layout.n_tokens
        outs = [self.kernel(q[:, :n_text], k[:, :n_tokens], v[:, :n_tokens])] if n_text else []  # text: all
        for frame in range(layout.grid[0]):
            first = n_text + frame * per
            ranges = self.key_ranges(frame)
            if len(ranges) == 1:
                keys, values = k[:, : ranges[0][1]], v[:, : ranges[0][1]]
            else:
                keys = torch.cat([k[:, a:b] for a, b in ranges], dim=1)
                values = torch.cat([v[:, a:b] for a, b in ranges], dim=1)
            outs.append(self.kernel(q[:, first : first + per], keys, values))
        if length > n_tokens:  # padding queries see the text
            outs.append(self.kernel(q[:, n_tokens:], k[:, :n_text], v[:, :n_text]))
        return torch.cat(outs, dim=1)
