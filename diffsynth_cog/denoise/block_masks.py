"""Block masks: the geometry of the block-sparse attention masks, as mask predicates and FlexAttention block masks.

A mask is given as :class:`FrameBands` over the [text, video] sequence of a token layout: per frame distance,
whether frames that far apart attend and how far apart (row-major token index within the frame) their tokens
may be, plus the sink frame; the text is always global. This module turns that into what FlexAttention takes:

  * :func:`frame_band_mask_mod`: the token-level predicate ``mask_mod(b, h, q_idx, kv_idx)``;
  * :func:`block_table`: its block granularity, ``[n_blocks, n_blocks]`` booleans (a pair of ``block_size``-token
    blocks attends iff any token pair inside it does), computed exactly without visiting every token pair, and
    :func:`block_mask_mod`, the predicate of such a table;
  * :func:`block_mask_from_mask_mod`: FlexAttention's block mask of a predicate (which 128 x 128 tiles are empty,
    partial or full), built chunk by chunk with bounded memory; a block-granular mask passes its block table, so
    only the tiles at the end of the sequence are evaluated.

Each is a pure function of the layout, the bands and the device. The mask kinds that choose the bands, the
attention that builds and applies these block masks, and the registry of mask specs are
:mod:`diffsynth_cog.denoise.masks`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask

from diffsynth_cog.models.tokens import TokenLayout

BLOCK_SIZE = 128  # FlexAttention's tile (query and key tokens)
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_MASK_CHUNK_ELEMENTS = 1 << 24  # query x key entries evaluated at once when building a block mask


@dataclass(frozen=True)
class FrameBands:
    """A spatio-temporal mask by frame distance: ``keep[d]`` says whether frames d apart attend, ``width[d]``
    how far apart (row-major token index within the frame) their tokens may be; ``sink``: every query sees
    latent frame 0. Text is always global."""

    keep: tuple[bool, ...]
    width: tuple[int, ...]
    sink: bool

    def __post_init__(self) -> None:
        if len(self.keep) != len(self.width) or not self.keep:
            raise ValueError("keep and width need one entry per frame distance 0..T-1")


def frame_band_mask_mod(layout: TokenLayout, bands: FrameBands, device: torch.device | str) -> MaskMod:
    """The mask predicate of ``bands`` over the [text, video] sequence of ``layout`` (indices past the
    layout's tokens are padding: no query sees them as keys, and they see the text)."""
    t = layout.grid[0]
    if len(bands.keep) != t:
        raise ValueError(f"the mask has {len(bands.keep)} frame distances; this call has {t} latent frames")
    n_text, per, n_video, n_tokens = layout.n_text, layout.tokens_per_frame, layout.n_video, layout.n_tokens
    # One int32 lookup per distance (the compiled kernel loads it per entry): the band's width, -1 where the frame
    # pair does not attend at all.
    width = torch.tensor([w if k else -1 for k, w in zip(bands.keep, bands.width, strict=True)], device=device)
    width = width.to(torch.int32)
    sink = bands.sink

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q = (q_idx - n_text).clamp(0, n_video - 1)  # video token index (text and padding clamped; see below)
        k = (kv_idx - n_text).clamp(0, n_video - 1)
        q_frame, k_frame = q // per, k // per
        distance = (q_frame - k_frame).abs()
        frames = ((q - q_frame * per) - (k - k_frame * per)).abs() <= width[distance]
        if sink:
            frames = frames | (k_frame == 0)
        sees = (q_idx < n_text) | (frames & (q_idx < n_tokens))  # text: everything; video: its bands
        return ((kv_idx < n_text) | sees) & (kv_idx < n_tokens)

    return mask_mod


def dense_mask(mask_mod: MaskMod, length: int, device: torch.device | str) -> torch.Tensor:
    """A mask predicate over ``length`` tokens as a [length, length] boolean tensor (True = attends): for tests and
    the CPU backward."""
    idx = torch.arange(length, device=device, dtype=torch.int32)
    zero = torch.zeros((), dtype=torch.int32, device=device)
    return mask_mod(zero, zero, idx[:, None], idx[None, :])


def block_table(
    layout: TokenLayout, token_mask_mod: MaskMod, device: torch.device | str, block_size: int
) -> torch.Tensor:
    """The block granularity of a :func:`frame_band_mask_mod`: ``[n_blocks, n_blocks]`` booleans over the
    layout's tokens (blocks of ``block_size`` from token 0), True where any query token of the first block
    attends to any key token of the second.

    Exact without visiting every token pair: cut the tokens into runs that share a block and a frame (the
    text is one run); between two runs the text and sink terms are constant and the band term only asks
    how close the row-major positions come, so the rule at the pair's closest positions decides. Runs are
    compared a few query blocks at a time (bounded memory)."""
    n_text, per, n_video, n_tokens, t = (
        layout.n_text,
        layout.tokens_per_frame,
        layout.n_video,
        layout.n_tokens,
        layout.grid[0],
    )
    n_blocks = math.ceil(n_tokens / block_size)
    cuts = torch.cat(
        [
            torch.arange(0, n_tokens, block_size),
            torch.tensor([n_text, n_tokens]),
            n_text + per * torch.arange(1, t),
        ]
    ).unique()  # sorted: every run starts at a cut and ends before the next
    first, last = cuts[:-1], cuts[1:] - 1
    block = first // block_size
    # [n_blocks, S] first and last index of each block's runs; a block with fewer than S repeats its first run.
    count = torch.bincount(block, minlength=n_blocks)
    offset = torch.cumsum(count, 0) - count  # each block's first run
    slot = torch.arange(len(first)) - offset[block]
    runs = int(count.max())
    starts, ends = first[offset][:, None].repeat(1, runs), last[offset][:, None].repeat(1, runs)
    starts[block, slot], ends[block, slot] = first, last
    frame = (starts - n_text).clamp(0, n_video - 1) // per  # text: frame 0 (its rule ignores frames)
    starts, ends, frame = (x.to(device=device, dtype=torch.int32) for x in (starts, ends, frame))

    zero = torch.zeros((), dtype=torch.int32, device=device)
    rows = max(1, _MASK_CHUNK_ELEMENTS // 4 // (runs * runs * n_blocks))  # a dozen temporaries per entry
    k_start, k_end, k_frame = (x[None, None] for x in (starts, ends, frame))  # [1, 1, n_blocks, S]
    table = []
    for first_row in range(0, n_blocks, rows):
        chunk = slice(first_row, first_row + rows)
        q_start, q_end, q_frame = (x[chunk, :, None, None] for x in (starts, ends, frame))  # [rows, S, 1, 1]
        shift = (k_frame - q_frame) * per  # key index - query index of equal positions in their frames
        low = torch.maximum(q_start, k_start - shift)  # the first common position, if the runs overlap
        overlap = low <= torch.minimum(q_end, k_end - shift)
        before = q_end < k_start - shift  # the query run ends before the key run's positions begin
        q = torch.where(overlap, low, torch.where(before, q_end, q_start))
        k = torch.where(overlap, low + shift, torch.where(before, k_start, k_end))
        table.append(token_mask_mod(zero, zero, q, k).any(dim=3).any(dim=1))  # [rows, n_blocks]
    return torch.cat(table)


def block_mask_mod(layout: TokenLayout, table: torch.Tensor, block_size: int) -> MaskMod:
    """The mask predicate of a block table (:func:`block_table`) over the [text, video] sequence of ``layout``:
    tokens in blocks the table keeps attend; as at token level, padding keys are masked out and padding
    queries see the text."""
    n_text, n_tokens, last = layout.n_text, layout.n_tokens, table.shape[0] - 1

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        kept = table[(q_idx // block_size).clamp(max=last), (kv_idx // block_size).clamp(max=last)]
        return ((kv_idx < n_text) | (kept & (q_idx < n_tokens))) & (kv_idx < n_tokens)

    return mask_mod


def _block_counts(
    mask_mod: MaskMod, length: int, q_blocks: range, kv_blocks: range, device: torch.device | str, block_size: int
) -> torch.Tensor:
    """How many entries of each (query block, key block) pair ``mask_mod`` keeps, out-of-range entries counted as
    masked: ``[len(q_blocks), len(kv_blocks)]``, evaluated a few block rows at a time."""
    if not q_blocks or not kv_blocks:
        return torch.zeros(len(q_blocks), len(kv_blocks), dtype=torch.int64, device=device)
    kv = torch.arange(kv_blocks.start * block_size, kv_blocks.stop * block_size, device=device, dtype=torch.int32)
    zero = torch.zeros((), dtype=torch.int32, device=device)
    rows = max(1, _MASK_CHUNK_ELEMENTS // (block_size * len(kv)))
    counts = []
    for first in range(q_blocks.start, q_blocks.stop, rows):
        stop = min(first + rows, q_blocks.stop)
        q = torch.arange(first * block_size, stop * block_size, device=device, dtype=torch.int32)
        inside = (q[:, None] < length) & (kv[None, :] < length)
        allowed = mask_mod(zero, zero, q[:, None], kv[None, :]) & inside  # [rows*bs, kv]
        counts.append(allowed.view(stop - first, block_size, len(kv_blocks), block_size).sum(dim=(1, 3)))
    return torch.cat(counts)


def block_mask_from_mask_mod(
    mask_mod: MaskMod,
    length: int,
    device: torch.device | str,
    block_size: int = BLOCK_SIZE,
    uniform: torch.Tensor | None = None,
) -> BlockMask:
    """FlexAttention's block mask of ``mask_mod`` over a ``length`` x ``length`` attention, one head and batch
    entry broadcast. The same blocks as ``create_block_mask`` (partial / full, out-of-range entries counted
    as masked), computed a few block rows at a time so memory stays bounded at 500-frame lengths.

    ``uniform``: an ``[n, n]`` boolean table promising that ``mask_mod`` is all True (True) or all False on each
    of the leading n x n block pairs (a block-granular mask); those blocks are taken from it as full or empty
    and only the rest is evaluated."""
    n_blocks = math.ceil(length / block_size)
    n = 0 if uniform is None else uniform.shape[0]
    if n * block_size > length or (uniform is not None and uniform.shape != (n, n)):
        raise ValueError(f"uniform must be [n, n] with n * block_size <= {length}; got {tuple(uniform.shape)}")
    area = block_size * block_size
    full = torch.zeros(n_blocks, n_blocks, dtype=torch.bool, device=device)
    partial = torch.zeros_like(full)
    if uniform is not None:
        full[:n, :n] = uniform.to(device)
    for q_blocks, kv_blocks in ((range(n, n_blocks), range(n_blocks)), (range(n), range(n, n_blocks))):
        count = _block_counts(mask_mod, length, q_blocks, kv_blocks, device, block_size)
        full[q_blocks.start : q_blocks.stop, kv_blocks.start : kv_blocks.stop] = count == area
        partial[q_blocks.start : q_blocks.stop, kv_blocks.start : kv_blocks.stop] = (count > 0) & (count < area)

    def ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = blocks.to(torch.int32)[None, None]  # [1, 1, n_blocks, n_blocks]
        indices = torch.argsort(blocks, dim=-1, descending=True, stable=True)  # listed blocks first, in order
        return blocks.sum(-1).to(torch.int32), indices.to(torch.int32)

    kv_num, kv_indices = ordered(partial)
    full_num, full_indices = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_indices,
        full_num,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(length, length),
    )
