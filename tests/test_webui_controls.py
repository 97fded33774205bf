"""Every control of the web UI does something: it changes the video, the file, or the model setup the job asks
for; or the job is refused, or done with a note, in the page's words. Run through the page's bridge (the job
queue and ``run_job``) on tiny CPU models; the browser tests prove that the page's controls reach the bridge.

A new control fails :func:`test_every_control_of_the_page_has_a_case` until its effect is stated here.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from webui_browser import I2V, IMAGE, OTHER_IMAGE, SOURCE, T2V, TINY_FAMILY, TinyFactory, tiny_studio

from diffsynth_cog.cli.webui import Job, JobQueue, UIOptions, run_job
from diffsynth_cog.cli.webui.controls import SECTIONS, TOP, control
from diffsynth_cog.io.settings import read_settings
from diffsynth_cog.io.video import load_video_array

BASE = dict(model=T2V, prompt="a boat", height=32, width=48, num_frames=17, fps=8, num_inference_steps=2,
            lora="none", seed=3)  # fmt: skip


@dataclass(frozen=True)
class Effect:
    """What a control's change does: ``kind`` video (other frames), file (the fps written), setup (the model
    setup the job asks the factory for: ``field`` = ``value``), refused or note (``text``, a regex)."""

    kind: str
    text: str = ""
    field: str = ""
    value: Any = None


VIDEO, FILE = Effect("video"), Effect("file")


def refused(text: str) -> Effect:
    return Effect("refused", text)


def note(text: str) -> Effect:
    return Effect("note", text)


def setup(field: str, value: Any) -> Effect:
    return Effect("setup", field=field, value=value)


# (case, the control's value, what it is compared with (values on top of BASE), effect)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], Effect]] = [
    ("height", {"height": 48}, {}, VIDEO),
    ("width", {"width": 32}, {}, VIDEO),
    ("frames", {"num_frames": 9}, {}, VIDEO),
    ("fps", {"fps": 16}, {}, FILE),
    ("steps", {"num_inference_steps": 3}, {}, VIDEO),
    ("cfg scale", {"cfg_scale": 3.0}, {}, VIDEO),
    ("dynamic cfg", {"use_dynamic_cfg": True}, {}, VIDEO),
    ("sampler", {"sampler": "dpm"}, {}, VIDEO),
    ("seed", {"seed": 7}, {}, VIDEO),
    ("conventions", {"conventions": "diffsynth"}, {}, VIDEO),
    ("windows", {"window_frames": 9}, {}, VIDEO),
    ("window overlap", {"window_overlap": 0.5}, {"window_frames": 9}, VIDEO),
    (
        "window overlap alone",
        {"window_overlap": 0.5},
        {},
        note("Window overlap 0.5 does nothing without Window frames"),
    ),
    ("mask", {"sparse_attention": "window:1"}, {}, VIDEO),
    ("unknown mask", {"sparse_attention": "sideways"}, {}, refused("sideways")),
    ("riflex", {"riflex": "1 4"}, {}, VIDEO),
    ("riflex on, no published value", {"riflex": "on"}, {}, refused("no published RIFLEx setting")),
    ("riflex typo", {"riflex": "sometimes"}, {}, refused('RIFLEx: type "on", "off" or two whole numbers')),
    ("step skipping", {"step_cache": 5.0}, {"num_inference_steps": 8}, VIDEO),
    (
        "step skipping method without a calibration",
        {"step_cache_method": "teacache"},
        {"step_cache": 0.3, "num_inference_steps": 8},
        refused("TeaCache has no calibrated polynomial .* Step skipping method"),
    ),
    ("step skipping method alone", {"step_cache_method": "first-block"}, {}, note("does nothing without Step skip")),
    ("extend without a video", {"extend_by": 8}, {}, refused("continues a video: give it with Input video")),
    ("extend", {"extend_by": 8}, {"input_video": SOURCE, "num_frames": 9}, VIDEO),
    ("context frames", {"context_frames": 9}, {"input_video": SOURCE, "num_frames": 9, "extend_by": 8}, VIDEO),
    ("image", {"input_image": OTHER_IMAGE}, {"model": I2V, "input_image": IMAGE, "num_frames": 9}, VIDEO),
    ("image on a text-to-video model", {"input_image": IMAGE}, {}, refused("needs an I2V")),
    ("video", {"input_video": SOURCE}, {"num_frames": 9}, VIDEO),
    (
        "denoising strength",
        {"denoising_strength": 0.3},
        {"input_video": SOURCE, "num_frames": 9, "num_inference_steps": 4},  # 0.7 of 4 steps, by default
        VIDEO,
    ),
    ("denoising strength alone", {"denoising_strength": 0.5}, {}, refused("how much of an Input video is kept")),
    ("offload", {"offload": "model"}, {}, setup("memory", "model")),
    ("quantization", {"quantize": "int8"}, {}, setup("quantize", "int8")),
    ("attention kernel", {"attention": "sdpa"}, {}, setup("attention", "sdpa")),
    ("tiled vae", {"tiled": False}, {}, VIDEO),
    ("dit tiles", {"dit_tiled": True}, {}, note("fits one tile, so the DiT runs untiled")),
    ("lora", {"lora": "auto"}, {}, setup("lora", "auto")),
    ("lora alpha", {"lora_alpha": 0.5}, {}, setup("lora_alpha", 0.5)),
]


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> tuple[JobQueue, TinyFactory, Path]:
    """A job queue over tiny text- and image-to-video pipelines, and the input files of the cases."""
    root = tmp_path_factory.mktemp("webui-controls")
    factory = TinyFactory(tiny_studio(root))
    options = UIOptions(output_dir=root / "videos", families={T2V: TINY_FAMILY, I2V: TINY_FAMILY})
    return JobQueue(lambda job: run_job(factory, options, job)), factory, root


def run(jobs: JobQueue, root: Path, values: dict[str, Any]) -> Job:
    form = {**BASE, **values}
    for name in ("input_video", "input_image"):
        if name in form:
            form[name] = str(root / form[name])
    job = jobs.submit(form)
    end = time.monotonic() + 120
    while not job.finished and time.monotonic() < end:
        time.sleep(0.02)
    assert job.finished, job
    return job


def frames_of(job: Job) -> np.ndarray:
    assert job.state == "done", job.error
    return load_video_array(job.result.video)[0].astype(np.float32)


def test_every_control_of_the_page_has_a_case() -> None:
    controls = {dest for _, _, fields in SECTIONS for dest, _ in fields}
    covered = {name for _, changed, _, _ in CASES for name in changed}
    assert controls <= covered, f"controls without a case: {sorted(controls - covered)}"


def test_no_controls_help_names_a_command_line_flag() -> None:
    for dest, label in (*TOP, *(field for _, _, fields in SECTIONS for field in fields)):
        spec = control(dest, label, {"model": (T2V,)})
        assert "--" not in spec.help, f"{label}: {spec.help}"


@pytest.mark.parametrize("changed,compared,effect", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_control_changes_the_video_or_is_refused_in_the_pages_words(
    studio: tuple[JobQueue, TinyFactory, Path], changed: dict[str, Any], compared: dict[str, Any], effect: Effect
) -> None:
    jobs, factory, root = studio
    job = run(jobs, root, {**compared, **changed})
    if effect.kind == "refused":
        assert job.state == "failed", f"not refused: {job.state}"
        assert re.search(effect.text, job.error), job.error
        assert "--" not in job.error, job.error  # no command-line flags in the page's words
        return
    assert job.state == "done", job.error
    if effect.kind == "note":
        assert any(re.search(effect.text, n) for n in job.notes), job.notes
        return
    if effect.kind == "setup":
        assert getattr(factory.setups[-1], effect.field) == effect.value
        return
    before = run(jobs, root, compared)
    if effect.kind == "file":
        assert read_settings(job.result.video)["fps"] == changed["fps"]
        assert load_video_array(job.result.video)[1] == changed["fps"]
        return
    a, b = frames_of(job), frames_of(before)
    assert a.shape != b.shape or np.abs(a - b).mean() > 0.01, "the video did not change"
