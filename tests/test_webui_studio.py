"""The web UI as a long-video studio, in a real headless browser: an image for image-to-video, a video to edit
and to extend, a video made here continued from the page's own list, the temporal checks in the result panel,
and a first model's download with the bytes of each file shown (a local ModelScope stand-in serving a tiny
model slowly), then the message when it cannot be reached."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
from modelscope_emulator import emulated_modelscope
from tiny_models import save_tiny_model_folder
from webui_browser import (
    I2V,
    IMAGE,
    OTHER_IMAGE,
    SOURCE,
    T2V,
    TINY_FAMILY,
    TinyFactory,
    generate,
    job_number,
    needs_chromium,
    open_page,
    open_section,
    pick,
    save_small_png,
    served_page,
    shown_settings,
    status_text,
    tiny_studio,
    type_into,
    upload,
    wait_for_state,
)

from diffsynth_cog.cli.webui import UIOptions
from diffsynth_cog.io.settings import read_settings
from diffsynth_cog.io.video import load_video_array

DOCS = Path(__file__).resolve().parents[1] / "docs"


def ui_options(output_dir: Path, **values: Any) -> UIOptions:
    return UIOptions(
        output_dir=output_dir,
        defaults={"model": T2V, "num_inference_steps": 2, "lora": "none", "seed": 4, **values},
        families={T2V: TINY_FAMILY, I2V: TINY_FAMILY},
        choices={"lora": ("none", "auto"), "attention": ("auto", "sdpa")},
        title="diffsynth-cog web UI (tiny test models)",
    )


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str, Path, Any]]:
    """(driver, url, folder, demo): the page over tiny text- and image-to-video pipelines, with input files."""
    root = tmp_path_factory.mktemp("webui-studio")
    factory = TinyFactory(tiny_studio(root))
    with served_page(factory, ui_options(root / "videos"), root / "profile") as (driver, url, demo):
        yield driver, url, root, demo


def newest_video(folder: Path) -> Path:
    return max(folder.glob("*.mp4"), key=lambda p: p.stat().st_mtime)


# Every control set away from its default in the page: (element id suffix, how it is set, the value, the job's form
# value). What each value does to the video is tests/test_webui_controls.py's; this proves that each reaches the job.
PAGE_VALUES = [
    ("height", "type", "48", 48),
    ("width", "type", "32", 32),
    ("num-frames", "type", "17", 17),
    ("fps", "type", "16", 16),
    ("num-inference-steps", "type", "3", 3),
    ("cfg-scale", "type", "3.5", 3.5),
    ("use-dynamic-cfg", "click", None, True),
    ("sampler", "pick", "dpm", "dpm"),
    ("seed", "type", "7", 7),
    ("conventions", "pick", "diffsynth", "diffsynth"),
    ("window-frames", "type", "9", 9),
    ("window-overlap", "type", "0.5", 0.5),
    ("sparse-attention", "type", "window:1", "window:1"),
    ("riflex", "type", "1 4", "1 4"),
    ("step-cache", "type", "0.3", 0.3),
    ("step-cache-method", "pick", "first-block", "first-block"),
    ("extend-by", "type", "8", 8),
    ("context-frames", "type", "9", 9),
    ("input-image", "upload", IMAGE, IMAGE),
    ("input-video", "upload", SOURCE, SOURCE),
    ("denoising-strength", "type", "0.5", 0.5),
    ("offload", "pick", "model", "model"),
    ("quantize", "pick", "int8", "int8"),
    ("attention", "pick", "sdpa", "sdpa"),
    ("tiled", "click", None, False),
    ("dit-tiled", "click", None, True),
    ("lora", "pick", "auto", "auto"),
    ("lora-alpha", "type", "0.5", 0.5),
]


def test_page_values_cover_every_control() -> None:
    from diffsynth_cog.cli.webui.controls import SECTIONS

    ids = {dest.replace("_", "-") for _, _, fields in SECTIONS for dest, _ in fields}
    assert ids == {name for name, *_ in PAGE_VALUES}


@needs_chromium
def test_every_control_set_in_the_page_reaches_the_job(studio) -> None:
    from selenium.webdriver.common.by import By

    driver, url, root, demo = studio
    wait = open_page(driver, url)
    for section in ("long", "image", "memory", "lora"):
        open_section(driver, section)
    for name, how, value, _ in PAGE_VALUES:
        if how == "type":
            type_into(driver, f"#opt-{name} :is(input, textarea)", value)
        elif how == "pick":
            pick(driver, f"opt-{name}", value)
        elif how == "click":
            driver.find_element(By.CSS_SELECTOR, f"#opt-{name} input[type=checkbox]").click()
        else:
            upload(driver, f"opt-{name}", root / value)
    job = generate(driver, wait, "every control")
    form = demo.jobs.get(job).form
    for name, how, _, expected in PAGE_VALUES:
        got = form[name.replace("-", "_")]
        if how == "upload":
            assert Path(got).name == expected, (name, got)
        elif isinstance(expected, bool | str):
            assert got == expected, (name, got)
        else:
            assert float(got) == expected, (name, got)


@needs_chromium
def test_an_image_makes_an_image_to_video_job_and_a_text_model_refuses_it(studio) -> None:
    driver, url, root, demo = studio
    wait = open_page(driver, url)
    newest = demo.jobs.latest()  # a page opened after other tests' jobs shows the newest, not "No jobs yet"
    assert job_number(status_text(driver)) == (newest.id if newest else 0)
    open_section(driver, "image")
    upload(driver, "opt-input-image", root / IMAGE)
    job = generate(driver, wait, "a boat")
    wait_for_state(driver, wait, job, "failed")
    assert "needs an I2V" in driver.find_element("css selector", "#job-error").text
    pick(driver, "opt-model", I2V)
    made = []
    for image in (IMAGE, OTHER_IMAGE):
        if image != IMAGE:
            upload(driver, "opt-input-image", root / image)
        job = generate(driver, wait, "a boat")
        wait_for_state(driver, wait, job, "done")
        assert shown_settings(driver)["model"] == "CogVideoX-5B-I2V"
        made.append(load_video_array(newest_video(root / "videos"))[0].astype(np.float32))
    assert np.abs(made[0] - made[1]).mean() > 0.5  # the image given reached the model


@needs_chromium
def test_a_video_is_edited_extended_and_a_video_made_here_continued_with_its_join_checked(studio) -> None:
    from selenium.webdriver.common.by import By

    driver, url, root, demo = studio
    wait = open_page(driver, url)
    pick(driver, "opt-model", T2V)
    open_section(driver, "image")
    upload(driver, "opt-input-video", root / SOURCE)
    type_into(driver, "#opt-denoising-strength input", "0.5")
    job = generate(driver, wait, "waves")
    wait_for_state(driver, wait, job, "done")
    settings = shown_settings(driver)
    assert (settings["num_frames"], settings["denoising_strength"]) == ("9", "0.5")  # cut to Frames

    type_into(driver, "#opt-denoising-strength input", "")
    open_section(driver, "long")
    type_into(driver, "#opt-extend-by input", "8")
    type_into(driver, "#opt-context-frames input", "9")
    job = generate(driver, wait, "waves")
    text = wait_for_state(driver, wait, job, "done")
    extended = newest_video(root / "videos")
    assert len(load_video_array(extended)[0]) == 17 + 8  # the whole video, then 8 new frames
    assert shown_settings(driver)["continuation"] == "8 frames after 17 (context 9)"
    assert "join at frame 17" in driver.find_element(By.CSS_SELECTOR, "#job-checks").text, text
    assert "Temporal checks" in text and "flicker (VBench)" in text
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":  # the README's picture of a continuation and its checks
        driver.execute_script("document.querySelector('#status').scrollIntoView();")
        time.sleep(0.5)
        driver.save_screenshot(str(root / "extend.png"))
        save_small_png(root / "extend.png", DOCS / "webui-extend.png")

    # A reloaded page has no input video: the page's own list continues the video just made.
    wait = open_page(driver, url)
    open_section(driver, "image")
    pick(driver, "opt-previous-video", extended.name)
    open_section(driver, "long")
    type_into(driver, "#opt-extend-by input", "8")
    job = generate(driver, wait, "waves")
    wait_for_state(driver, wait, job, "done")
    assert len(load_video_array(newest_video(root / "videos"))[0]) == 25 + 8
    assert read_settings(newest_video(root / "videos"))["joins"][0] == 25


@needs_chromium
def test_a_first_model_downloads_with_the_bytes_of_each_file_shown_and_offline_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffsynth_cog.cli.main import build_parser
    from diffsynth_cog.cli.webui.models import ModelPipelines
    from diffsynth_cog.hub import presets

    folder = save_tiny_model_folder(tmp_path / "source", "cogvideox-5b", seed=2)
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    hub_preset = presets.ModelPreset(
        name="tiny-hub", model_id="test/tiny-hub", subfolder="tiny-hub", allow_patterns=("*",),
        required=("transformer/config.json",), family="cogvideox-5b",
    )  # fmt: skip
    away = dataclasses.replace(hub_preset, name="tiny-away", subfolder="tiny-away")
    monkeypatch.setattr(
        presets, "PRESETS", MappingProxyType({**presets.PRESETS, "tiny-hub": hub_preset, "tiny-away": away})
    )
    with emulated_modelscope(monkeypatch, tmp_path, {"test/tiny-hub": files}) as hub:
        hub.bytes_per_second = 300_000  # about 1.5 MB of files: seconds of download to watch
        argv = ["webui", "--model", "tiny-hub", "--device", "cpu", "--dtype", "fp32", "--models-dir"]
        args = build_parser().parse_args([*argv, str(tmp_path / "models")])
        options = dataclasses.replace(
            ui_options(tmp_path / "videos", model="tiny-hub"),
            families={"tiny-hub": TINY_FAMILY, "tiny-away": TINY_FAMILY},
        )
        with served_page(ModelPipelines(args), options, tmp_path / "profile") as (driver, url, _):
            wait = open_page(driver, url)
            job = generate(driver, wait, "a boat")
            seen: list[str] = []
            wait.until(lambda d: seen.append(status_text(d)) or "MiB" in seen[-1], message=str(seen[-5:]))
            line = next(s for s in seen if "MiB" in s)
            assert "downloading the model: " in line and ".safetensors " in line, line
            wait_for_state(driver, wait, job, "done")
            assert (tmp_path / "models" / "tiny-hub" / "vae" / "config.json").is_file()

            hub.stop()  # the hub goes away: the next model cannot be fetched
            pick(driver, "opt-model", "tiny-away")
            start = time.monotonic()
            job = generate(driver, wait, "a boat")
            wait_for_state(driver, wait, job, "failed")
            error = driver.find_element("css selector", "#job-error").text
            assert "the download failed (offline?)" in error, error
            assert time.monotonic() - start < 60
