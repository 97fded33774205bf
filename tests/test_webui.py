"""The web UI: its job queue, its bridge to the pipeline, and the page in a real headless browser (Debian's
chromium and chromedriver, driven by Selenium), served on a free 127.0.0.1 port with a tiny CPU model behind it.

One server and one browser serve every browser test of the module (each test starts with a fresh page). With
``UPDATE_DOCS_SCREENSHOT=1`` the first one writes the README's ``docs/webui.png``.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
from tiny_models import save_tiny_model_folder
from webui_browser import (
    LOCAL_HOSTS,
    TinyFactory,
    generate,
    needs_chromium,
    open_page,
    open_section,
    page_requests,
    pick,
    record_connections,
    save_small_png,
    served_page,
    status_text,
    type_into,
    wait_for_state,
)

from diffsynth_cog import CogVideoPipeline, ModelManager
from diffsynth_cog.cli.webui import JobQueue, ModelSetup, UIOptions, run_job
from diffsynth_cog.cli.webui.command import check_port
from diffsynth_cog.cli.webui.controls import page_words
from diffsynth_cog.io.video import load_video

FRAMES, FPS, STEPS = 9, 8, 3
TINY = "tiny-cogvideox"
BAD_LORA = "vae.safetensors"  # the tiny factory refuses it as the real loader does: a message with <...> in it
BAD_LORA_MESSAGE = "vae.safetensors: not a LoRA tensor (expected '<layer>.lora_A.weight'); pass --lora none"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "webui.png"


def tiny_factory(pipe: CogVideoPipeline, pause: float = 0.0) -> TinyFactory:
    return TinyFactory({TINY: pipe}, pause=pause, bad_lora=BAD_LORA, bad_message=BAD_LORA_MESSAGE)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory: pytest.TempPathFactory) -> CogVideoPipeline:
    folder = save_tiny_model_folder(tmp_path_factory.mktemp("tiny-webui"), "cogvideox-5b", seed=2)
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
    return CogVideoPipeline.from_model_manager(manager)


def tiny_options(output_dir: Path) -> UIOptions:
    return UIOptions(
        output_dir=output_dir,
        defaults={"model": TINY, "num_inference_steps": STEPS, "lora": "none"},
        families={TINY: {"height": 32, "width": 48, "num_frames": FRAMES, "fps": FPS, "long_frames": 129}},
        choices={"lora": ("none", "auto", BAD_LORA), "attention": ("auto", "sdpa")},
        title="diffsynth-cog web UI (tiny test model)",
    )


def finish(job: Any, timeout: float = 120) -> Any:
    end = time.monotonic() + timeout
    while not job.finished and time.monotonic() < end:
        time.sleep(0.05)
    assert job.finished, job
    return job


def form(**values: Any) -> dict[str, Any]:
    return {"model": TINY, "prompt": "a boat", "height": 32, "width": 48, "num_frames": FRAMES, "fps": FPS,
            "num_inference_steps": 2, "lora": "none", "seed": 3, **values}  # fmt: skip


def test_bad_input_is_refused_in_the_pages_words_before_any_model_loads(tiny_pipe, tmp_path: Path) -> None:
    factory = tiny_factory(tiny_pipe)
    options = tiny_options(tmp_path / "out")
    jobs = JobQueue(lambda job: run_job(factory, options, job))
    for bad, message in [
        (dict(prompt=" "), "write a prompt"),
        (dict(num_frames=10), "8k\\+1"),
        (dict(seed=1.5), "Seed must be a whole number; got 1.5"),  # refused, never rounded to 2
        (dict(num_frames=137), "at most 129 frames at once; set Window frames"),
        (dict(riflex="sometimes"), "RIFLEx: type"),
    ]:
        job = finish(jobs.submit(form(**bad)))
        assert job.state == "failed", job
        assert pytest.approx(0) == len(factory.setups), job.error  # nothing loaded for bad input
        import re

        assert re.search(message, job.error), job.error
    assert page_words("pass --lora none or --no-download") == 'pass LoRA "none" or the server\'s --no-download'


def test_a_job_writes_its_video_with_its_settings_and_the_seed_used(tiny_pipe, tmp_path: Path) -> None:
    from diffsynth_cog.io.settings import read_settings

    factory = tiny_factory(tiny_pipe)
    jobs = JobQueue(lambda job: run_job(factory, tiny_options(tmp_path / "out"), job))
    job = finish(jobs.submit(form(seed=-1, lora_alpha=0.5, offload="model", attention="sdpa")))
    assert job.state == "done", job.error
    assert job.result.seed != -1 and job.form["seed used"] == job.result.seed
    assert len(load_video(job.result.video)) == FRAMES
    assert read_settings(job.result.video)["seed"] == job.result.seed
    assert factory.setups == [ModelSetup(TINY, "none", 0.5, "model", "sdpa", FRAMES, "none")]


def test_a_cut_prompt_is_a_note_of_the_job_and_a_refusal_is_one_console_line(
    tiny_pipe, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="diffsynth_cog")
    jobs = JobQueue(lambda job: run_job(tiny_factory(tiny_pipe), tiny_options(tmp_path / "out"), job))
    long = "a lighthouse at dusk, waves rolling in, the beam sweeping over the sea, gulls circling overhead"
    job = finish(jobs.submit(form(prompt=long)))
    assert job.state == "done", job.error
    assert any("was cut off" in note for note in job.notes), job.notes  # T5 reads 7 tokens of the tiny model
    caplog.clear()
    job = finish(jobs.submit(form(riflex="on")))  # refused by the pipeline's checks, after the model is there
    assert job.state == "failed"
    lines = [r for r in caplog.records if r.levelno >= logging.INFO and f"job {job.id}" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None  # one line, no traceback (that is -v's)


def test_stop_ends_the_running_job_at_the_next_step(tiny_pipe, tmp_path: Path) -> None:
    factory = tiny_factory(tiny_pipe, pause=0.3)
    jobs = JobQueue(lambda job: run_job(factory, tiny_options(tmp_path / "out"), job))
    job = jobs.submit(form(num_inference_steps=20))
    queued = jobs.submit(form())
    while len(factory.steps) < 2:
        time.sleep(0.02)
    assert jobs.stop() is job
    at = len(factory.steps)
    finish(job)
    assert job.state == "stopped" and len(factory.steps) <= at + 1  # within one step
    assert finish(queued).state == "done"  # the next job runs on the freed pipeline


def test_a_busy_port_says_to_pass_another_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(OSError, match="is in use .*pass --port"):
            check_port("127.0.0.1", sock.getsockname()[1])


# --------------------------------------------------------------------------------------------- in the browser
@pytest.fixture(scope="module")
def served(tiny_pipe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, TinyFactory, Path, Any]]:
    """(driver, url, factory, folder, demo): one page server and one browser for the module's browser tests."""
    tmp = tmp_path_factory.mktemp("webui-browser")
    factory = tiny_factory(tiny_pipe, pause=0.3)
    with served_page(factory, tiny_options(tmp / "videos"), tmp / "chromium-profile") as (driver, url, demo):
        yield driver, url, factory, tmp, demo


@needs_chromium
def test_seed_minus_one_shows_the_seed_used_and_the_video_plays(served, monkeypatch: pytest.MonkeyPatch) -> None:
    from selenium.webdriver.common.by import By

    driver, url, factory, tmp, demo = served
    connections = record_connections(monkeypatch)
    wait = open_page(driver, url)
    type_into(driver, "#opt-seed input", "-1")
    job = generate(driver, wait)
    wait.until(lambda d: "denoising" in status_text(d))  # the pipeline's step callback reaches the page
    assert len(driver.find_elements(By.CSS_SELECTOR, "#status progress")) == 1  # one progress bar
    text = wait_for_state(driver, wait, job, "done")
    seed = int(driver.find_element(By.CSS_SELECTOR, "#seed-used").text.removeprefix("seed used: "))
    assert seed != -1 and f"seed {seed}" in text
    video = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#video video[src]"))
    duration = wait.until(
        lambda d: d.execute_script("const v = arguments[0]; return v.readyState >= 1 ? v.duration : null;", video)
    )
    assert round(duration * FPS) == FRAMES  # the browser plays 9 frames at 8 fps
    served_file = tmp / "served.mp4"
    served_file.write_bytes(urllib.request.urlopen(video.get_attribute("src"), timeout=10).read())
    assert len(load_video(served_file)) == FRAMES and load_video(served_file)[0].size == (48, 32)

    # Nothing left this machine: not the page (fonts, scripts, analytics) nor the server.
    requested = {urlsplit(u).hostname for u in page_requests(driver) if urlsplit(u).scheme in ("http", "https")}
    assert requested == {"127.0.0.1"}, requested
    assert {host for host, _ in connections} <= LOCAL_HOSTS, connections

    driver.execute_script("arguments[0].pause(); arguments[0].currentTime = 0.5;", video)
    driver.execute_script("window.scrollTo(0, 0);")
    time.sleep(0.5)
    driver.save_screenshot(str(tmp / "webui.png"))
    assert (tmp / "webui.png").stat().st_size > 10_000
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        save_small_png(tmp / "webui.png", DOCS_SCREENSHOT)


@needs_chromium
def test_an_error_with_angle_brackets_is_shown_whole_and_stays_until_the_next_job(served) -> None:
    from selenium.webdriver.common.by import By

    driver, url, factory, tmp, demo = served
    wait = open_page(driver, url)
    open_section(driver, "lora")
    pick(driver, "opt-lora", BAD_LORA)
    job = generate(driver, wait)
    wait_for_state(driver, wait, job, "failed")
    shown = "vae.safetensors: not a LoRA tensor (expected '<layer>.lora_A.weight'); pass LoRA \"none\""
    assert driver.find_element(By.CSS_SELECTOR, "#job-error").text == shown  # whole, and in the page's words
    time.sleep(12)  # longer than a toast lives
    assert driver.find_element(By.CSS_SELECTOR, "#job-error").text == shown
    pick(driver, "opt-lora", "none")
    type_into(driver, "#opt-num-inference-steps input", "1")
    generate(driver, wait)
    assert not driver.find_elements(By.CSS_SELECTOR, "#job-error")  # the next job clears it


@needs_chromium
def test_stop_ends_the_job_within_one_step_and_a_reload_and_a_second_tab_show_the_queue(served) -> None:
    from selenium.webdriver.common.by import By

    driver, url, factory, tmp, demo = served
    wait = open_page(driver, url)
    type_into(driver, "#opt-num-inference-steps input", "30")
    job = generate(driver, wait, "a slow job")
    wait.until(lambda d: "of 30" in status_text(d) and "step 0 " not in status_text(d), message=status_text(driver))
    driver.refresh()  # a reload shows the running job
    wait = open_page(driver, url)
    wait_for_state(driver, wait, job, "running")
    first = driver.current_window_handle
    driver.switch_to.new_window("tab")  # a second tab sees the same job and queues behind it
    wait = open_page(driver, url)
    wait_for_state(driver, wait, job, "running")
    type_into(driver, "#opt-num-inference-steps input", "1")
    second = generate(driver, wait, "the second tab's job")
    wait_for_state(driver, wait, second, "queued")
    assert f"{job}\nrunning" in driver.find_element(By.CSS_SELECTOR, "#jobs").text.replace(" ", "\n")
    driver.close()
    driver.switch_to.window(first)
    at_stop: list[int] = []
    stop = demo.jobs.stop
    demo.jobs.stop = lambda *a: at_stop.append(len(factory.steps)) or stop(*a)  # the steps done when Stop arrives
    driver.find_element(By.CSS_SELECTOR, "#stop").click()
    wait.until(lambda d: f"{job}\nstopped" in d.find_element(By.CSS_SELECTOR, "#jobs").text.replace(" ", "\n"))
    after = factory.steps[at_stop[0] :]  # the stopped job's steps after Stop arrived, then the next job's (from 0)
    assert (after.index(0) if 0 in after else len(after)) <= 1  # the step running when Stop arrived, none after
    wait.until(lambda d: f"{second}\ndone" in d.find_element(By.CSS_SELECTOR, "#jobs").text.replace(" ", "\n"))


@needs_chromium
def test_windows_change_the_video(served) -> None:

    driver, url, factory, tmp, demo = served
    wait = open_page(driver, url)
    type_into(driver, "#opt-num-inference-steps input", "2")
    type_into(driver, "#opt-seed input", "5")
    made = []
    for windows in ("", "5"):
        open_section(driver, "long")
        type_into(driver, "#opt-window-frames input", windows)
        job = generate(driver, wait, "waves")
        text = wait_for_state(driver, wait, job, "done")
        assert ("windows" in text) == bool(windows)
        name = text.split("\n")[0]
        made.append(sorted((tmp / "videos").glob("*.mp4"), key=lambda p: p.stat().st_mtime)[-1])
        assert name
    a, b = (torch.tensor([list(f.getdata()) for f in load_video(p)]).float() for p in made)
    assert a.shape == b.shape and (a - b).abs().mean() > 1.0  # the windows changed the video


def test_cli_factory_swaps_lora_and_memory_mode_on_one_loaded_model(tmp_path: Path) -> None:
    import argparse

    from safetensors.torch import save_file

    from diffsynth_cog.cli.main import build_parser
    from diffsynth_cog.cli.webui import cmd_webui
    from diffsynth_cog.cli.webui.models import ModelPipelines
    from diffsynth_cog.models.attention import get_attention_backend, set_attention_backend

    folder = save_tiny_model_folder(tmp_path / "model", "cogvideox-5b", seed=3)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    lora = tmp_path / "style.safetensors"  # DiffSynth's layout: W += alpha * B @ A
    save_file({"blocks.0.attn1.to_q.lora_A.default.weight": a, "blocks.0.attn1.to_q.lora_B.default.weight": b}, lora)
    args = build_parser().parse_args(["webui", "--model", str(folder), "--device", "cpu", "--dtype", "fp32"])
    assert args.func is cmd_webui and args.host == "127.0.0.1"
    factory = ModelPipelines(argparse.Namespace(**{**vars(args), "models_dir": str(tmp_path / "models")}))
    try:
        pipe = factory(ModelSetup(lora="auto", memory="none", attention="sdpa", num_frames=9))
        weight = pipe.dit.blocks[0].attn1.to_q.weight
        base = weight.detach().clone()
        assert get_attention_backend() == "sdpa"
        # A LoRA and a memory mode on the same loaded model; then back to the exact base weights.
        assert factory(ModelSetup(lora=str(lora), lora_alpha=0.5, memory="model", num_frames=9)) is pipe
        torch.testing.assert_close(weight, base + 0.5 * b @ a)
        assert pipe.offloader.mode == "model"
        factory(ModelSetup(lora="none", memory="none", num_frames=9))
        assert torch.equal(weight, base) and pipe.offloader.mode == "none"
        with pytest.raises(ValueError, match="memory mode"):
            factory(ModelSetup(memory="disk"))
    finally:
        set_attention_backend("auto")


def test_the_download_watch_names_each_file_in_flight_and_ends_quietly_when_the_job_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from diffsynth_cog.cli.webui import JobStopped
    from diffsynth_cog.cli.webui.models import watch_downloads

    crashes: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    lines: list[str] = []

    def report(fraction: float, text: str) -> None:  # the job's report: Stop makes it raise
        lines.append(text)
        raise JobStopped

    (tmp_path / "model" / "vae").mkdir(parents=True)
    (tmp_path / "model" / "config.json").write_text("{}")  # there before: not a download
    with watch_downloads(tmp_path, report, every=0.2):  # the first look comes after both files are written
        (tmp_path / "model" / "vae" / "weights.safetensors.incomplete").write_bytes(b"\0" * 3 * 2**19)
        (tmp_path / "model" / "text.safetensors").write_bytes(b"\0" * 10)  # a file done
        time.sleep(0.5)
    assert lines == ["downloading the model: model/vae/weights.safetensors 1.50 MiB (1 file done)"]
    assert crashes == []  # the watcher ended on Stop without an unhandled exception
