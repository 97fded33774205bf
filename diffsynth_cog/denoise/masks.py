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
frame 0 as an attention sink (every query sees the first latent frame).

"Frames" here are the token grid's time steps (``TokenLayout.grid[0]``): latent frames on CogVideoX 1.0,
whole temporal patches of 2 latent frames on CogVideoX 1.5, so a 1.5 mask never cuts a patch in two and
``window:W`` keeps +-W temporal patches (+-2W latent frames) there.

Granularity. A latent frame is rarely a whole number of 128-token tiles (480x720: 1350 tokens), so the
token-level bands (``granularity="token"``) cut most of the tiles they touch; FlexAttention evaluates the
mask element by element inside such *partial* tiles and skips that work only for *full* ones, and a
token-level radial mask ends up slower than dense attention. ``granularity="block"`` (the default, as
Radial Attention's own code rounds its mask to its kernel's 128-token blocks) decides per pair of
``block_size``-token blocks: the pair attends iff any token pair inside it does under the token-level
rule (:func:`~diffsynth_cog.denoise.block_masks.block_table`). That mask contains the token-level one: each
query sees the union of its block's bands rounded out to whole key blocks (under two blocks past its own band's
edges; both frames' bands where its block straddles two frames; global where its block holds text), and every
tile is full or empty except those cut by the end of the sequence. At 129
frames (480x720) the kept tiles hold 18.9 % of the token pairs for ``window:2`` (token level: 18.2 %)
and 48.5 % for ``radial`` (34.2 %).

A temporal window has a third way, ``granularity="frame"`` (``window:W:frame``): the token-exact window computed
frame by frame with the call's dense kernel (:mod:`~diffsynth_cog.denoise.frame_windows`), since all queries of a
frame see the same keys; radial bands are not whole frames and have no such form.

Mechanics: a mask is a ``mask_mod(b, h, q_idx, kv_idx)`` predicate; its block mask (which 128 x 128
tiles are empty, partial or full) is built once per token layout and length, chunk by chunk with
bounded memory (:func:`~diffsynth_cog.denoise.block_masks.block_mask_from_mask_mod`; a block-granular mask
passes its block table, so only the tiles at the end of the sequence are evaluated), and cached with the
attention object, so compiled blocks see the same object at every step. Attention runs through
``torch.compile(flex_attention)`` on GPUs (inside compiled blocks the compiler traces it in place), eagerly on
the CPU; FlexAttention has a backward on GPUs, so the masks train. On the CPU, where FlexAttention has no
backward, a call that needs gradients takes the same mask densely through ``scaled_dot_product_attention``.

Inside a sequence split (``denoiser.TokenSplit``): the attention object sees the whole gathered
sequence (Ulysses: all tokens, a share of the heads), which is what the mask needs; a split that pads
the sequence gets the padding keys masked out. A split that keeps a share of the *keys* per process
(ring attention) cannot apply a mask defined on global indices through this object: that split
refuses masks.

This module holds the masks as the denoiser's attention parts: the mask kinds (:class:`TemporalWindowAttention`,
:class:`RadialAttention`), the attention that builds and applies their block masks (:class:`MaskedAttention`,
:func:`flex_attention_call`), and the :data:`MASKS` registry of mask specs with :func:`parse_attention`. The
masks' geometry (:class:`~diffsynth_cog.denoise.block_masks.FrameBands`, the mask predicates, the block tables
and the block masks built from them) is :mod:`diffsynth_cog.denoise.block_masks`'s; its public names are
importable from here too.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from diffsynth_cog.denoise.block_masks import (
    BLOCK_SIZE,
    FrameBands,
    block_mask_from_mask_mod,
    block_mask_mod,
    block_table,
    dense_mask,
    frame_band_mask_mod,
)
from diffsynth_cog.denoise.block_masks import MaskMod as MaskMod
from diffsynth_cog.denoise.frame_windows import FrameWindowAttention
from diffsynth_cog.models.attention import BACKENDS, Attend, choose_backend, dense_attention
from diffsynth_cog.models.tokens import TokenLayout
from diffsynth_cog.validators import NON_NEGATIVE_INT, one_of

logger = logging.getLogger(__name__)

_compiled_flex: Callable[..., torch.Tensor] | None = None
# Smaller tiles for GPUs where the compiler's default FlexAttention tiles need more shared memory than a block
# may have (seen on an H200: 240 KiB asked, 227 KiB allowed); used from the first such failure on.
SMALL_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2, "num_warps": 4}
_kernel_options: dict[str, int] | None = None
_eager_noted = False


def _eager_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention's eager implementation (the CPU's), which PyTorch greets with an 8-line warning on each
    process's first call: said once here, in one line, and PyTorch's is silenced."""
    global _eager_noted
    if _eager_noted:
        return flex_attention(q, k, v, block_mask=block_mask, kernel_options=_kernel_options)
    logger.info(
        "masked attention runs FlexAttention uncompiled on the %s (an unfused kernel: compiling it there needs a "
        "C++ toolchain and costs more time than CPU-sized runs save)",
        q.device.type,
    )
    _eager_noted = True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, kernel_options=_kernel_options)


def flex_attention_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention on [B, H, L, D] tensors with a block mask: traced in place inside compiled code, compiled
    once (``dynamic=False``) for eager calls on GPUs, the eager reference implementation on the CPU."""
    global _compiled_flex, _kernel_options
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, kernel_options=_kernel_options)
    if q.device.type != "cuda":
        return _eager_flex(q, k, v, block_mask)
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


# How a mask is applied: "block" and "token" through FlexAttention (the mask rounded out to whole blocks, or exact),
# "frame" (temporal windows only) exact, one dense-kernel call per frame (:mod:`~diffsynth_cog.denoise.frame_windows`).
FLEX_GRANULARITIES = ("block", "token")
GRANULARITIES = (*FLEX_GRANULARITIES, "frame")


class MaskedAttention:
    """The attention of one token layout under one mask: q, k, v [B, L, H, D] -> [B, L, H, D].

    ``granularity``: ``"token"`` applies the bands token by token, ``"block"`` per pair of ``block_size``-token
    blocks (:func:`block_table`; ``table`` holds it). Holds the block mask of each sequence length it has seen
    (the layout's own, built up front; a padded length on first use)."""

    def __init__(
        self, layout: TokenLayout, bands: FrameBands, device: torch.device, block_size: int, granularity: str
    ) -> None:
        one_of(FLEX_GRANULARITIES).require("granularity", granularity)
        self.layout, self.bands, self.device, self.block_size = layout, bands, device, block_size
        self.mask_mod = frame_band_mask_mod(layout, bands, device)
        self.table: torch.Tensor | None = None
        if granularity == "block":
            self.table = block_table(layout, self.mask_mod, device, block_size)
            self.mask_mod = block_mask_mod(layout, self.table, block_size)
        self.block_masks: dict[int, BlockMask] = {}
        self.prepare(layout.n_tokens)

    @torch.compiler.disable
    def prepare(self, length: int) -> BlockMask:
        """The block mask for sequences of ``length`` tokens (built once)."""
        if length < self.layout.n_tokens:
            raise ValueError(f"attention over {length} tokens; the call's layout has {self.layout.n_tokens}")
        if length not in self.block_masks:
            whole = self.layout.n_tokens // self.block_size  # blocks of real tokens only: the table decides them
            uniform = None if self.table is None else self.table[:whole, :whole]
            self.block_masks[length] = block_mask_from_mask_mod(
                self.mask_mod, length, self.device, self.block_size, uniform
            )
        return self.block_masks[length]

    def dense_mask(self, length: int) -> torch.Tensor:
        """The mask as a [length, length] boolean tensor (True = attends): for tests and the CPU backward."""
        return dense_mask(self.mask_mod, length, self.device)

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
    """An attention part of the denoiser (``build(layout, device, kernel) -> attend``) from per-distance bands."""

    name = "banded"
    _CACHE = 8  # layouts kept (windows and tiles reuse a handful)

    def __init__(self, sink: bool, block_size: int, granularity: str) -> None:
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16; got {block_size}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
        self.sink = sink
        self.block_size = block_size
        self.granularity = granularity
        self._built: OrderedDict[tuple, Attend] = OrderedDict()

    def bands(self, layout: TokenLayout) -> FrameBands:
        raise NotImplementedError

    @property
    def spec(self) -> str | None:
        """The ``attention=`` spec that makes this mask (:func:`parse_attention`'s inverse); None for settings no
        spec expresses (a part built in Python with other arguments)."""
        return None

    def _spec_suffix(self) -> str | None:
        """``:token`` / ``:frame`` for those granularities; None when the block size is not the one specs use."""
        if self.block_size != BLOCK_SIZE:
            return None
        return "" if self.granularity == "block" else f":{self.granularity}"

    def _name_suffix(self) -> str:
        return "" if self.granularity == "block" else f"-{self.granularity}"

    def check_compatible(self, parts: object) -> None:
        """A mask goes with every transformer and part (a split with ring attention refuses it, naming both)."""

    def build(self, layout: TokenLayout, device: torch.device, kernel: Attend | None = None) -> Attend:
        """The attention of calls with this layout; one shared object per (layout, device[, kernel]).

        ``kernel``: the dense attention the call would use without this part (the DiT's resolved kernel; None:
        the process default), for parts that compute their mask with it; FlexAttention's ignore it."""
        key = (layout, torch.device(device)) + ((kernel,) if self.granularity == "frame" else ())
        attend = self._built.get(key)
        if attend is None:
            attend = self._make(layout, torch.device(device), kernel)
            self._built[key] = attend
            while len(self._built) > self._CACHE:
                self._built.popitem(last=False)
        self._built.move_to_end(key)
        return attend

    def _make(self, layout: TokenLayout, device: torch.device, kernel: Attend | None) -> Attend:
        return MaskedAttention(layout, self.bands(layout), device, self.block_size, self.granularity)


class TemporalWindowAttention(_BandedAttention):
    """Every video token sees the whole latent frames within +-``window`` of its own, the text, and (``sink``)
    latent frame 0; text sees everything. ``window >= T - 1`` is dense attention.

    ``granularity="block"`` (default) rounds the mask out to ``block_size``-token blocks (each query sees the
    union of its block's windows in whole key blocks): the window and the sink frame gain less than a block
    past each edge, or, for a query whose block straddles two frames, one more frame on one side; ``"token"``
    is the exact frame window (named ``window{W}-token``)."""

    def __init__(
        self, window: int, sink: bool = True, block_size: int = BLOCK_SIZE, granularity: str = "block"
    ) -> None:
        NON_NEGATIVE_INT.described("an integer >= 0 (latent frames each side)").require("window", window)
        super().__init__(sink, block_size, granularity)
        self.window = window
        self.name = f"window{window}" + ("" if sink else "-nosink") + self._name_suffix()

    @property
    def spec(self) -> str | None:
        suffix = self._spec_suffix()
        return None if suffix is None else f"window:{self.window}" + ("" if self.sink else ":nosink") + suffix

    def bands(self, layout: TokenLayout) -> FrameBands:
        t, per = layout.grid[0], layout.tokens_per_frame
        return FrameBands(keep=tuple(d <= self.window for d in range(t)), width=(per,) * t, sink=self.sink)

    def _make(self, layout: TokenLayout, device: torch.device, kernel: Attend | None) -> Attend:
        if self.granularity == "frame":  # the process's dense kernel where the call names none
            kernel = kernel or dense_attention(choose_backend())
            return FrameWindowAttention(layout, self.bands(layout), kernel, device)
        return super()._make(layout, device, kernel)


class RadialAttention(_BandedAttention):
    """Radial Attention's static mask (arXiv 2506.19852).

    With ``P = 2^bit_length(tokens per frame)`` and ``g = bit_length(d)`` the band of frame distance d:
    d <= ``dense_distance``: whole frames; otherwise tokens within ``max(P / 2^g * decay, min_width)`` of
    each other, and where ``P / 2^g < min_width`` only distances that are multiples of
    ``min_width / (P / 2^g)`` are kept. Defaults: the reference's (decay 1, dense distance 1 as for its
    HunyuanVideo setting, min width 128 = its block size), frame 0 a sink, text global.

    ``granularity="block"`` (default; the reference's kernel also works on 128-token blocks, though it rounds
    with a density threshold rather than keeping every touched block) rounds the bands out to
    ``block_size``-token blocks (each query sees the union of its block's bands in whole key blocks: under two
    blocks past its own band's edges, both frames' bands where its block straddles two frames); ``"token"``
    keeps them token-exact (the name gains ``-token``).
    """

    def __init__(
        self,
        decay: float = 1.0,
        dense_distance: int = 1,
        min_width: int = BLOCK_SIZE,
        sink: bool = True,
        block_size: int = BLOCK_SIZE,
        granularity: str = "block",
    ) -> None:
        if not decay > 0:
            raise ValueError(f"decay must be > 0; got {decay}")
        if dense_distance < 0 or min_width < 1:
            raise ValueError(f"dense_distance must be >= 0 and min_width >= 1; got {dense_distance}, {min_width}")
        if granularity == "frame":
            raise ValueError(
                "radial attention has no 'frame' granularity: its bands are not whole frames, so a frame's queries "
                "do not share their keys; use 'block' (the default) or 'token'"
            )
        super().__init__(sink, block_size, granularity)
        self.decay, self.dense_distance, self.min_width = float(decay), dense_distance, min_width
        self.name = (
            "radial"
            if (decay, dense_distance, min_width, sink) == (1.0, 1, BLOCK_SIZE, True)
            else (f"radial(decay={decay},dense={dense_distance},min_width={min_width},sink={sink})")
        ) + self._name_suffix()

    @property
    def spec(self) -> str | None:
        suffix = self._spec_suffix()
        if suffix is None or (self.dense_distance, self.min_width, self.sink) != (1, BLOCK_SIZE, True):
            return None
        return ("radial" if self.decay == 1.0 else f"radial:{self.decay:g}") + suffix

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


# The masks users name in a spec ``NAME[:ARG...][:token]``: name -> (parser, usage). A parser takes the spec's
# arguments and the granularity and returns the part, or None when the arguments do not fit; the usage words
# the accepted specs for refusals and help. A new mask is a class and one ``@register_mask`` parser beside it.
MaskParser = Callable[[list[str], str], "_BandedAttention | None"]


@dataclass(frozen=True)
class MaskEntry:
    parse: MaskParser
    usage: str


MASKS: dict[str, MaskEntry] = {}


def register_mask(name: str, usage: str) -> Callable[[MaskParser], MaskParser]:
    """Registers the parser of the mask spec ``name[:args]`` (see :data:`MASKS`)."""

    def register(parse: MaskParser) -> MaskParser:
        if name in MASKS or name in BACKENDS:
            raise ValueError(f"attention name {name!r} is taken")
        MASKS[name] = MaskEntry(parse, usage)
        return parse

    return register


@register_mask("window", "'window:W' (W latent frames each side), 'window:W:nosink' (either with ':frame')")
def _window_spec(args: list[str], granularity: str) -> TemporalWindowAttention | None:
    if 1 <= len(args) <= 2 and (len(args) == 1 or args[1] == "nosink"):
        return TemporalWindowAttention(int(args[0]), sink=len(args) == 1, granularity=granularity)
    return None


@register_mask("radial", "'radial' or 'radial:DECAY'")
def _radial_spec(args: list[str], granularity: str) -> RadialAttention | None:
    if len(args) <= 1:
        return RadialAttention(decay=float(args[0]) if args else 1.0, granularity=granularity)
    return None


def parse_attention(spec: str) -> str | _BandedAttention:
    """A user's attention choice: a dense kernel name (``models.attention.BACKENDS``) or a mask spec of
    :data:`MASKS` (``window:W`` = +-W latent frames; on CogVideoX 1.5 +-W temporal patches of 2 latent frames, the
    token grid's time axis; ``window:W:nosink``, ``radial`` or ``radial:DECAY``); the masks at block granularity, or
    with a ``:token`` suffix at token granularity (e.g. ``window:2:token``); a window with a ``:frame`` suffix is
    the token-exact window computed frame by frame with the dense kernel (``window:2:frame``)."""
    if spec in BACKENDS:
        return spec
    name, _, rest = spec.partition(":")
    args = [a for a in rest.split(":") if a] if rest else []
    granularity = args[-1] if args[-1:] in (["token"], ["frame"]) else "block"
    args = args[:-1] if granularity != "block" else args
    entry = MASKS.get(name)
    try:
        part = entry.parse(args, granularity) if entry is not None else None
    except ValueError as e:
        raise ValueError(f"attention {spec!r}: {e}") from None
    if part is not None:
        return part
    usages = ", ".join(e.usage for e in MASKS.values())
    raise ValueError(
        f"unknown attention {spec!r}; valid: a kernel {BACKENDS}, {usages}, each at 128-token block granularity, "
        "or token-exact with ':token' appended (e.g. 'window:2:token', 'radial:token'); a window token-exact and "
        "computed frame by frame with the dense kernel with ':frame' appended (e.g. 'window:2:frame')"
    )
