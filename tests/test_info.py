"""``diffsynth-cog info``: versions, GPUs, attention kernels and local models, for bug reports."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import types
from pathlib import Path

import pytest
import torch
from modelscope_emulator import emulated_modelscope

from diffsynth_cog.cli.main import main
from diffsynth_cog.hub.downloads import download_models
from diffsynth_cog.hub.presets import get_preset
from diffsynth_cog.models.attention import fa3_available

LORA = "ExVideo-CogVideoX-LoRA-129f-v1"
LORA_REPO = "ECNU-CILab/ExVideo-CogVideoX-LoRA-129f-v1"
LORA_FILE = "ExVideo-CogVideoX-LoRA-129f-v1.safetensors"


def run_info(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["info", *args]) == 0
    return capsys.readouterr().out


def test_info_reports_versions_gpus_and_kernels(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = run_info(capsys, "--models-dir", str(tmp_path / "models"))
    assert f"Python {platform.python_version()}" in out
    assert f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}" in out
    for name in ("transformers", "modelscope", "diffusers", "lightning"):
        assert f"  {name}" in out and importlib.metadata.version(name) in out
    assert "GPUs:\n  none (torch.cuda.is_available() is False)" in out  # CI has no GPU
    assert "  sdpa        ok" in out
    assert "  sdpa-cudnn  needs a CUDA GPU" in out
    assert ("  fa3         ok" in out) == fa3_available()
    assert "  auto -> sdpa (on cpu)" in out
    assert f"  {LORA}  absent" in out

    data = json.loads(run_info(capsys, "--models-dir", str(tmp_path / "models"), "--json"))
    assert data["packages"]["torch"] == importlib.metadata.version("torch")
    assert data["gpus"] == [] and data["attention"]["backends"]["sdpa"] == "ok"


def test_info_says_why_a_kernel_does_not_import(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An installed package built for another CUDA typically fails at import with an OSError.
    broken = tmp_path / "site" / "sageattention"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise OSError('libcudart.so.13: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    out = run_info(capsys, "--models-dir", str(tmp_path / "models"))
    assert "  sage        does not import: OSError: libcudart.so.13: cannot open shared object file" in out


def test_info_lists_each_gpu_with_memory_and_capability(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cards = [("NVIDIA H100 80GB HBM3", 85_045_231_616, 9, 0), ("NVIDIA A100-SXM4-40GB", 42_505_273_344, 8, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: types.SimpleNamespace(
            name=cards[i][0], total_memory=cards[i][1], major=cards[i][2], minor=cards[i][3]
        ),
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cards[0][2:])
    out = run_info(capsys, "--models-dir", str(tmp_path / "models"))
    assert "  cuda:0  NVIDIA H100 80GB HBM3, 79.2 GiB, compute capability 9.0" in out
    assert "  cuda:1  NVIDIA A100-SXM4-40GB, 39.6 GiB, compute capability 8.0" in out
    assert "  sdpa-cudnn  ok" in out
    assert f"  auto -> {'fa3' if fa3_available() else 'sdpa-cudnn'} (on cuda:0)" in out


def test_info_recognises_the_presets_under_models(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    lora_bytes = os.urandom(3000)
    with emulated_modelscope(monkeypatch, tmp_path, {LORA_REPO: {LORA_FILE: lora_bytes}}):
        (lora,) = download_models(LORA, models_dir=models, progress=False)  # verified, with a manifest
    # CogVideoX-5B copied by hand, complete; CogVideoX-2B copied by hand, without its weights.
    five = get_preset("CogVideoX-5B").local_dir(models)
    for rel in get_preset("CogVideoX-5B").required:
        target = five / rel.replace("*", "diffusion_pytorch_model" if "transformer" in rel else "model")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x" * 10)
    two = get_preset("CogVideoX-2B").local_dir(models)
    (two / "vae").mkdir(parents=True)
    (two / "vae" / "config.json").write_text("{}")
    (models / "lora" / "my_style.safetensors").write_bytes(b"y" * 2048)

    out = run_info(capsys, "--models-dir", str(models))
    assert f"Models in {models.resolve()}:" in out
    assert f"  {LORA}  verified  {lora}  2.9 KiB" in out
    assert f"  CogVideoX-5B                    present  {five}" in out
    line_2b = next(line for line in out.splitlines() if line.startswith("  CogVideoX-2B "))
    assert "incomplete" in line_2b and "transformer/*.safetensors" in line_2b and "vae/config.json" not in line_2b
    assert "  CogVideoX-5B-I2V                absent" in out
    assert f"  other weights: {models / 'lora' / 'my_style.safetensors'}  2.0 KiB" in out

    os.utime(lora, ns=(lora.stat().st_atime_ns, lora.stat().st_mtime_ns + 10**9))  # touched since the download
    assert f"  {LORA}  changed  {lora}" in run_info(capsys, "--models-dir", str(models))
    lora.unlink()
    assert f"  {LORA}  absent" in run_info(capsys, "--models-dir", str(models))
