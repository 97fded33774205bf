"""``diffsynth-cog info``: what a bug report needs, in one printout.

Versions (Python, torch with its CUDA and cuDNN builds, this package and the libraries it works with),
the GPUs torch sees, which attention kernels import here and which one ``auto`` picks, and which download
presets are found under ``--models-dir`` and in what state. Package versions are read from the installed
metadata, without importing the packages (DeepSpeed alone takes seconds to import).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

# distribution name -> label; "not installed" is reported too, so a missing optional package shows.
PACKAGES = (
    "diffsynth-cog",
    "torch",
    "transformers",
    "diffusers",
    "diffsynth",  # DiffSynth-Studio, for users comparing with it
    "safetensors",
    "modelscope",
    "modelscope-hub",
    "lightning",
    "deepspeed",
    "peft",
    "gradio",
    "flash-attn",
    "fa3-fwd",
    "sageattention",
    "imageio-ffmpeg",
)


def package_versions() -> dict[str, str | None]:
    """Installed version of each of ``PACKAGES`` (None when it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    if versions["diffsynth-cog"] is None:  # run from a source checkout without installing it
        from diffsynth_cog import __version__

        versions["diffsynth-cog"] = f"{__version__} (not installed)"
    return versions


def torch_build() -> dict[str, Any]:
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn}


def gpus() -> list[dict[str, Any]]:
    """One entry per CUDA device: index, name, memory (GiB), compute capability."""
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append(
            {
                "index": index,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}",
            }
        )
    return found


def _imports(module: str) -> str | None:
    """None when ``module`` imports, else the reason it does not."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module.split(".")[0]:
            return "not installed"
        return f"does not import: {e}"
    except Exception as e:  # a wheel built for another torch/CUDA fails with OSError, RuntimeError, ...
        return f"does not import: {type(e).__name__}: {e}"
    return None


def attention_kernels() -> dict[str, Any]:
    """For each attention backend: "ok" or why it cannot run here; and what ``auto`` picks on device 0."""
    import torch

    from diffsynth_cog.models.attention import BACKENDS, FA3_MODULES, _fa3_module, resolve_backend

    cuda = torch.cuda.is_available()
    status: dict[str, str] = {}
    for name in BACKENDS:
        if name == "auto":
            continue
        if name == "sdpa":
            reason = None
        elif name == "sdpa-cudnn":
            reason = None if cuda else "needs a CUDA GPU (falls back to sdpa)"
        elif name in ("fa3", "fa3-fp8"):
            module = _fa3_module()
            reason = None if module is not None else f"not installed ({' or '.join(FA3_MODULES)}; pip install fa3-fwd)"
            if module is not None:
                status[name] = f"ok ({module.__name__})"
                continue
        elif name == "flash-attn":
            reason = _imports("flash_attn")
        elif name == "sage":
            reason = _imports("sageattention")
        else:  # a backend added to attention.BACKENDS without a check here
            reason = "unknown to diffsynth-cog info"
        status[name] = "ok" if reason is None else reason
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    return {"backends": status, "auto": resolve_backend(device), "auto_device": str(device)}


def models_found(models_dir: str | Path) -> dict[str, Any]:
    """The download presets found under ``models_dir`` and their state, plus other weight files there."""
    from diffsynth_cog.hub.downloads import MANIFEST_FOLDER, local_status
    from diffsynth_cog.hub.presets import PRESETS

    root = Path(models_dir)
    statuses = [local_status(preset, root) for preset in PRESETS.values()]
    known = [s.path for s in statuses if s.state != "absent"]
    other = []
    if root.is_dir():
        for path in sorted(root.rglob("*.safetensors")):
            if MANIFEST_FOLDER in path.parts or any(path == k or k in path.parents for k in known):
                continue
            other.append({"path": str(path), "size": path.stat().st_size})
    return {
        "models_dir": str(root.resolve()),
        "presets": [
            {"name": s.preset, "state": s.state, "path": str(s.path), "size": s.size, "missing": list(s.missing)}
            for s in statuses
        ],
        "other_weights": other,
    }


def collect(models_dir: str | Path = "models") -> dict[str, Any]:
    """Everything ``diffsynth-cog info`` prints, as plain data (what ``--json`` writes)."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "torch_build": torch_build(),
        "gpus": gpus(),
        "attention": attention_kernels(),
        "models": models_found(models_dir),
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_report(info: dict[str, Any]) -> str:
    """The human-readable report (paste it into a bug report)."""
    build = info["torch_build"]
    lines = [
        f"diffsynth-cog {info['packages']['diffsynth-cog']}",
        f"Python {info['python']} on {info['platform']}",
        f"torch {build['torch']} (CUDA {build['cuda'] or 'none'}, cuDNN {build['cudnn'] or 'none'})",
        "",
        "Packages:",
    ]
    width = max(len(name) for name in info["packages"])
    for name, version in info["packages"].items():
        if name != "diffsynth-cog":
            lines.append(f"  {name:<{width}}  {version or 'not installed'}")
    lines += ["", "GPUs:"]
    if not info["gpus"]:
        lines.append("  none (torch.cuda.is_available() is False)")
    for gpu in info["gpus"]:
        lines.append(
            f"  cuda:{gpu['index']}  {gpu['name']}, {gpu['memory_gib']} GiB, "
            f"compute capability {gpu['compute_capability']}"
        )
    attention = info["attention"]
    lines += ["", "Attention kernels:"]
    for name, state in attention["backends"].items():
        lines.append(f"  {name:<10}  {state}")
    lines.append(f"  auto -> {attention['auto']} (on {attention['auto_device']})")
    models = info["models"]
    lines += ["", f"Models in {models['models_dir']}:"]
    width = max(len(p["name"]) for p in models["presets"])
    for preset in models["presets"]:
        line = f"  {preset['name']:<{width}}  {preset['state']}"
        if preset["state"] != "absent":
            line += f"  {preset['path']}  {_size(preset['size'])}"
        if preset["missing"]:
            line += f"  missing: {', '.join(preset['missing'])}"
        lines.append(line)
    for other in models["other_weights"]:
        lines.append(f"  other weights: {other['path']}  {_size(other['size'])}")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    info = collect(args.models_dir)
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    return 0


def add_info_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="print versions, GPUs, attention kernels and local models (for bug reports)",
        description="Print what a bug report needs: versions, GPUs, the attention kernels that import, and the "
        "download presets found under --models-dir. Needs no network.",
    )
    p.add_argument("--models-dir", default="models", help="where downloaded models live (default: models)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)
