"""The command line's pipeline factory (:class:`ModelPipelines`) and what the page offers from this machine: the
models (presets plus the model folders in ``--models-dir``), the LoRAs found there, the attention kernels that
work here. Download progress reaches the page as bytes per file, read from the files being written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffsynth_cog.cli.webui.bridge import ModelSetup, Report

if TYPE_CHECKING:
    from diffsynth_cog.pipeline.cog_video import CogVideoPipeline

logger = logging.getLogger(__name__)


def model_choices(models_dir: str | Path, given: str) -> dict[str, dict[str, Any]]:
    """Model name -> its family's defaults (height, width, num_frames, fps), the most frames one pass makes
    (``long_frames``) and the family's name (``family``): ``given`` (``--model``) first, then
    the presets, then model folders under ``models_dir`` (any folder with ``transformer/config.json``)."""
    from diffsynth_cog.cli.checks import choose_model
    from diffsynth_cog.families import get_family
    from diffsynth_cog.hub.presets import PRESETS

    names = [given, *(n for n, p in PRESETS.items() if p.family is not None)]
    names += sorted(str(c.parents[1]) for c in Path(models_dir).glob("*/*/transformer/config.json"))
    found: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(names):
        try:
            family = get_family(choose_model(name).family)
            found[name] = family.defaults() | {"long_frames": family.long_frames, "family": family.name}
        except (ValueError, KeyError, OSError) as error:
            logger.info("model %s is not offered: %s", name, error)
    return found


def local_loras(models_dir: str | Path) -> list[str]:
    """LoRA choices: "auto", "none", the long-video presets, and the .safetensors files under ``models_dir/lora``."""
    from diffsynth_cog.cli.checks import LONG_VIDEO_LORAS
    from diffsynth_cog.hub.presets import get_preset

    presets = list(dict.fromkeys(LONG_VIDEO_LORAS.values()))
    preset_files = {get_preset(name).result_path(models_dir) for name in presets}
    found = sorted(str(p) for p in (Path(models_dir) / "lora").glob("*.safetensors") if p not in preset_files)
    return ["auto", "none", *presets, *found]


def working_backends() -> tuple[str, ...]:
    """The attention kernels that work on this machine (``models.attention.check_backend`` accepts them)."""
    from diffsynth_cog.models.attention import check_backend
    from diffsynth_cog.pipeline.options import ATTENTION_BACKENDS

    working = []
    for name in ATTENTION_BACKENDS.names():
        try:
            check_backend(name)
        except (ValueError, ImportError, RuntimeError) as error:
            logger.debug("attention kernel %s is not offered: %s", name, error)
        else:
            working.append(name)
    return tuple(working)


IN_FLIGHT = ".incomplete"  # the modelscope client writes a file under this suffix, renamed once complete


def download_line(folder: Path, start: dict[Path, int]) -> str | None:
    """What is being downloaded under ``folder``: the bytes of each file in flight (or grown since ``start``),
    named by its path under ``folder``; None when nothing grows."""
    in_flight, done = [], 0
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue  # the downloader's own records (hidden), folders
        name = str(relative)
        size = path.stat().st_size
        if size == start.get(path):
            continue
        if name.endswith(IN_FLIGHT):
            in_flight.append(f"{name.removesuffix(IN_FLIGHT)} {size / 2**20:,.2f} MiB")
        else:
            done += 1
    if not in_flight and not done:
        return None
    finished = f"{done} file{'s' if done != 1 else ''} done"
    return f"downloading the model: {', '.join(in_flight[-4:])}" + (f" ({finished})" if in_flight else f": {finished}")


@contextlib.contextmanager
def watch_downloads(folder: Path, report: Report, every: float = 0.25) -> Iterator[None]:
    """While the block runs, reports the bytes of each file being downloaded under ``folder``."""
    done = threading.Event()
    start = {p: p.stat().st_size for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}

    def watch() -> None:
        while not done.wait(every):
            line = None
            with contextlib.suppress(OSError):  # a file renamed or removed while listed: the next look sees it
                line = download_line(folder, start) if folder.exists() else None
            if line:
                try:
                    report(0.0, line)
                except Exception:  # noqa: BLE001 - Stop was pressed: the job's own thread raises it after the download
                    return

    thread = threading.Thread(target=watch, name="webui-downloads", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class ModelPipelines:
    """The command line's pipeline factory: loads the chosen model on its first job (downloading it first, with
    the bytes of each file shown), then between jobs swaps the merged LoRA (restoring the exact base weights
    first), the offload mode and the attention kernel; another model or quantization reloads."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pipe: CogVideoPipeline | None = None
        self.manager: Any = None
        self.model: Any = None  # cli_checks.ModelChoice of the loaded model
        self.loaded: tuple[str, str] = ("", "")  # (model, quantize) of the loaded pipeline
        self.lora: tuple[Path | None, float] = (None, 0.0)
        self.lock = threading.Lock()

    def __call__(self, setup: ModelSetup, report: Report = lambda f, t: None) -> CogVideoPipeline:
        from diffsynth_cog.cli.checks import choose_lora
        from diffsynth_cog.cli.webui.controls import control
        from diffsynth_cog.models.attention import set_attention_backend

        offload = control("offload", "Offload").choices
        if setup.memory not in offload:
            raise ValueError(f"memory mode (Offload) must be one of {', '.join(offload)}; got {setup.memory!r}")
        with self.lock:
            set_attention_backend(setup.attention)
            if self.pipe is None or self.loaded != (setup.model or self.args.model, setup.quantize):
                self._load(setup, report)
            choice = choose_lora(setup.lora, self.model, setup.num_frames, self.args.models_dir)
            with watch_downloads(Path(self.args.models_dir), report):
                _, lora = fetch_models_checked(self.model, choice, self._fetch())
            wanted = (lora, setup.lora_alpha if lora is not None else 0.0)
            if wanted != self.lora:
                if setup.quantize != "none" and lora is not None:
                    raise ValueError("a LoRA cannot be merged into quantized layers: set Quantization to none")
                self.manager.clear_loras()
                self.lora = (None, 0.0)
                if lora is not None:
                    report(0.0, f"merging the LoRA {lora.name}")
                    self.manager.load_lora(lora, lora_alpha=setup.lora_alpha)
                self.lora = wanted
            if self.pipe.offloader.mode != setup.memory:
                self.pipe.offloader.set_mode(setup.memory)
            return self.pipe

    def _fetch(self) -> dict[str, Any]:
        return dict(models_dir=self.args.models_dir, download=not self.args.no_download, progress=False)

    def _load(self, setup: ModelSetup, report: Report) -> None:
        import torch

        from diffsynth_cog import CogVideoPipeline, ModelManager
        from diffsynth_cog.cli.checks import DTYPES, LoRAChoice, choose_model, resolve_device

        name = setup.model or self.args.model
        self.pipe = self.manager = None  # the old model's memory goes before the new one loads
        model = choose_model(name)
        report(0.0, f"looking for {name}")
        with watch_downloads(Path(self.args.models_dir), report):
            model_dir, _ = fetch_models_checked(model, LoRAChoice(), self._fetch())
        self.model = dataclasses.replace(model, local=model_dir, preset=None)
        report(0.0, f"loading {name}")
        # Loaded on the CPU; the pipeline moves what the offload mode keeps on the device.
        self.manager = ModelManager(torch_dtype=getattr(torch, DTYPES[self.args.dtype]), device="cpu")
        self.manager.load_models([model_dir])
        device = resolve_device(self.args.device)
        if setup.quantize != "none":
            from diffsynth_cog.quantization import quantize_dit

            dit = self.manager.fetch_model("cog_dit", require=True)
            quantize_dit(dit.to(device), setup.quantize)
        self.pipe = CogVideoPipeline.from_model_manager(self.manager, device=device)
        self.loaded, self.lora = (name, setup.quantize), (None, 0.0)


def fetch_models_checked(model: Any, lora: Any, fetch: dict[str, Any]) -> tuple[Path, Path | None]:
    """``fetch_models``, with the offline case said for the page."""
    from diffsynth_cog.cli.checks import fetch_models
    from diffsynth_cog.hub.downloads import DownloadError

    try:
        return fetch_models(model, lora, **fetch)
    except DownloadError as error:
        if error.missing and not error.failed:
            raise DownloadError(
                f"the model is not on this machine and the download failed (offline?). {error}",
                missing=error.missing, failed=error.failed,
            ) from None  # fmt: skip
        raise
