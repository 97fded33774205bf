"""TeaCache: the indicator (block 0's modulated input, rescaled by the polynomial) computed independently here, the
exact path at threshold 0, what a skipped step runs and returns, the polynomial's guards, the choice of method,
and composition with tiles and a sequence split's all-reduce. Tiny CogVideoX-5B (3 blocks) in fp32 on the CPU."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import make_diffusers_dit, save_tiny_model_folder

from diffsynth_cog import CogVideoPipeline, ModelManager
from diffsynth_cog.configs import TEACACHE_COEFFICIENTS, dit_preset
from diffsynth_cog.denoise.denoiser import Denoiser, DenoiserParts, WholeCall
from diffsynth_cog.denoise.step_cache import StepCache
from diffsynth_cog.denoise.teacache import TeaCache, make_step_skipper, polynomial_peak
from diffsynth_cog.models.tiling import TileSpec

IDENTITY = (1.0, 0.0)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = save_tiny_model_folder(tmp_path_factory.mktemp("tiny-5b-teacache"), "cogvideox-5b", seed=9)
    make_diffusers_dit("cogvideox-5b", seed=9, num_layers=3).save_pretrained(root / "transformer")
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.load_models([root])
    return CogVideoPipeline.from_model_manager(manager)


def generate(pipe, steps: int, **kwargs):
    g = torch.Generator().manual_seed(1)
    c = pipe.dit.config
    prompt, negative = (torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g) for _ in range(2))
    options = dict(height=32, width=48, num_frames=9, cfg_scale=6.0, seed=2, num_inference_steps=steps)
    return pipe(
        prompt_emb=prompt, negative_prompt_emb=negative, output_type="latent", progress_bar=False, **options, **kwargs
    )


def test_threshold_zero_is_the_exact_path_bitwise(pipe):
    cache = TeaCache(0.0, coefficients=IDENTITY)
    assert torch.equal(generate(pipe, 5, step_cache=cache), generate(pipe, 5))
    assert cache.stats()["computed"] == 5 and cache.stats()["skipped"] == 0


def test_indicator_is_the_rescaled_relative_l1_change_of_block_zeros_modulated_input(pipe):
    """Two steps on different inputs; the change and the estimate recomputed from norm1 by hand, with the
    polynomial 2x^2 + 3x + 0.01 evaluated here."""
    dit = pipe.dit
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, 4, 3, 4, 6, generator=g) for _ in range(2)]
    context = torch.randn(2, 7, 32, generator=g)
    cache = TeaCache(1e9, coefficients=(2.0, 3.0, 0.01))
    denoiser = Denoiser(dit, step_skip=cache)
    denoiser.start(3)
    with torch.no_grad():
        for x, t in zip(xs, (800, 700), strict=True):
            denoiser(x, t, context)
            denoiser.end_step()
        modulated = []
        for x, t in zip(xs, (800, 700), strict=True):
            state = dit.embed(x, torch.full((2,), t), context)
            modulated.append(dit.blocks[0].norm1(state.video, state.text, state.cond)[0])
    change = ((modulated[1] - modulated[0]).abs().sum() / modulated[0].abs().sum()).item()
    assert cache.changes[0] is None and cache.changes[1] == pytest.approx(change, rel=1e-5)
    assert cache.estimates[1] == pytest.approx(2 * change**2 + 3 * change + 0.01, rel=1e-5)
    assert cache.computed_steps == [0] and cache.skipped_steps == [1]  # 1 step of warmup; 3 announced


def test_skipped_steps_run_no_block_and_add_the_whole_stack_residual(pipe):
    """The same input every step: change 0, so every step after the first but the last is skipped, running no
    block; block 0's modulation is all that runs, and embed + stored residual gives back the full output."""
    dit = pipe.dit
    g = torch.Generator().manual_seed(6)
    x, context = torch.randn(2, 4, 3, 4, 6, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        full = dit(x, torch.full((2,), 500), context)
    calls = [0] * len(dit.blocks)
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(dit.blocks)
    ]
    try:
        cache = TeaCache(0.05, coefficients=IDENTITY)
        denoiser = Denoiser(dit, step_skip=cache)
        denoiser.start(4)
        with torch.no_grad():
            outs = []
            for _ in range(4):
                outs.append(denoiser(x, 500, context))
                denoiser.end_step()
    finally:
        for h in handles:
            h.remove()
    assert cache.computed_steps == [0, 3] and cache.skipped_steps == [1, 2]
    assert calls == [2, 2, 2]
    assert cache.changes == [None, 0.0, 0.0, 0.0]
    assert torch.equal(outs[0], full.float())
    assert ((outs[1] - full).norm() / full.norm()).item() < 1e-6


def test_accumulated_estimates_decide_which_steps_are_skipped(pipe):
    cache = TeaCache(1e9, coefficients=IDENTITY)
    generate(pipe, 6, step_cache=cache)
    assert cache.computed_steps == [0, 5] and cache.skipped_steps == [1, 2, 3, 4]
    small = TeaCache(1e-9, coefficients=IDENTITY)
    generate(pipe, 6, step_cache=small)
    assert small.skipped_steps == []  # every change exceeds a tiny threshold


def test_the_polynomial_is_trusted_only_on_its_rising_range():
    coefficients = TEACACHE_COEFFICIENTS["cogvideox-5b"]
    cache = TeaCache(0.2, coefficients=coefficients)
    peak = polynomial_peak(coefficients)
    assert 0.25 < peak < 0.28  # the CogVideoX-5B fit rises to ~0.71 at x ~ 0.26, then falls
    assert cache.rescale(0.1) == pytest.approx(float(np.polyval(coefficients, 0.1)))
    assert cache.rescale(0.0) == 0.0  # the fit is -0.05 there: no negative estimates
    assert cache.rescale(0.3) == math.inf and cache.rescale(math.nan) == math.inf
    assert polynomial_peak(IDENTITY) == 4.0


# TeaCache4CogVideoX's published fit for CogVideoX-5B (ali-vilab/TeaCache, ``coefficients_dict["CogVideoX-5b"]``),
# written out here independently of the library's table, at the precision the repository publishes (the library's
# table keeps 4-5 significant digits: hence rel=1e-3 below, far tighter than any other model's fit or a digit typo).
PUBLISHED_5B = (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02)


def test_the_5b_calibration_is_teacaches_published_polynomial():
    """The coefficients a 5B denoiser takes are TeaCache's published ones (highest power first), and the
    estimates they give on the fitted range are those of the published polynomial."""
    cache = TeaCache(0.1)
    cache.check_compatible(DenoiserParts(dit_preset("cogvideox-5b")))
    assert cache.coefficients == pytest.approx(PUBLISHED_5B, rel=1e-3)
    for x in (0.02, 0.05, 0.1, 0.2, 0.25):
        published = sum(c * x ** (4 - i) for i, c in enumerate(PUBLISHED_5B))
        assert cache.rescale(x) == pytest.approx(max(0.0, published), rel=1e-3, abs=1e-4)


def test_teacache_refuses_an_uncalibrated_transformer_and_auto_falls_back_to_first_block():
    five_b = SimpleNamespace(config=dit_preset("cogvideox-5b"))
    two_b = SimpleNamespace(config=dit_preset("cogvideox-2b"))
    with pytest.raises(ValueError, match="no calibrated polynomial"):
        TeaCache(0.1).check_compatible(DenoiserParts(two_b.config))
    assert isinstance(make_step_skipper(0.1, "auto", five_b), TeaCache)
    assert isinstance(make_step_skipper(0.1, "auto", two_b), StepCache)
    assert isinstance(make_step_skipper(0.1, "first-block", five_b), StepCache)
    with pytest.raises(ValueError, match="unknown step cache method"):
        make_step_skipper(0.1, "fast", five_b)
    for bad in (-1, math.inf):
        with pytest.raises(ValueError, match="threshold"):
            TeaCache(bad)
    with pytest.raises(ValueError, match="warmup"):
        TeaCache(0.1, warmup=0)


def test_pipeline_step_cache_options(pipe):
    # The tiny model has no calibration: a number means the first-block cache, "teacache:" is refused.
    exact = generate(pipe, 4)
    assert torch.equal(generate(pipe, 4, step_cache=0), exact)
    assert torch.equal(generate(pipe, 4, step_cache="first-block:0"), exact)
    with pytest.raises(ValueError, match="no calibrated polynomial"):
        generate(pipe, 4, step_cache="teacache:0.1")
    with pytest.raises(ValueError, match="METHOD:THRESHOLD"):
        generate(pipe, 4, step_cache="teacache")


class CountingSplit(WholeCall):
    """The whole call, but counting all-reduces (a sequence split sums the processes' shares there)."""

    name = "counting"

    def __init__(self) -> None:
        self.reduced = 0

    def all_reduce(self, values):
        self.reduced += 1
        return values


def test_teacache_keeps_one_state_per_tile_and_decides_through_the_splits_all_reduce(pipe):
    g = torch.Generator().manual_seed(8)
    x, context = torch.randn(1, 4, 3, 4, 6, generator=g), torch.randn(1, 7, 32, generator=g)
    split = CountingSplit()
    cache = TeaCache(0.0, coefficients=IDENTITY)
    denoiser = Denoiser(pipe.dit, split=split, step_skip=cache, tiles=TileSpec((32, 32), (0.5, 0.5)))
    plain = Denoiser(pipe.dit, tiles=TileSpec((32, 32), (0.5, 0.5)))
    denoiser.start(3)
    plain.start(3)
    with torch.no_grad():
        for t in (900, 800, 700):
            assert torch.equal(denoiser(x, t, context), plain(x, t, context))
            denoiser.end_step()
    # One state per (call, window) and tile: 4 x 4 tiles every 2 over 4 x 6, no windows, one call per step.
    assert set(cache._tracks) == {((None, None), (r, c)) for r in (0, 2) for c in (0, 2, 4)}
    assert split.reduced == 2 * 6  # every tile, every step after the first
