"""What each rank runs in the window-group tests (tests/test_parallel_windows.py).

Module-level functions, so that spawned processes can import them. Every scenario computes the one-process
windowed result in the same process first (``disable_parallel``), then the one spread over the window groups,
and returns numbers for the test to check. The tiny 5B-shaped pipeline of ``parallel_cases``: 25 frames are 7
latent frames; windows of 9 frames (3 latent) overlapping by half are 5 windows a step, of 5 frames (2 latent)
without overlap 4 windows; neither count divides 2 or 3 groups.
"""

from __future__ import annotations

import os
import time
from collections.abc import Hashable
from typing import Any

import torch
from parallel_cases import TEXT_TOKENS, _enable, _pipe, call_inputs, rel

from diffsynth_cog.denoise.denoiser import Denoiser
from diffsynth_cog.denoise.step_cache import StepCache
from diffsynth_cog.denoise.windows import WindowSpec

FIVE = WindowSpec(9, 0.5)  # 5 windows of 3 latent frames over 7
FOUR = WindowSpec(5, 0.0)  # 4 windows of 2 latent frames over 7 (starts 0, 2, 4, 5)
LONG = {"num_frames": 25, "windows": FIVE}


class KeyedCache(StepCache):
    """The first-block cache, remembering every call site's decision per step (to compare window by window)."""

    def __init__(self, threshold: float) -> None:
        super().__init__(threshold)
        self.decisions: dict[str, list[bool]] = {}

    def run(self, dit, state, key: Hashable, reduce):  # noqa: ANN001, ANN201
        out = super().run(dit, state, key, reduce)
        self.decisions.setdefault(repr(key), []).append(self._step_skipped[-1])
        return out


def _generation(pipe, layout: dict[str, Any], kwargs: dict[str, Any], threshold: float | None) -> dict[str, Any]:  # noqa: ANN001
    caches = [KeyedCache(threshold) if threshold is not None else None for _ in range(2)]
    pipe.disable_parallel()
    expected = pipe(**kwargs, step_cache=caches[0])
    _enable(pipe, layout)
    got = pipe(**kwargs, step_cache=caches[1])
    out = {
        "rel": None if got is None else rel(torch.as_tensor(got), torch.as_tensor(expected)),
        "returned": got is not None,
        "split": pipe.parallel.split.name,
        "share": None if pipe.parallel.window_share is None else pipe.parallel.window_share.name,
        "decisions": [None if c is None else c.decisions for c in caches],
    }
    pipe.disable_parallel()
    return out


def window_generations(rank: int, world: int, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Each case: {name, layout (enable_parallel kwargs), call (overrides of call_inputs), step_cache (threshold),
    extend (continuation: extend_video instead)}. Per case: the rel difference of the leader's result from the
    one-process windowed run, whether this rank returned it, and each window's step-skipping decisions."""
    out = {}
    for case in cases:
        pipe = _pipe("5b")
        if case.get("extend"):
            g = torch.Generator().manual_seed(7)
            video = torch.rand(1, 3, 17, 32, 48, generator=g) * 2 - 1
            base = {k: v for k, v in call_inputs().items() if k not in ("height", "width", "num_frames")}
            kwargs = {**base, "video": video, "extend_by": 16, "context_frames": 9, **case.get("call", {})}
            out[case["name"]] = _extension(pipe, case["layout"], kwargs)
            continue
        kwargs = {**call_inputs(), **LONG, **case.get("call", {})}
        out[case["name"]] = _generation(pipe, case["layout"], kwargs, case.get("step_cache"))
    return out


def _extension(pipe, layout: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    """Video continuation (``extend_video``, 9 context + 16 new frames = 7 latent frames) through the windows."""
    pipe.disable_parallel()
    expected = pipe.extend_video(**kwargs)
    _enable(pipe, layout)
    got = pipe.extend_video(**kwargs)
    pipe.disable_parallel()
    return {"rel": None if got is None else rel(got, expected), "returned": got is not None, "decisions": [None]}


@torch.no_grad()
def i2v_denoiser(rank: int, world: int, layout: dict[str, Any]) -> float:
    """An I2V-shaped transformer (8 channels in, 4 out, learned positions) through the windowed denoiser: the
    context's split and window share against the one-process windowed denoiser (the pipeline itself refuses
    windows for I2V models; the windows path is the same)."""
    pipe = _pipe("5b-i2v")
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 8, 7, 4, 6, generator=g)  # a CFG batch of 7 latent frames
    context = torch.randn(2, TEXT_TOKENS, 32, generator=g)
    expected = Denoiser(pipe.dit, windows=WindowSpec(9, 0.25))(latents, 500, context)  # 3 windows (0, 2, 4)
    _enable(pipe, layout)
    ctx = pipe.parallel
    shared = Denoiser(pipe.dit, split=ctx.split, windows=WindowSpec(9, 0.25), window_share=ctx.window_share)
    got = shared(latents, 500, context)
    pipe.disable_parallel()
    return rel(got, expected)


def decoded_and_vae(rank: int, world: int, layout: dict[str, Any]) -> dict[str, Any]:
    """A whole windowed generation decoded to frames ("np"), and the tiled VAE under the window layout: it spreads
    its tiles over every rank of the generation, window groups included."""
    pipe = _pipe("5b")
    kwargs = {**call_inputs(), **LONG, "output_type": "np"}
    expected = pipe(**kwargs)
    latents = torch.randn(1, 4, 5, 8, 12, generator=torch.Generator().manual_seed(5))  # 64 x 96 px: many tiles
    decoded = pipe.decode_latents(latents, tiled=True, progress=False)
    _enable(pipe, layout)
    got = pipe(**kwargs)
    p_decoded = pipe.decode_latents(latents, tiled=True, progress=False)
    pipe.disable_parallel()
    return {
        "rel": None if got is None else rel(torch.as_tensor(got), torch.as_tensor(expected)),
        "decode_equal": torch.equal(decoded, p_decoded),
    }


def refusals(rank: int, world: int, layout: dict[str, Any]) -> dict[str, str]:
    """Calls the window groups cannot share: every rank must refuse, saying what to do."""
    pipe = _pipe("5b")
    _enable(pipe, layout)
    errors = {}
    for name, change in (
        ("no-windows", {}),
        ("one-window", {"num_frames": 9, "windows": WindowSpec(9)}),  # one window, fewer than the groups
    ):
        try:
            pipe(**{**call_inputs(), **change})
            errors[name] = "accepted"
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"
    try:
        Denoiser(pipe.dit, split=pipe.parallel.split, window_share=pipe.parallel.window_share)
        errors["denoiser"] = "accepted"
    except Exception as e:  # noqa: BLE001
        errors["denoiser"] = f"{type(e).__name__}: {e}"
    pipe.disable_parallel()
    return errors


def window_rank_stops(rank: int, world: int, hang_s: float, timeout_s: float) -> dict[str, Any]:
    """The last rank stops answering in the middle of the second step; the window join on the others must fail
    with a clear error after the process groups' timeout."""
    from datetime import timedelta

    pipe = _pipe("5b")
    pipe.enable_parallel(window_degree=world, cfg_parallel=False, timeout=timedelta(seconds=timeout_s))

    def stop(i, t, x):  # noqa: ANN001, ANN202
        if rank == world - 1 and i == 1:
            time.sleep(hang_s)
            os._exit(3)

    start = time.monotonic()
    try:
        pipe(**{**call_inputs(), **LONG}, callback=stop)
        error = None
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "seconds": time.monotonic() - start}


TWO_RANK_CASES = [
    dict(name="windows2-5-windows", layout={"window_degree": 2, "cfg_parallel": False}),
    dict(name="windows2-4-windows", layout={"window_degree": 2, "cfg_parallel": False}, call={"windows": FOUR}),
    dict(
        name="windows2-step-cache",
        layout={"window_degree": 2, "cfg_parallel": False},
        call={"num_inference_steps": 8},
        step_cache=1.0,
    ),
    dict(name="windows2-dpm", layout={"window_degree": 2, "cfg_parallel": False}, call={"sampler": "dpm"}),
    dict(
        name="windows2-continuation",
        layout={"window_degree": 2, "cfg_parallel": False},
        extend=True,
        call={"windows": FIVE},
    ),
]
THREE_RANK_CASES = [
    dict(name="windows3-5-windows", layout={"window_degree": 3, "cfg_parallel": False}),
    dict(name="windows3-4-windows", layout={"window_degree": 3, "cfg_parallel": False}, call={"windows": FOUR}),
    dict(
        name="windows3-continuation",
        layout={"window_degree": 3, "cfg_parallel": False},
        extend=True,
        call={"windows": FIVE},
    ),
]
FOUR_RANK_CASES = [
    dict(name="windows2xcfg2", layout={"window_degree": 2, "cfg_parallel": True}),
    dict(name="windows2xulysses2", layout={"window_degree": 2, "cfg_parallel": False}),
    dict(name="windows4", layout={"window_degree": 4, "cfg_parallel": False}),
    dict(
        name="windows2xcfg2-step-cache",
        layout={"window_degree": 2, "cfg_parallel": True},
        call={"num_inference_steps": 8},
        step_cache=1.0,
    ),
    dict(
        name="windows2xcfg2-continuation",
        layout={"window_degree": 2, "cfg_parallel": True},
        extend=True,
        call={"windows": FIVE},
    ),
]


def two_rank_session(rank: int, world: int) -> dict[str, Any]:
    layout = {"window_degree": 2, "cfg_parallel": False}
    return {
        "generations": window_generations(rank, world, TWO_RANK_CASES),
        "i2v": i2v_denoiser(rank, world, layout),
        "decoded": decoded_and_vae(rank, world, layout),
        "refusals": refusals(rank, world, layout),
    }


def three_rank_session(rank: int, world: int) -> dict[str, Any]:
    return {
        "generations": window_generations(rank, world, THREE_RANK_CASES),
        "i2v": i2v_denoiser(rank, world, {"window_degree": 3, "cfg_parallel": False}),
    }


def four_rank_session(rank: int, world: int) -> dict[str, Any]:
    bad = {}
    try:
        _pipe("5b").enable_parallel(window_degree=3, cfg_parallel=False)
        bad["windows3-of-4"] = "accepted"
    except Exception as e:  # noqa: BLE001
        bad["windows3-of-4"] = f"{type(e).__name__}: {e}"
    return {
        "generations": window_generations(rank, world, FOUR_RANK_CASES),
        "i2v": i2v_denoiser(rank, world, {"window_degree": 2, "cfg_parallel": True}),
        "bad": bad,
    }
