"""Generation on several ranks (``diffsynth_cog.parallel``), proven on the CPU with gloo.

Distributed tests start 2 or 4 processes (tests/parallel_harness.py), each building the same tiny
fp32 pipelines (tests/parallel_cases.py): 5B-shaped (RoPE, 4 heads), 2B-shaped (sin-cos, 6 heads)
and 5B-I2V-shaped (learned positions). A call has 7 text + 30 video = 37 tokens, which no degree
divides. Every rank computes the one-process result itself, then the parallel one: the generation's
first rank must return the same final latents (relative difference < 1e-5) and the others None.
One process start per session (they dominate the time); each test reads its part of a session.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from parallel_cases import FOUR_RANK_CASES, TWO_RANK_CASES
from parallel_harness import ok, run_ranks

from diffsynth_cog.models.tiling import TileGrid, map_tiles, tiles_run_by
from diffsynth_cog.parallel import ParallelError, ParallelLayout, shard_bounds
from diffsynth_cog.parallel.call_check import fingerprint
from diffsynth_cog.parallel.prompts import read_prompt_file
from diffsynth_cog.parallel.vae import assign_tiles

RTOL = 1e-5

# ----------------------------------------------------------------------------------------------
# Layouts, shards, tiles, prompt files: no processes


def test_layout_takes_the_ranks_that_are_left_and_numbers_ulysses_innermost():
    layout = ParallelLayout.resolve(8, cfg_parallel=True, ulysses_degree=None, ring_degree=2, num_heads=48)
    assert (layout.cfg, layout.ring, layout.ulysses, layout.groups) == (2, 2, 2, 1)
    assert layout.name() == "cfg2xulysses2xring2"
    assert [layout.rank(layout.coords(r)) for r in range(8)] == list(range(8))
    assert layout.ranks(5, vary=("ulysses",)) == [4, 5]  # neighbours exchange the most
    assert layout.ranks(5, vary=("ring",)) == [5, 7]
    assert layout.ranks(5, vary=("half", "ring", "ulysses")) == list(range(8))
    groups = ParallelLayout.resolve(8, cfg_parallel=False, ulysses_degree=2, group_size=2)
    assert groups.groups == 4 and groups.ranks(5, vary=("ulysses",)) == [4, 5]


def test_ranks_are_numbered_like_digits_of_the_named_dimensions_and_groups_follow():
    from diffsynth_cog.parallel.mesh import GROUP_KINDS

    layout = ParallelLayout(cfg=2, ring=2, ulysses=3, groups=2)
    assert layout.world == 24 and layout.group_size == 12 and layout.sequence == 6
    for rank in range(24):
        c = layout.coords(rank)
        assert rank == ((c.group * 2 + c.half) * 2 + c.ring) * 3 + c.ulysses  # the module docstring's formula
    assert layout.ranks(13, vary=GROUP_KINDS["generation"]) == list(range(12, 24))
    assert layout.ranks(13, vary=GROUP_KINDS["sequence"]) == [12, 13, 14, 15, 16, 17]
    assert layout.ranks(13, vary=GROUP_KINDS["ring"]) == [13, 16] and layout.ranks(13, vary=("half",)) == [13, 19]
    assert layout.name() == "2 groups of cfg2xulysses3xring2"
    with pytest.raises(ParallelError, match="parallel degree ring must be an integer >= 1; got True"):
        ParallelLayout(ring=True)


def test_enable_parallel_takes_a_layout_or_degrees_and_refuses_a_mix_or_a_misspelt_degree():
    from parallel_cases import tiny_pipeline

    pipe = tiny_pipeline("5b")
    with pytest.raises(ParallelError, match=r"a ParallelLayout or the degrees \['ring_degree'\], not both"):
        pipe.enable_parallel(ParallelLayout(cfg=2), ring_degree=2)
    with pytest.raises(TypeError, match="ulysses"):
        pipe.enable_parallel(ulysses=2)  # the keyword is ulysses_degree
    with pytest.raises(ParallelError, match="launch every rank with torchrun"):
        pipe.enable_parallel(ParallelLayout(cfg=2))
    assert pipe.parallel is None


@pytest.mark.parametrize(
    "world,kwargs,message",
    [
        (4, dict(cfg_parallel=True, ulysses_degree=4), "cfg 2 x ulysses 4 = 8 ranks, but a group has 4"),
        (3, dict(cfg_parallel=True), "cfg 2 does not divide the 3 ranks"),
        (4, dict(cfg_parallel=False, num_heads=30), "ulysses degree 4 does not divide the DiT's 30 attention heads"),
        (
            8,
            dict(cfg_parallel=False, group_size=3),
            "group size must be a positive divisor of the world size 8 (valid: [1, 2, 4, 8]); got 3",
        ),
        (2, dict(cfg_parallel=False, ring_degree=0), "ring_degree must be an integer >= 1"),
    ],
)
def test_layouts_that_cannot_work_are_refused_with_the_numbers(world, kwargs, message):
    with pytest.raises(ParallelError, match=re.escape(message)):
        ParallelLayout.resolve(world, **kwargs)


def test_heads_error_lists_the_valid_ulysses_degrees():
    with pytest.raises(ParallelError, match=r"valid Ulysses degrees: \[1, 2, 3, 5, 6, 10, 15, 30\]"):
        ParallelLayout(ulysses=4).check_heads(30)


def test_token_shards_cover_the_sequence_in_order_and_differ_by_at_most_one():
    for length in (37, 17_776 + 226, 87_976 + 226, 3):
        for parts in (2, 3, 4, 8):
            bounds = shard_bounds(length, parts)
            sizes = [e - s for s, e in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == length and sum(sizes) == length
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(parts - 1))
            assert max(sizes) - min(sizes) <= 1


def test_tiles_go_largest_first_to_the_least_loaded_rank():
    # 480x720 decode: 3 x 3 tiles of 30x45 latents, edge tiles cut to 10 rows / 18 columns
    costs = [r * c for r in (30, 30, 10) for c in (45, 45, 18)]
    owner = assign_tiles(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner, strict=True) if o == r) for r in range(2)]
    assert sorted(loads) == [3690, 3870] and max(loads) / (sum(costs) / 2) < 1.03
    assert assign_tiles([5, 5, 5], 4) == [0, 1, 2]  # more ranks than tiles: some idle


def test_measured_tile_times_replace_areas_once_every_shape_has_run():
    from diffsynth_cog.parallel.vae import TileTimes

    big, wide, tall, corner = (1, 16, 33, 30, 45), (1, 16, 33, 30, 18), (1, 16, 33, 10, 45), (1, 16, 33, 10, 18)
    shapes = [big, big, wide, big, big, wide, tall, tall, corner]
    times = TileTimes()
    assert times.costs(shapes) == [1350.0, 1350.0, 540.0, 1350.0, 1350.0, 540.0, 450.0, 450.0, 180.0]
    times.record(shapes[:3], [1.0, 0.9, 0.8])
    assert times.costs(shapes)[0] == 1350.0  # not every shape measured yet: areas, one unit for all
    times.record(shapes, [1.2, 1.1, 0.7, 1.0, 1.0, 0.6, 0.5, 0.5, 0.45])
    assert times.costs(shapes) == [0.9, 0.9, 0.6, 0.9, 0.9, 0.6, 0.5, 0.5, 0.45]  # the fastest run of each shape
    owner = assign_tiles(times.costs(shapes), 2)
    loads = [sum(c for c, o in zip(times.costs(shapes), owner, strict=True) if o == r) for r in range(2)]
    assert max(loads) - min(loads) < 0.5  # small tiles that cost more than their area are balanced by time


def test_a_tile_runner_sees_every_tile_and_its_results_are_stitched_as_without_one():
    x = torch.randn(1, 2, 3, 8, 12)
    grid = TileGrid((8, 12), (4, 6), (3, 4))
    seen = []

    def backwards(shapes, run_one):  # runs the tiles in reverse order, as another rank might
        seen.append([s[-2:] for s in shapes])
        assert all(s[:-2] == (1, 2, 3) for s in shapes)
        return list(reversed([run_one(i) for i in reversed(range(len(shapes)))]))

    plain = map_tiles(x, grid, lambda tile, start: tile * 2 + start[0])
    with tiles_run_by(backwards):
        spread = map_tiles(x, grid, lambda tile, start: tile * 2 + start[0])
    assert torch.equal(plain, spread)
    assert seen == [[(4, 6), (4, 6), (4, 4), (4, 6), (4, 6), (4, 4), (2, 6), (2, 6), (2, 4)]]


def test_fingerprints_tell_different_arguments_apart():
    a = torch.arange(12.0).reshape(3, 4)
    assert fingerprint(a) == fingerprint(a.clone()) and fingerprint(a) != fingerprint(a + 1e-3)
    assert fingerprint("cat") != fingerprint("dog") and fingerprint(None) != fingerprint(0)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    assert fingerprint(g1) != fingerprint(g2) and fingerprint(g1) == fingerprint(torch.Generator().manual_seed(1))


def test_prompt_file_lines_and_json_lines_name_outputs_deterministically(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# a batch\n"
        "A red fox, running in the snow!\n"
        "\n"
        '{"prompt": "a cat", "seed": 3, "frames": 49, "output": "cat.mp4", "negative_prompt": "blurry"}\n'
        '{"prompt": "a dog", "num_frames": 129, "output": "/abs/dog.mp4"}\n'
    )
    jobs = read_prompt_file(path, tmp_path / "out")
    assert [j.output for j in jobs] == [
        tmp_path / "out" / "0000-a-red-fox-running-in-the.mp4",
        tmp_path / "out" / "cat.mp4",
        Path("/abs/dog.mp4"),
    ]
    assert (jobs[1].seed, jobs[1].num_frames, jobs[1].negative_prompt, jobs[1].line) == (3, 49, "blurry", 4)
    assert jobs[0].seed is None and jobs[2].num_frames == 129
    assert read_prompt_file(path, tmp_path / "out") == jobs  # the same names on every run


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"prompt": "a", "fps": 8}', r"prompts.txt:1: unknown key\(s\) \['fps'\]"),
        ('{"prompt": "a", "num_frames": 50}', "num_frames must be 4k\\+1"),
        ('{"prompt": "a", "seed": "7"}', "seed must be an integer"),
        ('{"seed": 1}', 'needs a non-empty "prompt"'),
        ('{"prompt": "a",}', "not valid JSON"),
        ('{"prompt": "a", "output": "x.mp4"}\n{"prompt": "b", "output": "x.mp4"}', "also the output of line 1"),
    ],
)
def test_bad_prompt_file_lines_are_refused_with_the_line(tmp_path, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(line + "\n")
    with pytest.raises(ParallelError, match=message):
        read_prompt_file(path, tmp_path)


def test_enable_parallel_without_a_process_group_says_how_to_launch():
    from parallel_cases import tiny_pipeline

    with pytest.raises(ParallelError, match="launch every rank with torchrun .*init_process_group"):
        tiny_pipeline("5b").enable_parallel()


def test_a_bad_ulysses_head_grouping_is_refused_before_anything_starts():
    from parallel_cases import tiny_pipeline

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ParallelError, match=f"ulysses_head_chunks must be an integer >= 1; got {bad!r}"):
            tiny_pipeline("5b").enable_parallel(ulysses_head_chunks=bad)
    with pytest.raises(ParallelError, match="ulysses_transport must be one of .*; got 'nvlink'"):
        tiny_pipeline("5b").enable_parallel(ulysses_transport="nvlink")


def test_cli_defaults_use_every_rank_cfg_halves_first():
    from diffsynth_cog.cli.generate_checks import parallel_layout
    from diffsynth_cog.cli.main import build_parser

    def layout(*argv: str, world: int, batch: bool = False) -> ParallelLayout:
        args = build_parser().parse_args(["generate", "--prompt", "x", *argv])
        return parallel_layout(args, world, batch)

    assert layout(world=2) == ParallelLayout(cfg=2)
    assert layout(world=8) == ParallelLayout(cfg=2, ulysses=4)
    assert layout("--cfg-scale", "1", world=2) == ParallelLayout(ulysses=2)  # no second half to share
    assert layout(world=3) == ParallelLayout(ulysses=3)
    assert layout("--ulysses", "2", world=2) == ParallelLayout(ulysses=2)
    assert layout("--ring", "2", world=8) == ParallelLayout(cfg=2, ring=2, ulysses=2)
    assert layout(world=8, batch=True) == ParallelLayout(groups=8)  # a batch: one GPU per video by default
    assert layout("--cfg-parallel", "on", "--ulysses", "2", world=8, batch=True) == ParallelLayout(
        cfg=2, ulysses=2, groups=2
    )
    with pytest.raises(ParallelError, match=r"cfg 2 x ulysses 3 = 6 ranks, but a group has 4"):
        layout("--cfg-parallel", "on", "--ulysses", "3", world=4)


class MaskPart:
    """An attention part (a mask, as a sparse-attention part would be) for the compatibility checks."""

    name = "text-mask"

    def build(self, layout, device, kernel=None):  # noqa: ANN001, ANN201
        return lambda q, k, v: v

    def check_compatible(self, parts):  # noqa: ANN001, ANN201
        """Goes with every part; the split is what refuses a mask inside a ring."""


def split_for(layout: ParallelLayout):  # noqa: ANN201 - a split of rank 0 without process groups
    from diffsynth_cog.parallel.mesh import ProcessMesh
    from diffsynth_cog.parallel.split import ParallelSplit

    mesh = ProcessMesh(layout, 0, layout.coords(0), tuple(range(layout.world)), None, None, None, None)
    return ParallelSplit(mesh)


def test_the_split_refuses_what_it_cannot_share_when_the_denoiser_is_built(monkeypatch):
    from parallel_cases import tiny_pipeline

    from diffsynth_cog.denoise.denoiser import Denoiser

    dit = tiny_pipeline("5b").dit  # 4 heads
    with pytest.raises(
        ParallelError, match="attention part 'text-mask' cannot combine with the split 'parallel:ring2'"
    ):
        Denoiser(dit, attention=MaskPart(), split=split_for(ParallelLayout(ring=2)))
    monkeypatch.setattr(
        "diffsynth_cog.denoise.denoiser.check_backend", lambda name: name
    )  # as if sageattention were here
    with pytest.raises(ParallelError, match="'sage' cannot combine with the split 'parallel:ulysses2xring2'"):
        Denoiser(dit, attention="sage", split=split_for(ParallelLayout(ring=2, ulysses=2)))
    with pytest.raises(ParallelError, match="ulysses degree 3 does not divide the DiT's 4 attention heads"):
        Denoiser(dit, split=split_for(ParallelLayout(ulysses=3)))
    Denoiser(dit, attention=MaskPart(), split=split_for(ParallelLayout(ulysses=2, cfg=2)))  # masks go with Ulysses


# ----------------------------------------------------------------------------------------------
# Two ranks


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from parallel_cases import two_rank_session
    from tiny_text import make_tiny_text_folder

    text = make_tiny_text_folder(tmp_path_factory.mktemp("text"))
    start = time.monotonic()
    results = ok(run_ranks(2, two_rank_session, tmp_path_factory.mktemp("two-ranks"), str(text)))
    print(f"two-rank session: {time.monotonic() - start:.1f} s")
    return results


def check_generations(results: list[dict], cases: list[dict]) -> None:
    for case in cases:
        name = case["name"]
        ranks = [r["generations"][name] for r in results]
        world = len(results)
        group_size = case["layout"].get("group_size", world)
        leaders = [r for r in range(world) if r % group_size == 0]
        assert [r for r in range(world) if ranks[r]["returned"]] == leaders, name  # the others return None
        for r in leaders:
            assert ranks[r]["rel"] < RTOL, (name, ranks[r]["rel"])
        skipped = ranks[0]["skipped"]
        assert skipped[0] == skipped[1], name  # the step cache decides alike on every rank


@pytest.mark.parametrize("case", TWO_RANK_CASES, ids=[c["name"] for c in TWO_RANK_CASES])
def test_two_ranks_give_the_one_process_latents(two_ranks, case):
    check_generations(two_ranks, [case])


def test_pipelined_ulysses_exchange_equals_whole_sequence_attention_for_any_head_grouping(two_ranks):
    for r in two_ranks:
        assert set(r["ulysses"]) == {"chunks1", "chunks2", "chunks3", "differentiable"}
        assert all(v < RTOL for v in r["ulysses"].values()), r["ulysses"]


def test_the_step_cache_skips_the_same_steps_on_two_ranks(two_ranks):
    skipped = two_ranks[0]["generations"]["step-cache-ulysses2"]["skipped"]
    assert skipped[0] and skipped[0] == skipped[1]  # it did skip, and the parallel run skipped the same


def test_parallel_vae_equals_the_one_process_tiled_vae(two_ranks):
    for r in two_ranks:
        assert r["vae"]["decode_equal"] and r["vae"]["encode_equal"], r["vae"]
        assert r["vae"]["untiled_equal"]  # tiled=False: every rank runs it whole
        assert r["vae"]["decode_shape"] == (1, 3, 17, 64, 96)
        assert r["vae"]["timed_decode_equal"]  # the plan from measured tile times changes nothing in the result
    times = [r["vae"]["tile_times"] for r in two_ranks]
    assert times[0] == times[1] and len(times[0]) >= 2  # every rank plans from the same measured table


def test_t5_encodes_each_text_once_across_the_ranks(two_ranks):
    calls = [r["text"]["calls"] for r in two_ranks]
    assert calls == [["a red fox running in the snow"], ["blurry"]]
    assert two_ranks[0]["text"]["rel"] < RTOL and two_ranks[1]["text"]["rel"] is None


def test_ranks_called_with_different_arguments_all_refuse(two_ranks):
    for r in two_ranks:
        for name in ("seed", "prompt_emb"):
            assert r["mismatch"][name].startswith("ParallelError"), r["mismatch"]
            assert f"({name}: rank 0 #" in r["mismatch"][name]


def test_split_composes_with_dit_tiles_int8_weights_and_fullgraph_compile(two_ranks):
    got = two_ranks[0]["compositions"]
    assert set(got) == {"dit-tiles-u2", "dit-tiles-ring2", "int8-u2", "int8-ring2"} | {
        "compiled-int8-u2",
        "compiled-int8-ring2",
    }
    assert all(v < RTOL for v in got.values()), got
    assert all(v is None for v in two_ranks[1]["compositions"].values())


# ----------------------------------------------------------------------------------------------
# Four ranks


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    from parallel_cases import four_rank_session

    start = time.monotonic()
    results = ok(run_ranks(4, four_rank_session, tmp_path_factory.mktemp("four-ranks")))
    print(f"four-rank session: {time.monotonic() - start:.1f} s")
    return results


@pytest.mark.parametrize("case", FOUR_RANK_CASES, ids=[c["name"] for c in FOUR_RANK_CASES])
def test_four_ranks_give_the_one_process_latents(four_ranks, case):
    check_generations(four_ranks, [case])


def test_bad_layouts_are_refused_on_every_rank(four_ranks):
    for r in four_ranks:
        assert "cfg 2 x ulysses 4 = 8 ranks, but a group has 4" in r["bad_layouts"]["product"]
        assert "ulysses degree 4 does not divide the DiT's 6 attention heads" in r["bad_layouts"]["heads"]
        assert "ulysses_transport='p2p' exchanges the heads of Ulysses alone" in r["bad_layouts"]["p2p-ring"]
        assert "ulysses4, ulysses_head_chunks None, cpu under gloo" in r["bad_layouts"]["p2p-cpu"]


# ----------------------------------------------------------------------------------------------
# A rank that stops


@pytest.mark.parametrize("given", [True, False], ids=["enable_parallel-timeout", "launch-timeout"])
def test_a_rank_that_stops_answering_stops_the_others_after_the_timeout(tmp_path, given):
    from parallel_cases import rank_stops

    # the 2 s bound: given to enable_parallel, or only to init_process_group (the CLI's --dist-timeout)
    results = run_ranks(2, rank_stops, tmp_path, 8.0, 2.0 if given else None, timeout=120, pg_timeout=2.0 + 58 * given)
    assert results[1] == {"error": "no result"}  # it exited without a word
    survivor = results[0]["ok"]
    assert survivor["error"].startswith("ParallelError: rank 0: Ulysses all-to-all"), survivor
    assert "Another rank stopped" in survivor["error"]
    assert 1.5 < survivor["seconds"] < 7.0  # the 2 s timeout, before the stopped rank would have exited (8 s)


# ----------------------------------------------------------------------------------------------
# The command line under torchrun


def torchrun(nproc: int, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "diffsynth_cog.cli", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_spreads_a_prompt_file_over_rank_groups_and_resumes(tmp_path):
    from tiny_models import save_tiny_model_folder

    model = save_tiny_model_folder(tmp_path / "model", "cogvideox-5b", seed=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red fox\n{"prompt": "a cat", "seed": 3, "num_frames": 9, "output": "cat.mp4"}\n')
    common = ["--model", str(model), "--lora", "none", "--device", "cpu", "--dtype", "fp32", "--height", "32"]
    common += ["--width", "48", "--num-frames", "17", "--steps", "2", "--fps", "8", "--no-progress"]
    common += ["--prompts", str(prompts), "--output-dir", "out"]
    # one video at a time on both ranks (CFG halves), then the file grown by one prompt and re-run with
    # the default of one rank per video: the two finished videos are kept, only the new one is made
    first = torchrun(2, "generate", *common, "--group-size", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    fox, cat = tmp_path / "out" / "0000-a-red-fox.mp4", tmp_path / "out" / "cat.mp4"
    assert fox.stat().st_size > 0 and cat.stat().st_size > 0
    assert "2 prompts: 0 done already, 2 to generate by 1 group(s)" in first.stderr
    stamps = fox.stat().st_mtime_ns, cat.stat().st_mtime_ns
    prompts.write_text(prompts.read_text() + json.dumps({"prompt": "a dog", "seed": 5}) + "\n")
    second = torchrun(2, "generate", *common, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 prompts: 2 done already, 1 to generate by 2 group(s)" in second.stderr
    assert (fox.stat().st_mtime_ns, cat.stat().st_mtime_ns) == stamps
    assert (tmp_path / "out" / "0002-a-dog.mp4").stat().st_size > 0
    assert "rank 1" not in first.stderr + second.stderr  # logs from rank 0 only


def test_cli_refuses_a_bad_prompt_file_before_loading_anything(tmp_path):
    from diffsynth_cog.cli.main import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text('{"prompt": "a", "frames": 48}\n')
    assert main(["generate", "--prompts", str(prompts), "--model", str(tmp_path / "missing"), "--no-download"]) == 2
    assert main(["generate", "--model", str(tmp_path)]) == 2  # neither --prompt nor --prompts


def test_bench_parallel_runs_every_layout_that_fits_and_reports_consistent_timings(tmp_path):
    """The GPU benchmark's own logic, on tiny CPU models (--smoke), so that device time is not spent on its bugs."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_parallel.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    command += ["--smoke", "--frames", "9", "--layouts", "single", "cfg2", "ring2", "cfg2xulysses2"]
    command += ["--steps", "2", "--warmup-steps", "1", "--full-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    runs = json.loads((tmp_path / "bench_parallel.json").read_text())["runs"]
    assert set(runs) == {"9f/single", "9f/cfg2", "9f/ring2", "9f/cfg2xulysses2"}
    assert "needs a divisor of the world size 2" in runs["9f/cfg2xulysses2"]["skipped"]
    for name in ("cfg2", "ring2"):
        entry = runs[f"9f/{name}"]
        assert entry["ranks_per_video"] == 2 and len(entry["step_s"]) == 2 and len(entry["peak_GiB_per_gpu"]) == 2
        assert entry["rel_diff_vs_single"] < 1e-5
        # the speed-up is the single-rank median step over this layout's, from the medians it reports
        single = runs["9f/single"]["median_step_s"]
        assert entry["step_speedup"] == pytest.approx(single / entry["median_step_s"], rel=0.05)  # 4-digit medians
        assert min(entry["step_s"]) <= entry["median_step_s"] <= max(entry["step_s"])
        # a whole 1-step generation encodes the text, runs a step and decodes: more than the text and step alone
        assert entry["full_1_steps_s"] >= entry["text_encode_s"] + entry["median_step_s"]
    assert "frames | layout" in run.stdout
