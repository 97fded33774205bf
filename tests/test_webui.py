"""The web UI in a real headless browser: Debian's chromium and chromedriver, driven by Selenium.

The page is served on a free 127.0.0.1 port with a tiny CPU model behind it. The test types a prompt,
presses Generate, sees the denoising progress bar, waits for the video, checks that the browser plays
the right number of frames and that the served mp4 holds them, and saves a screenshot under its tmp
folder. With ``UPDATE_DOCS_SCREENSHOT=1`` it also writes the README's ``docs/webui.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
from tiny_models import save_tiny_model_folder

from diffsynth_cog import CogVideoPipeline, ModelManager
from diffsynth_cog.cli.webui import ModelSetup, UIOptions, build_ui, launch, run_job
from diffsynth_cog.io.video import load_video

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FRAMES, FPS, STEPS = 9, 8, 6
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "webui.png"
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
    "--window-size=1280,1250",
)


class SlowPipeline:
    """The tiny pipeline, paused briefly after each step so the browser can see the progress bar."""

    def __init__(self, pipe: CogVideoPipeline, pause: float) -> None:
        self.pipe, self.pause = pipe, pause

    def generate(self, options: Any, *, callback: Any = None):
        def slow(i: int, t: int, latents: torch.Tensor) -> None:
            callback(i, t, latents)
            time.sleep(self.pause)

        return self.pipe.generate(options, callback=slow)


class TinyFactory:
    """A pipeline factory that records the model setups the page asked for."""

    def __init__(self, pipe: CogVideoPipeline, pause: float = 0.0) -> None:
        self.pipe, self.pause = pipe, pause
        self.setups: list[ModelSetup] = []

    def __call__(self, setup: ModelSetup):
        self.setups.append(setup)
        return SlowPipeline(self.pipe, self.pause)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory: pytest.TempPathFactory) -> CogVideoPipeline:
    folder = save_tiny_model_folder(tmp_path_factory.mktemp("tiny-webui"), "cogvideox-5b", seed=2)
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[folder])
    return CogVideoPipeline.from_model_manager(manager)


def tiny_options(output_dir: Path) -> UIOptions:
    return UIOptions(
        output_dir=output_dir,
        frame_choices=(FRAMES, 49, 129),
        num_frames=FRAMES,
        height=32,
        width=48,
        steps=STEPS,
        fps=FPS,
        loras=("none", "auto"),
        attention_modes=("auto", "sdpa"),
        title="diffsynth-cog web UI (tiny test model)",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_run_job_writes_the_video_and_rejects_bad_input(tiny_pipe: CogVideoPipeline, tmp_path: Path) -> None:
    factory = TinyFactory(tiny_pipe)
    options = tiny_options(tmp_path / "out")
    seen: list[Any] = []
    kwargs: dict[str, Any] = dict(negative_prompt="", steps=2, cfg_scale=6.0, seed=3, sampler="ddim")
    setup = ModelSetup(lora="none", lora_alpha=0.5, memory="model", attention="sdpa")
    result = run_job(
        factory,
        options,
        prompt="a boat",
        num_frames="9",
        setup=setup,
        progress=lambda *a, **k: seen.append(a),
        **kwargs,
    )
    assert result.frames == FRAMES and len(load_video(result.video)) == FRAMES
    assert factory.setups == [ModelSetup("none", 0.5, "model", "sdpa", FRAMES)]
    assert [a[0] for a in seen if isinstance(a[0], tuple)] == [(1, 2), (2, 2)]  # one update per step
    for bad, message in [
        (dict(prompt=" ", num_frames=9), "write a prompt"),
        (dict(prompt="x", num_frames=10), "8k\\+1"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_job(factory, options, setup=setup, **bad, **kwargs)
    assert len(factory.setups) == 1  # bad input is rejected before any model is asked for


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="needs Debian's chromium and chromium-driver (see .ci/run)"
)
def test_generate_in_a_real_browser(tiny_pipe: CogVideoPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or a driver
    connections = record_connections(monkeypatch)
    factory = TinyFactory(tiny_pipe, pause=0.4)
    options = tiny_options(tmp_path / "videos")
    demo = build_ui(factory, options)
    url = launch(demo, options, port=free_port(), block=False)
    browser_options = webdriver.ChromeOptions()
    browser_options.binary_location = CHROMIUM
    browser_options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        browser_options.add_argument(flag)
    driver = webdriver.Chrome(options=browser_options, service=Service(executable_path=CHROMEDRIVER))
    try:
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        driver.get(url)
        prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        prompt.send_keys("a lighthouse at dusk, waves rolling in")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()

        # The progress bar: the pipeline's step callback reaches the page while denoising.
        wait.until(lambda d: "denoising" in d.find_element(By.TAG_NAME, "body").text)
        video = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#video video[src]"))
        duration = wait.until(
            lambda d: d.execute_script("const v = arguments[0]; return v.readyState >= 1 ? v.duration : null;", video)
        )
        assert round(duration * FPS) == FRAMES  # the browser plays 9 frames at 8 fps
        status = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#status").text)
        assert f"{FRAMES} frames, {STEPS} steps, seed 0" in status

        # The served file (what the download button gives) holds the frames at the page's size.
        served = tmp_path / "served.mp4"
        served.write_bytes(urllib.request.urlopen(video.get_attribute("src"), timeout=10).read())
        frames = load_video(served)
        assert len(frames) == FRAMES and frames[0].size == (48, 32)
        assert factory.setups == [ModelSetup("none", 1.0, "none", "auto", FRAMES)]

        # Nothing left this machine: not the page (fonts, scripts, analytics) nor the server.
        requested = {urlsplit(u).hostname for u in page_requests(driver) if urlsplit(u).scheme in ("http", "https")}
        assert requested == {"127.0.0.1"}, requested
        assert connections and {host for host, _ in connections} <= LOCAL_HOSTS, connections

        driver.execute_script("arguments[0].pause(); arguments[0].currentTime = 0.5;", video)
        driver.find_element(By.CSS_SELECTOR, "#model-setup .label-wrap").click()  # show the model settings
        time.sleep(0.5)
        driver.save_screenshot(str(tmp_path / "webui.png"))
        assert (tmp_path / "webui.png").stat().st_size > 10_000
        if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
            save_small_png(tmp_path / "webui.png", DOCS_SCREENSHOT)
    finally:
        driver.quit()
        demo.close()


LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


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
    """The README's screenshot: 256 colours, optimized, well under ``max_bytes``."""
    from PIL import Image

    image = Image.open(source).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, optimize=True)
    assert target.stat().st_size < max_bytes


def test_cli_factory_swaps_lora_and_memory_mode_on_one_loaded_model(tmp_path: Path) -> None:
    import argparse

    from safetensors.torch import save_file

    from diffsynth_cog.cli.main import build_parser
    from diffsynth_cog.cli.webui import ModelPipelines, cmd_webui
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
