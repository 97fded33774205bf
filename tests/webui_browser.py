"""What the web UI's tests share: tiny pipelines and their factory, input files, and a real headless browser (Debian's chromium and
chromedriver, driven by Selenium) on a page served on a free 127.0.0.1 port, with the steps a user takes in it
(type, pick, upload, press Generate, wait for a job's state)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth_cog import CogVideoPipeline
from diffsynth_cog.cli.webui import ModelSetup, UIOptions
from diffsynth_cog.cli.webui.page import build_ui, launch

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Chromium flags that work in a container without a display, a GPU or network access.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1400",
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="needs Debian's chromium and chromium-driver (see .ci/run)"
)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
T2V, I2V = "tiny-t2v", "tiny-i2v"  # the tiny text- and image-to-video models of tiny_studio()
# The tiny models' family values as the page holds them (UIOptions.families).
TINY_FAMILY = {"height": 32, "width": 48, "num_frames": 9, "fps": 8, "long_frames": 129}
SOURCE, IMAGE, OTHER_IMAGE = "source.mp4", "image.png", "other.png"  # tiny_studio()'s input files


def tiny_studio(root: Path) -> dict[str, CogVideoPipeline]:
    """Tiny text- and image-to-video pipelines by model name (:data:`T2V`, :data:`I2V`), and in ``root`` the
    inputs a user gives: a 17-frame 48x32 video (:data:`SOURCE`) and two of its frames as images."""
    from tiny_models import save_tiny_model_folder

    from diffsynth_cog import ModelManager
    from diffsynth_cog.io.video import save_video

    pipes = {}
    for name, preset in ((T2V, "cogvideox-5b"), (I2V, "cogvideox-5b-i2v")):
        folder = save_tiny_model_folder(root / name, preset, seed=2)
        manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
        pipes[name] = CogVideoPipeline.from_model_manager(manager)
    rng = np.random.default_rng(0)
    frames = [Image.fromarray((rng.random((32, 48, 3)) * 255).astype(np.uint8)) for _ in range(17)]
    save_video(frames, root / SOURCE, fps=8)
    frames[0].save(root / IMAGE)
    frames[9].save(root / OTHER_IMAGE)
    return pipes


class SlowPipeline:
    """A tiny pipeline, paused after each step so that the browser sees the progress and can press Stop;
    records the steps it ran."""

    def __init__(self, pipe: CogVideoPipeline, pause: float, steps: list[int]) -> None:
        self.pipe, self.pause, self.steps = pipe, pause, steps

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def _slow(self, callback: Any) -> Any:
        def slow(i: int, t: int, latents: torch.Tensor) -> None:
            self.steps.append(i)
            callback(i, t, latents)
            time.sleep(self.pause)

        return slow

    def generate(self, options: Any, *, callback: Any = None) -> Any:
        return self.pipe.generate(options, callback=self._slow(callback))

    def extend_video(self, *args: Any, callback: Any = None, **keywords: Any) -> Any:
        return self.pipe.extend_video(*args, callback=self._slow(callback), **keywords)


class TinyFactory:
    """A pipeline factory over tiny pipelines by model name (the first is the default); records the model setups
    asked for and refuses the LoRA file ``bad_lora`` with ``bad_message``, as the real loader would."""

    def __init__(
        self, pipes: dict[str, CogVideoPipeline], pause: float = 0.0, bad_lora: str = "", bad_message: str = ""
    ) -> None:
        self.pipes, self.pause, self.bad_lora, self.bad_message = pipes, pause, bad_lora, bad_message
        self.setups: list[ModelSetup] = []
        self.steps: list[int] = []

    def __call__(self, setup: ModelSetup, report: Any = None) -> SlowPipeline:
        self.setups.append(setup)
        if self.bad_lora and setup.lora.endswith(self.bad_lora):
            raise ValueError(self.bad_message)
        pipe = self.pipes.get(setup.model) or next(iter(self.pipes.values()))
        return SlowPipeline(pipe, self.pause, self.steps)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served_page(factory: Any, options: UIOptions, profile: Path) -> Iterator[tuple[Any, str, Any]]:
    """(driver, url, demo): the page served on a free port and a headless browser (its profile in ``profile``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (see .ci/run)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or a driver
    demo = build_ui(factory, options)
    url = launch(demo, options, port=free_port(), block=False)
    browser_options = webdriver.ChromeOptions()
    browser_options.binary_location = CHROMIUM
    browser_options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        browser_options.add_argument(flag)
    driver = webdriver.Chrome(options=browser_options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver, url, demo
    finally:
        driver.quit()
        demo.close()


def open_page(driver: Any, url: str) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, 60, poll_frequency=0.1)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#opt-prompt textarea"))
    # the page's first refresh has drawn the queue (before, the status is absent or a placeholder, and reading the newest
    # job from it would see none, so an earlier test's job would pass for the one a test is about to submit)
    wait.until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, "#status :is(#job-none, .job)")
            and not d.find_elements(By.CSS_SELECTOR, "#job-loading")
        ),
        message="the status panel never drew the job queue",
    )
    return wait


def field(driver: Any, selector: str) -> Any:
    """The field once the page has rendered it (sections render their fields after the page loads)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    located = (By.CSS_SELECTOR, selector)
    return WebDriverWait(driver, 30, poll_frequency=0.1).until(
        expected_conditions.element_to_be_clickable(located), message=f"{selector} is not there to type into"
    )


def type_into(driver: Any, selector: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    found = field(driver, selector)
    for _ in range(3):  # a number field re-rendered mid-typing ("0." -> "0") can move the caret: type it again
        found.send_keys(Keys.CONTROL, "a")
        found.send_keys(Keys.BACKSPACE, str(text))
        time.sleep(0.2)  # let the page's own update of the field land before reading it back
        if found.get_attribute("value") == str(text):
            return
    raise AssertionError(f"{selector}: typed {text!r} three times, the field holds {found.get_attribute('value')!r}")


def pick(driver: Any, control: str, value: str) -> None:
    """Chooses ``value`` in a dropdown (``control``: its element id, e.g. ``opt-model``) as a user types it."""
    type_into(driver, f"#{control} input", value)
    field(driver, f"#{control} input").send_keys("\n")


def open_section(driver: Any, section: str) -> None:
    """Opens a closed section of the controls (``section``: the first word of its title, lower case)."""
    from selenium.webdriver.common.by import By

    found = driver.find_element(By.CSS_SELECTOR, f"#section-{section}")
    if not any(e.is_displayed() for e in found.find_elements(By.CSS_SELECTOR, "input, textarea")):
        found.find_element(By.CSS_SELECTOR, ".label-wrap").click()


def upload(driver: Any, control: str, path: Path) -> None:
    """Gives ``path`` to an image or video input (``control``: its element id) and waits until it is uploaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    shown = f"#{control} img[src], #{control} video[src]"

    def sources(d: Any) -> set[str]:
        return {e.get_attribute("src") for e in d.find_elements(By.CSS_SELECTOR, shown)}

    before = sources(driver)
    wait = WebDriverWait(driver, 30, poll_frequency=0.1)
    located = (By.CSS_SELECTOR, f"#{control} input[type=file]")  # hidden: present once the section is drawn
    wait.until(expected_conditions.presence_of_element_located(located)).send_keys(str(path))
    wait.until(lambda d: sources(d) - before, message=f"{control} never showed {path.name}")


def status_text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#status").text


def job_number(status: str) -> int:
    """The number of the job the status line shows (the newest job), 0 before any."""
    head = status.split(":")[0]
    return int(head.removeprefix("Job ")) if head.startswith("Job ") and head[4:].isdigit() else 0


def generate(driver: Any, wait: Any, prompt: str = "a lighthouse at dusk, waves rolling in") -> int:
    """Types the prompt, presses Generate; returns the new job's number once the page shows it."""
    from selenium.webdriver.common.by import By

    before = job_number(status_text(driver))  # an earlier test's job may still be running: wait for a newer one
    type_into(driver, "#opt-prompt textarea", prompt)
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda d: job_number(status_text(d)) > before, message=f"no job after job {before}")
    return job_number(status_text(driver))


def wait_for_state(driver: Any, wait: Any, job: int, state: str) -> str:
    wait.until(
        lambda d: status_text(d).startswith(f"Job {job}: {state}"),
        message=f"job {job} never showed {state!r}; the page shows: {status_text(driver)!r}",
    )
    return status_text(driver)


def shown_settings(driver: Any) -> dict[str, str]:
    """The shown job's settings table: key -> the text shown."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#status table.settings tr[data-setting]")
    return {row.get_attribute("data-setting"): row.find_element(By.TAG_NAME, "td").text for row in rows}


def record_connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every outgoing TCP connection this process opens from now on (host, port)."""
    seen: list[tuple[str, int]] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def note(address: Any) -> None:
        if isinstance(address, tuple):
            seen.append((str(address[0]), int(address[1])))

    def connect(self: socket.socket, address: Any) -> None:
        note(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        note(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return seen


def page_requests(driver: Any) -> list[str]:
    """URLs of every request the browser sent (Chrome DevTools performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def save_small_png(source: Path, target: Path, max_bytes: int = 300_000) -> None:
    """A screenshot for docs/: 256 colours, optimized, well under ``max_bytes``."""
    from PIL import Image

    image = Image.open(source).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, optimize=True)
    assert target.stat().st_size < max_bytes
