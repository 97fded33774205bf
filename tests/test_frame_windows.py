"""Temporal windows computed frame by frame (``window:W:frame``): the token-exact window mask, one dense-kernel call
per frame, against masked SDPA with the window written out (test_sparse_attention.window_reference), with
padding, on CogVideoX 1.5's temporal patches, with gradients, inside the denoiser with the DiT's own kernel, and
the spec's round trip. fp32 on the CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_sparse_attention import LAYOUT, masked_sdpa, qkv, window_reference
from tiny_models import TINY_DIT

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.denoise.denoiser import Denoiser
from diffsynth_cog.denoise.frame_windows import FrameWindowAttention
from diffsynth_cog.denoise.masks import RadialAttention, TemporalWindowAttention, parse_attention
from diffsynth_cog.models.attention import dense_attention
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.models.tokens import TokenLayout

CPU = torch.device("cpu")
PATCHES_15 = TokenLayout(n_text=7, grid=(5, 3, 4), patch_t=2)  # 10 latent frames = 5 temporal patches of 12 tokens


@pytest.mark.parametrize("layout", [LAYOUT, PATCHES_15], ids=["9-frames", "1.5-patches"])
@pytest.mark.parametrize("window,sink,extra", [(0, True, 0), (1, True, 0), (2, True, 11), (1, False, 0), (3, False, 5)])
def test_frame_by_frame_window_is_the_token_window(layout, window, sink, extra):
    attend = TemporalWindowAttention(window, sink=sink, granularity="frame").build(layout, CPU)
    assert isinstance(attend, FrameWindowAttention)
    length = layout.n_tokens + extra  # extra: the padding a sequence split may add
    want_mask = window_reference(layout, window, sink, length)
    assert torch.equal(attend.dense_mask(length), want_mask)
    q, k, v = qkv(layout, extra, seed=window)
    with torch.no_grad():
        got = attend(q, k, v)
    assert torch.allclose(got, masked_sdpa(q, k, v, want_mask), atol=1e-5, rtol=0)


def test_each_frame_is_one_kernel_call_over_the_sink_and_its_band():
    calls: list[tuple[int, int]] = []

    def kernel(q, k, v):
        calls.append((q.shape[1], k.shape[1]))
        return dense_attention("sdpa")(q, k, v)

    layout = TokenLayout(n_text=5, grid=(6, 2, 3))  # 6 frames of 6 tokens: 41 tokens
    attend = FrameWindowAttention(layout, TemporalWindowAttention(1).bands(layout), kernel, CPU)
    attend(*qkv(layout, extra=3))
    # text: every token; frames 0-2: one slice from token 0 (the band reaches the sink frame); frames 3-5: the text
    # and the sink frame (5 + 6 tokens) joined to their band (3 frames, 2 at the end); padding: the text.
    bands = [11 + 6, 5 + 18, 5 + 24, 11 + 18, 11 + 18, 11 + 12]
    assert calls == [(5, 41), *((6, n) for n in bands), (3, 5)]
    assert attend.key_ranges(4) == [(0, 11), (23, 41)] and attend.key_ranges(2) == [(0, 29)]
    radial = RadialAttention(dense_distance=1, min_width=2).bands(layout)  # distance 1 whole, then narrow bands
    with pytest.raises(ValueError, match="takes a temporal window"):
        FrameWindowAttention(layout, radial, kernel, CPU)


def test_frame_by_frame_window_trains_with_the_gradients_of_the_masked_attention():
    attend = TemporalWindowAttention(1, granularity="frame").build(LAYOUT, CPU)
    q, k, v = qkv(LAYOUT, seed=3, grad=True)
    attend(q, k, v).square().sum().backward()
    q2, k2, v2 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    masked_sdpa(q2, k2, v2, window_reference(LAYOUT, 1, True, LAYOUT.n_tokens)).square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("patch_size_t", [None, 2], ids=["1.0", "1.5"])
def test_in_the_denoiser_frame_windows_equal_token_windows_and_use_the_dits_kernel(patch_size_t):
    values = {**TINY_DIT, "in_channels": 4}
    if patch_size_t:
        values |= dict(patch_size_t=2, patch_bias=False, sample_frames=9, sample_height=12, sample_width=14)
    config = DiTConfig.from_dict(values)
    torch.manual_seed(0)
    dit = CogDiT(config).eval()
    dit.attention_backend = "sdpa-cudnn"  # the model's kernel (on the CPU it runs as SDPA)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 6, 4, 6, generator=g)  # 6 latent frames (3 temporal patches on 1.5)
    context = torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=g)
    part = parse_attention("window:1:frame")
    with torch.no_grad():
        token = Denoiser(dit, attention=parse_attention("window:1:token"))(x, 500, context)
        frame = Denoiser(dit, attention=part)(x, 500, context)
        dense = Denoiser(dit)(x, 500, context)
        wide = Denoiser(dit, attention=parse_attention("window:5:frame"))(x, 500, context)
    assert torch.allclose(frame, token, atol=1e-5, rtol=0)
    assert (frame - dense).abs().max() > 1e-4  # the window masks something at this length
    assert torch.allclose(wide, dense, atol=1e-5, rtol=0)  # a window covering every frame is dense attention
    (built,) = part._built.values()
    assert built.kernel is dense_attention("sdpa-cudnn")
    assert Denoiser(dit, attention=part).parts()["attention"] == "window1-frame"


def test_frame_window_specs_round_trip_and_radial_has_no_frame_granularity():
    for spec, name in (("window:2:frame", "window2-frame"), ("window:0:nosink:frame", "window0-nosink-frame")):
        part = parse_attention(spec)
        assert (part.spec, part.name, part.granularity) == (spec, name, "frame")
    with pytest.raises(ValueError, match=r"'radial:frame': radial attention has no 'frame' granularity"):
        parse_attention("radial:frame")
    with pytest.raises(ValueError, match="no 'frame' granularity"):
        RadialAttention(granularity="frame")
    with pytest.raises(ValueError, match="window:2:frame"):
        parse_attention("window:2:frames")  # the refusal names the spec that works


def test_one_frame_window_object_per_layout_and_kernel():
    part = TemporalWindowAttention(1, granularity="frame")
    a = part.build(LAYOUT, CPU, dense_attention("sdpa"))
    assert part.build(LAYOUT, CPU, dense_attention("sdpa")) is a
    b = part.build(LAYOUT, CPU, dense_attention("sdpa-cudnn"))
    assert b is not a and b.kernel is dense_attention("sdpa-cudnn")
    other = part.build(dataclasses.replace(LAYOUT, n_text=6), CPU, dense_attention("sdpa"))
    assert other is not a
