"""Temporal windows spread over window groups (``parallel.windows``), proven on the CPU with gloo.

Sessions of 2, 3 and 4 processes (tests/parallel_harness.py) run the tiny fp32 pipelines of
tests/parallel_cases.py through tests/parallel_window_cases.py: every rank computes the one-process windowed
result, then the one spread over the window groups (with CFG halves or Ulysses inside a group, window counts
that do not divide the groups); the generation's first rank must return the same result (rel < 1e-5), the
others None. The layout arithmetic of the 4- and 8-GPU plans needs no processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from parallel_harness import ok, run_ranks
from parallel_window_cases import FOUR_RANK_CASES, THREE_RANK_CASES, TWO_RANK_CASES

from diffsynth_cog.denoise.windows import WindowSpec, map_windows
from diffsynth_cog.parallel import ParallelError, ParallelLayout
from diffsynth_cog.parallel.layout import auto_window_degree
from diffsynth_cog.parallel.mesh import GROUP_KINDS, ProcessMesh
from diffsynth_cog.parallel.windows import WindowGroups, check_window_call

RTOL = 1e-5

# ----------------------------------------------------------------------------------------------
# Layout arithmetic, shares, the fusion: no processes


def test_window_groups_are_outermost_and_each_holds_a_whole_cfg_x_ulysses_group_of_neighbours():
    layout = ParallelLayout.resolve(8, window_degree=2, cfg_parallel=True, num_heads=48)
    assert (layout.windows, layout.cfg, layout.ulysses, layout.call_size) == (2, 2, 2, 4)
    assert layout.name() == "windows2xcfg2xulysses2"
    coords = [layout.coords(r) for r in range(8)]
    assert [(c.window, c.half, c.ulysses) for c in coords] == [
        (w, h, u) for w in range(2) for h in range(2) for u in range(2)
    ]
    assert [layout.rank(c) for c in coords] == list(range(8))
    assert layout.ranks(5, vary=GROUP_KINDS["call"]) == [4, 5, 6, 7]  # one window group: neighbours
    assert layout.ranks(5, vary=GROUP_KINDS["windows"]) == [1, 5]  # the same place in every window group
    assert layout.ranks(5, vary=GROUP_KINDS["generation"]) == list(range(8))  # the VAE, the text, the seed


@pytest.mark.parametrize(
    "world,degrees,name,calls",
    [  # the planned layouts of bench_parallel.py (WINDOW_LAYOUTS): windows x CFG x Ulysses
        (4, dict(window_degree=4, cfg_parallel=False), "windows4", [[0], [1], [2], [3]]),
        (4, dict(window_degree=2, cfg_parallel=True), "windows2xcfg2", [[0, 1], [2, 3]]),
        (4, dict(window_degree=2, cfg_parallel=False), "windows2xulysses2", [[0, 1], [2, 3]]),
        (8, dict(window_degree=4, cfg_parallel=True), "windows4xcfg2", [[0, 1], [2, 3], [4, 5], [6, 7]]),
        (8, dict(window_degree=2, cfg_parallel=True), "windows2xcfg2xulysses2", [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (8, dict(window_degree=2, cfg_parallel=False), "windows2xulysses4", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ],
)
def test_planned_four_and_eight_gpu_layouts_give_each_window_group_contiguous_ranks(world, degrees, name, calls):
    layout = ParallelLayout.resolve(world, **degrees, num_heads=48)
    assert layout.name() == name and layout.world == world
    groups = {tuple(layout.ranks(r, vary=GROUP_KINDS["call"])) for r in range(world)}
    assert sorted(map(list, groups)) == calls
    for rank in range(world):
        assert layout.coords(rank).window == next(i for i, g in enumerate(calls) if rank in g)


def test_bench_plans_only_layouts_that_resolve_on_their_world():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_parallel import WINDOW_LAYOUTS, parse_layout

    for world, names in WINDOW_LAYOUTS.items():
        for name in names:
            d = parse_layout(name)
            if d is None:
                continue
            layout = ParallelLayout(cfg=d["cfg"], ulysses=d["ulysses"], ring=d["ring"], windows=d["windows"])
            assert layout.world == world and layout.name() == name, (world, name)


def mesh_of(layout: ParallelLayout, rank: int) -> ProcessMesh:
    return ProcessMesh(layout, rank, layout.coords(rank), tuple(range(layout.world)), None, None, None, None)


@pytest.mark.parametrize("count,degree", [(5, 2), (5, 3), (4, 3), (5, 4), (11, 8), (3, 3)])
def test_window_shares_are_contiguous_cover_the_step_and_differ_by_at_most_one(count, degree):
    layout = ParallelLayout(windows=degree)
    shares = [WindowGroups(mesh_of(layout, r)).shares(count)[r] for r in range(degree)]
    assert [i for share in shares for i in share] == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1 and min(map(len, shares)) >= 1


def test_shares_joined_by_a_sum_equal_the_one_process_fusion():
    """map_windows with a share per group, the groups' sums added (as the all-reduce does), gives the fusion."""
    x = torch.randn(1, 2, 13, 3, 4, dtype=torch.float64)
    plan = WindowSpec(13, 0.5).plan(13)  # 4 latent frames a window, stride 2: 6 windows (the last moved back)
    assert len(plan) == 6
    run = lambda w, start: torch.sin(w * (start + 1)).float()  # noqa: E731 - differs per window
    whole = map_windows(x, plan, run)
    sums: list[torch.Tensor] = []

    class Sum:  # one group's share; join keeps its weighted sum for adding up below
        name = "sum"

        def __init__(self, part: range) -> None:
            self.part = part

        def windows(self, plan):  # noqa: ANN001, ANN202
            return self.part

        def join(self, total):  # noqa: ANN001, ANN202
            sums.append(total)
            return total

        def check_compatible(self, parts):  # noqa: ANN001, ANN202
            pass

    for part in (range(0, 4), range(4, 6)):
        map_windows(x, plan, run, share=Sum(part))
    norm = torch.zeros(plan.length)
    for i, start in enumerate(plan.starts):
        norm[start : start + plan.size] += plan.weights(i)
    joined = (sums[0] + sums[1]) / norm[:, None, None]  # the groups' sums added, over the whole plan's norm
    assert float((joined - whole).norm() / whole.norm()) < 1e-6
    # a share that covers every window is the plain fusion
    assert torch.allclose(map_windows(x, plan, run, share=Sum(range(6))), whole)


def test_a_call_the_window_groups_cannot_share_is_refused_saying_what_to_do():
    layout = ParallelLayout(windows=3)
    with pytest.raises(ParallelError, match=r"this call has no windows: pass windows=WindowSpec.*--window-frames"):
        check_window_call(layout, None, 7)
    with pytest.raises(ParallelError, match=r"has 3 window groups, but a step of this call has 2 window\(s\)"):
        check_window_call(layout, WindowSpec(9, 0.25), 5)  # windows at 0 and 2
    check_window_call(layout, WindowSpec(9, 0.5), 7)  # 5 windows: fine
    check_window_call(ParallelLayout(cfg=2), None, 7)  # no window groups: nothing to check


@pytest.mark.parametrize(
    "ranks,windows,fixed,expected",
    [
        (2, 5, 1, 1),  # 513 frames in 129-frame windows: 3 rounds on 1 GPU each lose to 5 on a CFG pair
        (2, 4, 1, 2),  # an even split: window groups (one exchange a step)
        (4, 4, 1, 4),
        (8, 11, 1, 4),  # 1025 frames: 3 rounds on CFG pairs beat 2 rounds on single GPUs
        (2, 11, 1, 2),
        (8, 1, 1, 1),  # one window: nothing to spread
        (8, 16, 4, 2),  # the degrees given (CFG 2 x Ulysses 2) must fit inside every window group
        (3, 3, 1, 3),
    ],
)
def test_auto_window_degree_picks_the_shortest_estimated_step(ranks, windows, fixed, expected):
    assert auto_window_degree(ranks, windows, fixed=fixed) == expected


def test_from_options_resolves_auto_windows_and_fits_cfg_inside_a_window_group():
    assert ParallelLayout.from_options(4, windows="auto", windows_per_step=4) == ParallelLayout(windows=4)
    assert ParallelLayout.from_options(8, windows="auto", windows_per_step=11) == ParallelLayout(windows=4, cfg=2)
    assert ParallelLayout.from_options(2, windows="auto", windows_per_step=1) == ParallelLayout(cfg=2)
    assert ParallelLayout.from_options(4, windows=2) == ParallelLayout(windows=2, cfg=2)
    assert ParallelLayout.from_options(4, windows=2, cfg_parallel="off") == ParallelLayout(windows=2, ulysses=2)
    with pytest.raises(ParallelError, match="windows 3 does not divide the 4 ranks of a group"):
        ParallelLayout.from_options(4, windows=3, cfg_parallel="off")
    with pytest.raises(ParallelError, match="windows must be a number of window groups or 'auto'"):
        ParallelLayout.from_options(4, windows="many")


def test_cli_window_parallel_flag_reaches_the_layout_and_is_checked_against_the_windows():
    from diffsynth_cog.cli.generate_checks import parallel_layout
    from diffsynth_cog.cli.main import build_parser
    from diffsynth_cog.configs import dit_preset

    config = dit_preset("cogvideox-5b")

    def layout(*argv: str, world: int) -> ParallelLayout:
        args = build_parser().parse_args(["generate", "--prompt", "x", *argv])
        return parallel_layout(args, world, False, config=config)

    long = ("--num-frames", "1025", "--window-frames", "129")  # 11 windows a step
    assert layout("--window-parallel", "2", *long, world=4) == ParallelLayout(windows=2, cfg=2)
    assert layout("--window-parallel", "auto", *long, world=8) == ParallelLayout(windows=4, cfg=2)
    assert layout("--window-parallel", "auto", world=8) == ParallelLayout(cfg=2, ulysses=4)  # no windows: none
    assert layout(world=4) == ParallelLayout(cfg=2, ulysses=2)  # default: no window groups
    with pytest.raises(ParallelError, match="--window-parallel 2 spreads temporal windows: give --window-frames F"):
        layout("--window-parallel", "2", world=4)
    with pytest.raises(ParallelError, match="has 1 window\\(s\\); use at most 1 window groups"):
        layout("--window-parallel", "2", "--num-frames", "129", "--window-frames", "129", world=2)


def test_the_windows_of_a_step_are_counted_from_frames_and_window_options():
    from diffsynth_cog.configs import dit_preset
    from diffsynth_cog.parallel.windows import windows_per_step

    config = dit_preset("cogvideox-5b")
    assert windows_per_step(config, num_frames=513, window_frames=129, overlap=0.25) == 5
    assert windows_per_step(config, num_frames=1025, window_frames=129, overlap=0.25) == 11
    assert windows_per_step(config, num_frames=129, window_frames=None, overlap=0.25) == 1


# ----------------------------------------------------------------------------------------------
# 2, 3 and 4 ranks


def session(world: int, fn, tmp_path_factory):  # noqa: ANN001, ANN201
    start = time.monotonic()
    results = ok(run_ranks(world, fn, tmp_path_factory.mktemp(f"windows-{world}-ranks")))
    print(f"{world}-rank window session: {time.monotonic() - start:.1f} s")
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from parallel_window_cases import two_rank_session

    return session(2, two_rank_session, tmp_path_factory)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    from parallel_window_cases import three_rank_session

    return session(3, three_rank_session, tmp_path_factory)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    from parallel_window_cases import four_rank_session

    return session(4, four_rank_session, tmp_path_factory)


def check(results: list[dict], case: dict) -> None:
    name = case["name"]
    ranks = [r["generations"][name] for r in results]
    assert [r for r in range(len(results)) if ranks[r]["returned"]] == [0], name  # rank 0 returns the video
    assert ranks[0]["rel"] < RTOL, (name, ranks[0]["rel"])
    if case.get("step_cache") is not None:  # every window's decisions, where it ran, are the one-process ones
        single = ranks[0]["decisions"][0]
        assert any(any(d) for d in single.values()), "the cache never skipped: the case proves nothing"
        ran = {key for r in ranks for key in r["decisions"][1]}
        assert ran == set(single), name  # every window ran somewhere
        for r in ranks:
            for key, decisions in r["decisions"][1].items():
                assert decisions == single[key], (name, key)


@pytest.mark.parametrize("case", TWO_RANK_CASES, ids=[c["name"] for c in TWO_RANK_CASES])
def test_two_window_groups_give_the_one_process_windowed_result(two_ranks, case):
    check(two_ranks, case)


@pytest.mark.parametrize("case", THREE_RANK_CASES, ids=[c["name"] for c in THREE_RANK_CASES])
def test_three_window_groups_give_the_one_process_windowed_result(three_ranks, case):
    check(three_ranks, case)


@pytest.mark.parametrize("case", FOUR_RANK_CASES, ids=[c["name"] for c in FOUR_RANK_CASES])
def test_window_groups_with_cfg_or_ulysses_inside_give_the_one_process_windowed_result(four_ranks, case):
    check(four_ranks, case)


def test_an_i2v_transformer_through_window_groups_gives_the_one_process_windowed_prediction(
    two_ranks, three_ranks, four_ranks
):
    for results in (two_ranks, three_ranks, four_ranks):
        assert all(r["i2v"] < RTOL for r in results), [r["i2v"] for r in results]


def test_decoded_video_and_the_vae_spread_over_window_groups_equal_one_process(two_ranks):
    assert two_ranks[0]["decoded"]["rel"] < RTOL and two_ranks[1]["decoded"]["rel"] is None
    assert all(r["decoded"]["decode_equal"] for r in two_ranks)


def test_every_rank_refuses_a_call_or_layout_the_window_groups_cannot_share(two_ranks, four_ranks):
    for r in two_ranks:
        assert "this call has no windows: pass windows=WindowSpec" in r["refusals"]["no-windows"]
        assert "but a step of this call has 1 window(s)" in r["refusals"]["one-window"]
        assert "window_degree <= 1" in r["refusals"]["one-window"]
        assert r["refusals"]["denoiser"].startswith("ParallelError: the layout windows2 spreads temporal windows")
    for r in four_ranks:
        assert "windows 3 does not divide the 4 ranks of a group" in r["bad"]["windows3-of-4"]


def test_a_rank_that_stops_fails_the_window_join_after_the_timeout(tmp_path):
    from parallel_window_cases import window_rank_stops

    results = run_ranks(2, window_rank_stops, tmp_path, 8.0, 2.0, timeout=120, pg_timeout=60.0)
    assert results[1] == {"error": "no result"}
    survivor = results[0]["ok"]
    assert survivor["error"].startswith("ParallelError: rank 0: joining the window groups' weighted sums"), survivor
    assert 1.5 < survivor["seconds"] < 7.0


# ----------------------------------------------------------------------------------------------
# The benchmark's CPU smoke mode


def test_bench_parallel_times_a_windows_layout_against_one_rank(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_parallel.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    command += ["--smoke", "--frames", "25", "--window-frames", "9", "--window-overlap", "0.5"]
    command += ["--layouts", "single", "windows2", "--steps", "2", "--warmup-steps", "1", "--full-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "bench_parallel.json").read_text())
    assert result["windows"] == {"frames": 9, "overlap": 0.5, "per_step": {"25": 5}}
    entry = result["runs"]["25f/windows2"]
    assert entry["ranks_per_video"] == 2 and len(entry["peak_GiB_per_gpu"]) == 2
    assert entry["rel_diff_vs_single"] < 1e-5
    assert entry["step_speedup"] == pytest.approx(
        result["runs"]["25f/single"]["median_step_s"] / entry["median_step_s"], rel=0.05
    )
    assert entry["full_1_steps_s"] > 0


def test_the_denoiser_refuses_a_window_share_it_cannot_use_naming_why():
    from parallel_cases import tiny_pipeline

    from diffsynth_cog.denoise.denoiser import Denoiser
    from diffsynth_cog.parallel.split import ParallelSplit

    dit = tiny_pipeline("5b").dit
    with pytest.raises(TypeError, match=r"window_share must be a WindowShare; object lacks \['check_compatible'"):
        Denoiser(dit, windows=WindowSpec(9), window_share=object())
    mesh = mesh_of(ParallelLayout(windows=2, cfg=2), 0)
    share = WindowGroups(mesh)
    with pytest.raises(ParallelError, match="the layout windows2xcfg2 spreads temporal windows .* no windows"):
        Denoiser(dit, split=ParallelSplit(mesh), window_share=share)
    with pytest.raises(ParallelError, match="needs the split of the same parallel context .* got the split 'whole'"):
        Denoiser(dit, windows=WindowSpec(9), window_share=share)
    other = ParallelSplit(mesh_of(ParallelLayout(windows=2, cfg=2), 0))
    with pytest.raises(ParallelError, match="got the split 'parallel:windows2xcfg2'"):
        Denoiser(dit, windows=WindowSpec(9), split=other, window_share=share)
    Denoiser(dit, windows=WindowSpec(9), split=ParallelSplit(mesh), window_share=share)  # the context's pair
