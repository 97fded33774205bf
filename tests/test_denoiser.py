"""The denoiser's parts: attention chosen per process / model / call, attention parts, spatial tiles
(checked number by number against an independent computation), and the pipeline's stages alone.

Tiny CogVideoX-5B DiT in fp32 on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_diffusers_dit, save_tiny_model_folder

from diffsynth_cog import CogVideoPipeline, ModelManager
from diffsynth_cog.denoise.denoiser import Denoiser
from diffsynth_cog.loading.dit_loader import load_dit
from diffsynth_cog.models import attention as attn
from diffsynth_cog.models.tiling import TileGrid, TileSpec, map_tiles
from diffsynth_cog.models.tokens import TokenLayout
from diffsynth_cog.pipeline.sampling import Conditions, denoise, draw_noise, guidance_scale
from diffsynth_cog.schedulers import make_sampler, scheduler_preset


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-dit")
    make_diffusers_dit("cogvideox-5b", seed=3).save_pretrained(folder)
    return load_dit(folder, dtype=torch.float32, device="cpu")


def inputs(t: int = 3, h: int = 4, w: int = 6, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, t, h, w, generator=g)
    context = torch.randn(batch, 7, 32, generator=g)
    return x, context


# ----------------------------------------------------------------------------------------------
# Attention: which kernel, chosen where


@pytest.fixture
def restore_backends(dit):
    yield
    attn.set_attention_backend("auto")
    dit.set_attention_backend(None)


def test_kernel_is_chosen_per_call_then_per_model_then_per_process(dit, restore_backends):
    x, context = inputs()
    t = torch.full((2,), 500)
    assert dit.embed(x, t, context).attend == attn.DenseAttention("auto")
    attn.set_attention_backend("sdpa-cudnn")
    assert dit.embed(x, t, context).attend.backend == "sdpa-cudnn"  # the process default
    dit.set_attention_backend("sdpa")
    assert dit.embed(x, t, context).attend.backend == "sdpa"  # the model's own beats the process's
    with attn.attention_backend("sdpa-cudnn"):
        assert dit.embed(x, t, context).attend.backend == "sdpa-cudnn"  # the call's beats both
        assert Denoiser(dit).parts()["attention"] == "sdpa-cudnn"
    assert dit.embed(x, t, context).attend.backend == "sdpa"
    # One shared object per backend: compiled blocks see the same attention from call to call.
    assert dit.embed(x, t, context).attend is dit.embed(x, t, context).attend


def test_unknown_or_missing_kernels_are_refused_before_any_call(dit):
    with pytest.raises(ValueError, match="unknown attention backend 'cudnn'"):
        dit.set_attention_backend("cudnn")
    with pytest.raises(ValueError, match="unknown attention backend"), attn.attention_backend("nope"):
        pass
    with pytest.raises(ValueError, match="unknown attention backend"):
        Denoiser(dit, attention="nope")
    with pytest.raises(TypeError, match="AttentionPart"):
        Denoiser(dit, attention=3)


class TextOnlyAttention:
    """An attention part for the test: every token attends to the text tokens only (a mask)."""

    name = "text-only"

    def __init__(self) -> None:
        self.layouts: list[TokenLayout] = []

    def build(self, layout: TokenLayout, device: torch.device, kernel=None):  # noqa: ANN001
        self.layouts.append(layout)

        def attend(q, k, v):
            mask = torch.zeros(q.shape[1], k.shape[1], dtype=torch.bool, device=device)
            mask[:, : layout.n_text] = True
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
            return out.transpose(1, 2)

        return attend

    def check_compatible(self, parts):
        """Goes with every part."""


def test_an_attention_part_builds_the_attention_of_each_call_from_its_layout(dit):
    x, context = inputs()
    part = TextOnlyAttention()
    with torch.no_grad():
        got = Denoiser(dit, attention=part)(x, 500, context)
        dense = Denoiser(dit)(x, 500, context)
        # The same mask by hand: the blocks' attention replaced, everything else the plain DiT.
        t = torch.full((2,), 500)
        state = dit.embed(x, t, context, attend=TextOnlyAttention().build(TokenLayout(7, (3, 2, 3)), x.device))
        manual = dit.head(dit.run_blocks(state))
    assert part.layouts == [TokenLayout(n_text=7, grid=(3, 2, 3))]
    assert torch.equal(got, manual.float())
    assert (got - dense).abs().max() > 1e-3  # the mask changes the result


def test_denoiser_without_parts_is_the_plain_dit_call_bitwise(dit):
    x, context = inputs()
    with torch.no_grad():
        got = Denoiser(dit)(x, 250, context)
        want = dit(x, torch.full((2,), 250), context)
    assert got.dtype == torch.float32 and torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# Spatial tiles


def test_tile_grid_starts_every_stride_and_cuts_the_last_tiles():
    grid = TileGrid.with_overlap((8, 12), (4, 4), overlap=(0.5, 0.5), multiple=2)
    assert grid.stride == (2, 2) and grid.starts() == ([0, 2, 4, 6], [0, 2, 4, 6, 8, 10]) and len(grid) == 24
    assert TileSpec((32, 32), (0.5, 0.5)).grid((8, 12), pixels_per_unit=8, multiple=2) == grid
    with pytest.raises(ValueError, match="multiple of 16 px"):
        TileSpec((24, 32)).grid((8, 12), pixels_per_unit=8, multiple=2)  # 3 latents: not whole patches
    with pytest.raises(ValueError, match="tile_overlap"):
        TileSpec((32, 32), (1.0, 0.5))


def test_map_tiles_of_a_pointwise_function_is_the_function(dit):
    # Every tile agrees on its overlaps and the cross-fade weights sum to one: nothing is lost or doubled.
    x = torch.randn(1, 2, 3, 8, 12)
    grid = TileGrid((8, 12), (4, 6), (3, 4))
    assert torch.allclose(map_tiles(x, grid, lambda tile, _: tile * 2 + 1), x * 2 + 1, atol=1e-6)
    # A decoder-like run (8x the size) stitches at 8x.
    up = map_tiles(x, grid, lambda tile, _: tile.repeat_interleave(8, -1).repeat_interleave(8, -2), scale=8)
    assert torch.allclose(up, x.repeat_interleave(8, -1).repeat_interleave(8, -2), atol=1e-6)


def crossfade_reference(tiles: dict[tuple[int, int], torch.Tensor], stride: int, size: tuple[int, int]):
    """The stitched output written out pixel by pixel, for tiles overlapping by exactly half (blend = stride).

    In the keep region of tile (i, j), at offsets (a, b) from its corner, with ramps wr = a / stride (1 when
    i = 0 or a >= stride) and wc likewise, raster-order in-place blending gives
        wc * (wr * T[i, j] + (1 - wr) * (wc * T[i-1, j] + (1 - wc) * T[i-1, j-1]))
        + (1 - wc) * (wr * T[i, j-1] + (1 - wr) * T[i-1, j-1]),
    each tile's value taken at the pixel's global position (terms with a missing neighbour drop out)."""
    out = torch.zeros(*next(iter(tiles.values())).shape[:-2], *size)

    def at(i, j, r, c):
        return tiles[(i, j)][..., r - i * stride, c - j * stride]

    for r in range(size[0]):
        for c in range(size[1]):
            i, j = r // stride, c // stride
            a, b = r - i * stride, c - j * stride
            wr = a / stride if i > 0 else 1.0
            wc = b / stride if j > 0 else 1.0
            upper = at(i - 1, j, r, c) if i > 0 else 0
            if i > 0 and j > 0:
                upper = wc * at(i - 1, j, r, c) + (1 - wc) * at(i - 1, j - 1, r, c)
            column = wr * at(i, j, r, c) + (1 - wr) * upper
            if j == 0:
                out[..., r, c] = column
                continue
            left = wr * at(i, j - 1, r, c) + ((1 - wr) * at(i - 1, j - 1, r, c) if i > 0 else 0)
            out[..., r, c] = wc * column + (1 - wc) * left
    return out


def test_dit_tiles_are_stitched_as_the_independent_crossfade_says(dit):
    """An 8 x 12 latent frame in 4 x 4 tiles every 2 (the last row and column of tiles cut to 2): the
    denoiser's tiled call equals the DiT run on each crop, combined by the formula above."""
    x, context = inputs(h=8, w=12, batch=1, seed=5)
    t = torch.full((1,), 400)
    with torch.no_grad():
        got = Denoiser(dit, tiles=TileSpec((32, 32), (0.5, 0.5)))(x, 400, context)
        tiles = {
            (i, j): dit(x[..., 2 * i : 2 * i + 4, 2 * j : 2 * j + 4], t, context).float()
            for i in range(4)
            for j in range(6)
        }
        untiled = dit(x, t, context)
    want = crossfade_reference(tiles, stride=2, size=(8, 12))
    assert got.shape == want.shape == (1, 4, 3, 8, 12)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    assert (got - untiled).abs().max() > 1e-2  # tiles see less context: not the untiled call


# ----------------------------------------------------------------------------------------------
# The pipeline's stages alone


def test_noise_is_drawn_in_the_reference_layout():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    noise = draw_noise((1, 4, 5, 2, 3), g1)
    assert noise.shape == (1, 4, 5, 2, 3)
    assert torch.equal(noise, torch.randn(1, 5, 4, 2, 3, generator=g2).transpose(1, 2))


def test_guidance_scale_is_constant_or_grows_over_the_steps():
    assert guidance_scale(6.0, 999, 50, dynamic=False) == 6.0
    assert guidance_scale(6.0, 50, 50, dynamic=True) == pytest.approx(1.0)  # (N - t) / N = 0
    assert guidance_scale(6.0, 0, 50, dynamic=True) == pytest.approx(7.0)  # cos(pi) = -1


def test_denoise_loop_alone_with_a_stand_in_denoiser():
    """DDIM with a velocity of zero: x0 = sqrt(a_t) x and eps = sqrt(1 - a_t) x, so each step multiplies the
    latents by sqrt(a_prev a_t) + sqrt((1 - a_prev)(1 - a_t))."""

    class ZeroVelocity:
        def start(self, num_steps):
            self.steps = num_steps

        def end_step(self):
            pass

        def __call__(self, latents, timestep, context):
            return torch.zeros_like(latents, dtype=torch.float32)

    sampler = make_sampler("ddim", scheduler_preset("cogvideox-5b"), 4)
    x0 = torch.ones(1, 4, 2, 2, 2)
    conditions = Conditions(context=torch.zeros(1, 7, 32), image_latents=None, guided=False)
    seen = []
    got = denoise(
        ZeroVelocity(), sampler, x0, conditions, cfg_scale=1.0, callback=lambda i, t, x: seen.append(t), progress=False
    )
    a = sampler.alphas_cumprod
    ts = sampler.timesteps.tolist()
    expected = x0.clone()
    for k, t_now in enumerate(ts):
        a_prev = a[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        expected = expected * float((a_prev * a[t_now]).sqrt() + ((1 - a_prev) * (1 - a[t_now])).sqrt())
    assert seen == ts and torch.allclose(got, expected, rtol=1e-6)


def test_a_seed_gives_the_latents_diffusers_gives_for_that_seed(tmp_path):
    """No explicit latents: our seed draws the same initial noise as diffusers' pipeline with a CPU
    generator seeded the same, so the final latents agree."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    folder = save_tiny_model_folder(tmp_path, "cogvideox-5b", seed=8)
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
    ours = CogVideoPipeline.from_model_manager(manager)
    ref = CogVideoXPipeline(
        tokenizer=ours.text_encoder.tokenizer,
        text_encoder=ours.text_encoder.model,
        vae=None,
        transformer=CogVideoXTransformer3DModel.from_pretrained(folder / "transformer"),
        scheduler=CogVideoXDDIMScheduler.from_pretrained(folder / "scheduler"),
    )
    ref.vae_scale_factor_spatial, ref.vae_scale_factor_temporal = 8, 4
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(height=32, width=48, num_frames=9, num_inference_steps=3)
    expected = ref(
        prompt="a kite",
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(21),
        output_type="latent",
        max_sequence_length=7,  # the tiny transformer's text length, which ours reads from its config
        **kwargs,
    ).frames.transpose(1, 2)
    got = ours(prompt="a kite", cfg_scale=6.0, seed=21, output_type="latent", progress_bar=False, **kwargs)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
