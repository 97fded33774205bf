"""Block-sparse spatio-temporal attention: static masks over [text, video] through FlexAttention.

Dense attention over a video's tokens costs the square of its length; at 257 frames it is most of a
step. Neighbouring frames carry most of what a token needs, so a *static* mask that keeps the text
global and lets each video token see only some frames makes the work grow linearly with the length.
Two masks, both of the form "frame pair (i, j) at distance d = |i - j| attends when ``keep[d]``, and
then only between tokens at most ``width[d]`` apart in the frame's row-major order":

  * :class:`TemporalWindowAttention` ``(w)``: frames within +-w latent frames, whole frames;
  * :class:`RadialAttention` (Radial Attention, arXiv 2506.19852): frames at distance <= 1 whole; beyond,
    the spatial band halves each time the distance doubles (bands 2-3, 4-7, 8-15, ...), and once it is
    narrower than ``min_width`` tokens it stays ``min_width`` wide but only every 2nd, 4th, ... frame
    of the band is kept, so every band costs about the same while the total grows like L log L.

Both keep the text global (text queries see everything, every query sees the text) and, by default,
frame 0 as an attention sink (every query sees the first latent frame). Radial Attention's own code
(mit-han-lab/radial-attention) rounds its mask to 128-token blocks for its kernel; here the mask is
the token-level definition and FlexAttention evaluates it inside partially covered blocks.

Mechanics: a mask is a ``mask_mod(b, h, q_idx, kv_idx)`` predicate; its block mask (which 128 x 128
tiles are empty, partial or full) is built once per token layout and length, chunk by chunk with
bounded memory (:func:`block_mask_from_mask_mod`), and cached with the attention object, so compiled
blocks see the same object at every step. Attention runs through ``torch.compile(flex_attention)`` on
GPUs (inside compiled blocks the compiler traces it in place), eagerly on the CPU; FlexAttention has a
backward on GPUs, so the masks train. On the CPU, where FlexAttention has no backward, a call that
needs gradients takes the same mask densely through ``scaled_dot_product_attention``.

Inside a sequence split (``denoiser.TokenSplit``): the attention object sees the whole gathered
sequence (Ulysses: all tokens, a share of the heads), which is what the mask needs; a split that pads
the sequence gets the padding keys masked out. A split that keeps a share of the *keys* per process
(ring attention) cannot apply a mask defined on global indices through this object: that split
refuses masks.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from diffsynth_cog.models.attention import BACKENDS
from diffsynth_cog.models.dit import TokenLayout

logger = logging.getLogger(__name__)

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


def block_mask_from_mask_mod(
    mask_mod: MaskMod, length: int, device: torch.device | str, block_size: int = BLOCK_SIZE
) -> BlockMask:
    """FlexAttention's block mask of ``mask_mod`` over a ``length`` x ``length`` attention, one head and batch
    entry broadcast. The same blocks as ``create_block_mask`` (partial / full, out-of-range entries counted
    as masked), computed a few block rows at a time so memory stays bounded at 500-frame lengths."""
    n_blocks = math.ceil(length / block_size)
    padded = n_blocks * block_size
    rows = max(1, _MASK_CHUNK_ELEMENTS // (block_size * padded))
    kv = torch.arange(padded, device=device, dtype=torch.int32)
    zero = torch.zeros((), dtype=torch.int32, device=device)
    partial, full = [], []
    for first in range(0, n_blocks, rows):
        q = torch.arange(first * block_size, min(first + rows, n_blocks) * block_size, device=device, dtype=torch.int32)
        inside = (q[:, None] < length) & (kv[None, :] < length)
        allowed = mask_mod(zero, zero, q[:, None], kv[None, :]) & inside  # [rows*bs, padded]
        count = allowed.view(-1, block_size, n_blocks, block_size).sum(dim=(1, 3))  # [rows, n_blocks]
        full.append(count == block_size * block_size)
        partial.append((count > 0) & (count < block_size * block_size))

    def ordered(dense: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.cat(dense).to(torch.int32)[None, None]  # [1, 1, n_blocks, n_blocks]
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


_compiled_flex: Callable[..., torch.Tensor] | None = None
# Smaller tiles for GPUs where the compiler's default FlexAttention tiles need more shared memory than a block
# may have (seen on an H200: 240 KiB asked, 227 KiB allowed); used from the first such failure on.
SMALL_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2, "num_warps": 4}
_kernel_options: dict[str, int] | None = None


def flex_attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention on [B, H, L, D] tensors with a block mask: traced in place inside compiled code, compiled
    once (``dynamic=False``) for eager calls on GPUs, the eager reference implementation on the CPU."""
    global _compiled_flex, _kernel_options
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, kernel_options=_kernel_options)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    try:
        return _compiled_flex(q, k, v, block_mask=block_mask, kernel_options=_kernel_options)
    except Exception as e:  # the compiler's out-of-resources error (an InductorError wrapping it)
        if _kernel_options is not None or "out of resource" not in str(e):
            raise
        logger.warning("FlexAttention's default tiles do not fit this GPU's shared memory; using %s", SMALL_TILES)
        _kernel_options = dict(SMALL_TILES)
        return _compiled_flex(q, k, v, block_mask=block_mask, kernel_options=_kernel_options)


class MaskedAttention:
    """The attention of one token layout under one mask: q, k, v [B, L, H, D] -> [B, L, H, D].

    Holds the block mask of each sequence length it has seen (the layout's own, built up front; a padded
    length on first use)."""

    def __init__(self, layout: TokenLayout, bands: FrameBands, device: torch.device, block_size: int) -> None:
        self.layout, self.bands, self.device, self.block_size = layout, bands, device, block_size
        self.mask_mod = frame_band_mask_mod(layout, bands, device)
        self.block_masks: dict[int, BlockMask] = {}
        self.prepare(layout.n_tokens)

    @torch.compiler.disable
    def prepare(self, length: int) -> BlockMask:
        """The block mask for sequences of ``length`` tokens (built once)."""
        if length < self.layout.n_tokens:
            raise ValueError(f"attention over {length} tokens; the call's layout has {self.layout.n_tokens}")
        if length not in self.block_masks:
            self.block_masks[length] = block_mask_from_mask_mod(self.mask_mod, length, self.device, self.block_size)
        return self.block_masks[length]

    def dense_mask(self, length: int) -> torch.Tensor:
        """The mask as a [length, length] boolean tensor (True = attends): for tests and the CPU backward."""
        idx = torch.arange(length, device=self.device, dtype=torch.int32)
        zero = torch.zeros((), dtype=torch.int32, device=self.device)
        return self.mask_mod(zero, zero, idx[:, None], idx[None, :])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        length = q.shape[1]
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, L, D], FlexAttention's layout
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense_mask(length))
        else:
            block_mask = self.block_masks.get(length)
            if block_mask is None:
                block_mask = self.prepare(length)
            out = flex_attention_call(q, k, v, block_mask)
        return out.transpose(1, 2)


class _BandedAttention:
    """An attention part of the denoiser (``build(layout, device) -> attend``) from per-distance bands."""

    name = "banded"
    _CACHE = 8  # layouts kept (windows and tiles reuse a handful)

    def __init__(self, sink: bool, block_size: int) -> None:
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16; got {block_size}")
        self.sink = sink
        self.block_size = block_size
        self._built: OrderedDict[tuple[TokenLayout, torch.device], MaskedAttention] = OrderedDict()

    def bands(self, layout: TokenLayout) -> FrameBands:
        raise NotImplementedError

    def build(self, layout: TokenLayout, device: torch.device) -> MaskedAttention:
        """The attention of calls with this layout; one shared object per (layout, device)."""
        key = (layout, torch.device(device))
        attend = self._built.get(key)
        if attend is None:
            attend = MaskedAttention(layout, self.bands(layout), torch.device(device), self.block_size)
            self._built[key] = attend
            while len(self._built) > self._CACHE:
                self._built.popitem(last=False)
        self._built.move_to_end(key)
        return attend


class TemporalWindowAttention(_BandedAttention):
    """Every video token sees the whole latent frames within +-``window`` of its own, the text, and (``sink``)
    latent frame 0; text sees everything. ``window >= T - 1`` is dense attention."""

    def __init__(self, window: int, sink: bool = True, block_size: int = BLOCK_SIZE) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be an integer >= 0 (latent frames each side); got {window!r}")
        super().__init__(sink, block_size)
        self.window = window
        self.name = f"window{window}" + ("" if sink else "-nosink")

    def bands(self, layout: TokenLayout) -> FrameBands:
        t, per = layout.grid[0], layout.tokens_per_frame
        return FrameBands(keep=tuple(d <= self.window for d in range(t)), width=(per,) * t, sink=self.sink)


class RadialAttention(_BandedAttention):
    """Radial Attention's static mask (arXiv 2506.19852), at token level.

    With ``P = 2^bit_length(tokens per frame)`` and ``g = bit_length(d)`` the band of frame distance d:
    d <= ``dense_distance``: whole frames; otherwise tokens within ``max(P / 2^g * decay, min_width)`` of
    each other, and where ``P / 2^g < min_width`` only distances that are multiples of
    ``min_width / (P / 2^g)`` are kept. Defaults: the reference's (decay 1, dense distance 1 as for its
    HunyuanVideo setting, min width 128 = its block size), frame 0 a sink, text global.
    """

    def __init__(
        self,
        decay: float = 1.0,
        dense_distance: int = 1,
        min_width: int = BLOCK_SIZE,
        sink: bool = True,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        if not decay > 0:
            raise ValueError(f"decay must be > 0; got {decay}")
        if dense_distance < 0 or min_width < 1:
            raise ValueError(f"dense_distance must be >= 0 and min_width >= 1; got {dense_distance}, {min_width}")
        super().__init__(sink, block_size)
        self.decay, self.dense_distance, self.min_width = float(decay), dense_distance, min_width
        self.name = (
            "radial"
            if (decay, dense_distance, min_width, sink) == (1.0, 1, BLOCK_SIZE, True)
            else (f"radial(decay={decay},dense={dense_distance},min_width={min_width},sink={sink})")
        )

    def bands(self, layout: TokenLayout) -> FrameBands:
        t, per = layout.grid[0], layout.tokens_per_frame
        top = 2 ** per.bit_length()
        keep, width = [], []
        for d in range(t):
            if d <= self.dense_distance:
                keep.append(True)
                width.append(per)
                continue
            band = top / 2 ** d.bit_length()  # the band's natural width: halves as the distance doubles
            width.append(int(max(band * self.decay, self.min_width)))
            keep.append(band >= self.min_width or d % int(self.min_width / band) == 0)
        return FrameBands(keep=tuple(keep), width=tuple(width), sink=self.sink)


def parse_attention(spec: str) -> str | _BandedAttention:
    """A user's attention choice: a dense kernel name (``models.attention.BACKENDS``), ``window:W`` (+-W latent
    frames), ``window:W:nosink``, ``radial`` or ``radial:DECAY``."""
    if spec in BACKENDS:
        return spec
    name, _, rest = spec.partition(":")
    args = [a for a in rest.split(":") if a] if rest else []
    try:
        if name == "window" and 1 <= len(args) <= 2 and (len(args) == 1 or args[1] == "nosink"):
            return TemporalWindowAttention(int(args[0]), sink=len(args) == 1)
        if name == "radial" and len(args) <= 1:
            return RadialAttention(decay=float(args[0])) if args else RadialAttention()
    except ValueError as e:
        raise ValueError(f"attention {spec!r}: {e}") from None
    raise ValueError(
        f"unknown attention {spec!r}; valid: a kernel {BACKENDS}, 'window:W' (W latent frames each side), "
        "'window:W:nosink', 'radial' or 'radial:DECAY'"
    )
