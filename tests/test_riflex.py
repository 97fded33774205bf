"""RIFLEx: the temporal RoPE table against the formula written out here, the L <= N_k no-op, the published setting,
the refusal for sin-cos models, and the setting as an input of a DiT call."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import make_diffusers_dit

from diffsynth_cog.configs import dit_preset
from diffsynth_cog.denoise.denoiser import Denoiser
from diffsynth_cog.denoise.riflex import identify_k, intrinsic_periods, resolve_riflex
from diffsynth_cog.loading.dit_loader import load_dit
from diffsynth_cog.models.positions import rope_table

FIVE_B = dit_preset("cogvideox-5b")


def expected_temporal_cos_sin(t: int, k: int | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 16 temporal channels of CogVideoX-5B's RoPE for positions 0..t-1, in float64: frequency
    j = 1..8 is 10000^(-2(j-1)/16), RIFLEx's k-th replaced by 0.9 * 2 pi / length; channels (2j-2, 2j-1)
    both carry frequency j."""
    freqs = [10000.0 ** (-2 * (j - 1) / 16) for j in range(1, 9)]
    if k is not None:
        freqs[k - 1] = 0.9 * 2 * math.pi / length
    angles = torch.tensor([[p * f for f in freqs for _ in range(2)] for p in range(t)], dtype=torch.float64)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("t", [21, 33, 65])
def test_rope_table_lowers_the_kth_temporal_frequency_as_the_formula_says(t):
    h, w = 2, 3
    plain_cos, plain_sin = rope_table(FIVE_B, t, h, w)  # cached first: the RIFLEx table must not come back
    cos, sin = rope_table(FIVE_B, t, h, w, (2, 20))
    want_cos, want_sin = expected_temporal_cos_sin(t, 2, t)
    for got, want in ((cos, want_cos), (sin, want_sin)):
        temporal = got.view(t, h * w, 64)[:, :, :16].double()  # the same for every patch of a frame
        assert torch.allclose(temporal, want[:, None, :].expand(-1, h * w, -1), atol=1e-5, rtol=0)
    # Only the k-th frequency's pair of channels changed; space and the other frequencies are the same bits.
    changed = (cos != plain_cos).any(0) | (sin != plain_sin).any(0)
    assert changed.nonzero().flatten().tolist() == [2, 3]
    assert not torch.equal(cos, rope_table(FIVE_B, t, h, w)[0])


@pytest.mark.parametrize("t", [1, 13, 20])
def test_riflex_changes_nothing_up_to_n_k(t):
    plain = rope_table(FIVE_B, t, 2, 3)
    lowered = rope_table(FIVE_B, t, 2, 3, (2, 20))
    assert torch.equal(plain[0], lowered[0]) and torch.equal(plain[1], lowered[1])


def test_identify_k_picks_the_period_closest_to_where_videos_repeat():
    periods = [round(2 * math.pi / 10000 ** (-2 * (j - 1) / 16)) for j in range(1, 9)]
    assert intrinsic_periods(16, 10000.0) == periods and periods[:3] == [6, 20, 63]
    assert identify_k(20) == (2, 20)  # CogVideoX-5B's published setting
    assert (
        identify_k(14) == (2, 20)
        and identify_k(12) == (1, 6)
        and identify_k(40) == (2, 20)
        and identify_k(45) == (3, 63)
    )
    assert identify_k(3) == (1, 6)
    with pytest.raises(ValueError, match="repeat_frame"):
        identify_k(0)


def test_riflex_true_is_the_published_setting_and_sin_cos_models_are_refused():
    assert resolve_riflex(FIVE_B, True) == (2, 20)
    assert resolve_riflex(FIVE_B, (3, 63)) == (3, 63)
    assert resolve_riflex(FIVE_B, None) is None and resolve_riflex(FIVE_B, False) is None
    with pytest.raises(ValueError, match="sin-cos positions"):
        resolve_riflex(dit_preset("cogvideox-2b"), True)
    with pytest.raises(ValueError, match="no published RIFLEx setting"):
        resolve_riflex(dit_preset("cogvideox-5b-i2v"), True)
    with pytest.raises(ValueError, match=r"k=9 must be in 1\.\.8"):
        resolve_riflex(FIVE_B, (9, 20))
    with pytest.raises(ValueError, match="pair"):
        resolve_riflex(FIVE_B, (2,))


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-dit-riflex")
    make_diffusers_dit("cogvideox-5b", seed=6).save_pretrained(folder)
    return load_dit(folder, dtype=torch.float32, device="cpu")


def test_riflex_is_an_input_of_the_dit_call(dit):
    """Tiny 5B: head dim 16, so 2 temporal frequencies (periods 6 and 628). With (k, N_k) = (1, 3): a 3-frame call
    is bitwise the plain call; a 5-frame call uses the lowered table, exactly as embedding with it by hand."""
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 7, 32, generator=g)
    short, long = torch.randn(2, 4, 3, 4, 6, generator=g), torch.randn(2, 4, 5, 4, 6, generator=g)
    with torch.no_grad():
        assert torch.equal(Denoiser(dit, riflex=(1, 3))(short, 300, context), Denoiser(dit)(short, 300, context))
        got = Denoiser(dit, riflex=(1, 3))(long, 300, context)
        t = torch.full((2,), 300)
        by_hand = dit.head(dit.run_blocks(dit.embed(long, t, context, riflex=(1, 3)))).float()
        plain = Denoiser(dit)(long, 300, context)
    assert torch.equal(got, by_hand)
    assert (got - plain).abs().max() > 1e-3
    assert Denoiser(dit, riflex=(1, 3)).parts()["riflex"] == "k=1,N_k=3"
    with pytest.raises(ValueError, match="no published RIFLEx setting"):
        Denoiser(dit, riflex=True)  # the tiny model is not CogVideoX-5B
