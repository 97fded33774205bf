"""Model downloads through the real modelscope client, against a local ModelScope emulator.

No request leaves 127.0.0.1: the emulator binds there and every test points MODELSCOPE_ENDPOINT
(and the client's cache and credentials) at tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from modelscope_emulator import ModelScopeEmulator, closed_port_endpoint, emulated_modelscope, isolate_modelscope

from diffsynth_cog.hub.downloads import MANIFEST_FOLDER, DownloadError, download_models
from diffsynth_cog.hub.presets import PRESETS, ModelPreset, UnknownPresetError, get_preset

COG_2B = "ZhipuAI/CogVideoX-2b"
LORA_REPO = "ECNU-CILab/ExVideo-CogVideoX-LoRA-129f-v1"
LORA_FILE = "ExVideo-CogVideoX-LoRA-129f-v1.safetensors"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def fake_cogvideox_repo() -> dict[str, bytes]:
    """A tiny stand-in for a CogVideoX repo in the diffusers layout (plus files no preset wants)."""
    index = {"metadata": {}, "weight_map": {"a.weight": SHARDS[0], "b.weight": SHARDS[1]}}
    return {
        "model_index.json": b'{"_class_name": "CogVideoXPipeline"}',
        "scheduler/scheduler_config.json": b'{"prediction_type": "v_prediction"}',
        "text_encoder/config.json": b'{"d_model": 8}',
        "text_encoder/model.safetensors.index.json": json.dumps(index).encode(),
        f"text_encoder/{SHARDS[0]}": _blob(1, 3000),
        f"text_encoder/{SHARDS[1]}": _blob(2, 2000),
        "tokenizer/spiece.model": _blob(3, 500),
        "tokenizer/tokenizer_config.json": b"{}",
        "tokenizer/special_tokens_map.json": b"{}",
        "transformer/config.json": b'{"num_layers": 2}',
        "transformer/diffusion_pytorch_model.safetensors": _blob(4, 4096),
        "vae/config.json": b'{"latent_channels": 4}',
        "vae/diffusion_pytorch_model.safetensors": _blob(5, 2500),
        "README.md": b"# not downloaded",
        "configuration.json": b"{}",
    }


REPOS = {COG_2B: fake_cogvideox_repo(), LORA_REPO: {LORA_FILE: _blob(6, 5000), "README.md": b"readme"}}
WANTED_2B = sorted(p for p in REPOS[COG_2B] if p not in ("README.md", "configuration.json"))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[ModelScopeEmulator]:
    with emulated_modelscope(monkeypatch, tmp_path, REPOS) as emulator:
        yield emulator


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


def file_downloads(hub: ModelScopeEmulator) -> list[str]:
    return sorted(r.query["FilePath"] for r in hub.requests if r.method == "GET" and "FilePath" in r.query)


def test_presets_download_into_diffsynth_layout(hub: ModelScopeEmulator, models_dir: Path) -> None:
    paths = download_models(["CogVideoX-2B", "ExVideo-CogVideoX-LoRA-129f-v1"], models_dir=models_dir, progress=False)
    assert paths == [models_dir / "CogVideo" / "CogVideoX-2b", models_dir / "lora" / LORA_FILE]
    base = paths[0]
    for repo_path in WANTED_2B:
        assert (base / repo_path).read_bytes() == REPOS[COG_2B][repo_path], repo_path
    assert not (base / "README.md").exists() and not (base / "configuration.json").exists()
    assert paths[1].read_bytes() == REPOS[LORA_REPO][LORA_FILE]
    assert not (models_dir / "lora" / "README.md").exists()
    # Each selected file was fetched exactly once; nothing partial is left behind.
    assert file_downloads(hub) == sorted([*WANTED_2B, LORA_FILE])
    assert not list(models_dir.rglob("*.incomplete"))
    manifest = json.loads((models_dir / MANIFEST_FOLDER / "CogVideoX-2B.json").read_text())
    expected_sha = hashlib.sha256(REPOS[COG_2B]["vae/config.json"]).hexdigest()
    assert manifest["files"]["vae/config.json"]["sha256"] == expected_sha


def test_second_call_is_skipped_without_any_request(hub: ModelScopeEmulator, models_dir: Path) -> None:
    names = ["CogVideoX-2B", "ExVideo-CogVideoX-LoRA-129f-v1"]
    first = download_models(names, models_dir=models_dir, progress=False)
    hub.reset_counts()
    assert download_models(names, models_dir=models_dir, progress=False) == first
    assert hub.requests == []  # the manifest vouches for every file: no listing, no download
    # verify=True compares with the repository listing (one request per repo) but downloads nothing.
    download_models(names, models_dir=models_dir, progress=False, verify=True)
    assert file_downloads(hub) == []
    assert {r.path for r in hub.requests} == {
        f"/api/v1/models/{COG_2B}/repo/files",
        f"/api/v1/models/{LORA_REPO}/repo/files",
    }


def test_hand_copied_files_are_checked_and_only_wrong_ones_fetched(hub: ModelScopeEmulator, models_dir: Path) -> None:
    base = models_dir / "CogVideo" / "CogVideoX-2b"
    for repo_path in WANTED_2B:  # as if copied by hand: no manifest
        (base / repo_path).parent.mkdir(parents=True, exist_ok=True)
        (base / repo_path).write_bytes(REPOS[COG_2B][repo_path])
    same_size_wrong_bytes = "transformer/diffusion_pytorch_model.safetensors"
    (base / same_size_wrong_bytes).write_bytes(b"\0" * len(REPOS[COG_2B][same_size_wrong_bytes]))
    download_models("CogVideoX-2B", models_dir=models_dir, progress=False)
    # The size matched, but the Sha256 from the listing did not: only that file is fetched again.
    assert file_downloads(hub) == [same_size_wrong_bytes]
    assert (base / same_size_wrong_bytes).read_bytes() == REPOS[COG_2B][same_size_wrong_bytes]


def test_manifest_does_not_trust_a_replaced_file(hub: ModelScopeEmulator, models_dir: Path) -> None:
    (base,) = download_models("CogVideoX-2B", models_dir=models_dir, progress=False)
    target = base / "vae" / "diffusion_pytorch_model.safetensors"
    target.write_bytes(b"\1" * target.stat().st_size)  # same size, new mtime, wrong content
    hub.reset_counts()
    download_models("CogVideoX-2B", models_dir=models_dir, progress=False)
    assert file_downloads(hub) == ["vae/diffusion_pytorch_model.safetensors"]
    assert target.read_bytes() == REPOS[COG_2B]["vae/diffusion_pytorch_model.safetensors"]


def test_partial_download_is_resumed_with_a_range_request(hub: ModelScopeEmulator, models_dir: Path) -> None:
    data = REPOS[LORA_REPO][LORA_FILE]
    lora_dir = models_dir / "lora"
    lora_dir.mkdir(parents=True)
    # The client keeps an interrupted download as <name>.incomplete and resumes from its length.
    (lora_dir / f"{LORA_FILE}.incomplete").write_bytes(data[:1234])
    (path,) = download_models("ExVideo-CogVideoX-LoRA-129f-v1", models_dir=models_dir, progress=False)
    assert path.read_bytes() == data
    gets = [r for r in hub.requests if r.query.get("FilePath") == LORA_FILE]
    assert [r.headers.get("Range") for r in gets] == ["bytes=1234-"]
    assert not (lora_dir / f"{LORA_FILE}.incomplete").exists()


def test_truncated_file_at_destination_is_refetched(hub: ModelScopeEmulator, models_dir: Path) -> None:
    data = REPOS[LORA_REPO][LORA_FILE]
    (models_dir / "lora").mkdir(parents=True)
    (models_dir / "lora" / LORA_FILE).write_bytes(data[:2000])  # e.g. an interrupted manual copy
    (path,) = download_models("ExVideo-CogVideoX-LoRA-129f-v1", models_dir=models_dir, progress=False)
    assert path.read_bytes() == data
    assert file_downloads(hub) == [LORA_FILE]


def test_checksum_mismatch_is_an_error_and_leaves_no_corrupt_file(hub: ModelScopeEmulator, models_dir: Path) -> None:
    bad = "transformer/diffusion_pytorch_model.safetensors"
    hub.corrupt(COG_2B, bad)
    with pytest.raises(DownloadError) as info:
        download_models("CogVideoX-2B", models_dir=models_dir, progress=False)
    assert set(info.value.failed) == {bad}
    assert bad in str(info.value) and "checksum" in str(info.value)
    base = models_dir / "CogVideo" / "CogVideoX-2b"
    assert not (base / bad).exists() and not list(base.rglob("*.incomplete")) and not list(base.rglob("*tmp"))
    assert (base / "vae/config.json").exists()  # the good files are kept for the next attempt
    assert not (models_dir / MANIFEST_FOLDER / "CogVideoX-2B.json").exists()


def test_offline_error_names_missing_files_and_where_to_put_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, models_dir: Path
) -> None:
    isolate_modelscope(monkeypatch, tmp_path / "home", closed_port_endpoint())
    lora_dir = models_dir / "lora"
    with pytest.raises(DownloadError) as info:
        download_models("ExVideo-CogVideoX-LoRA-129f-v1", models_dir=models_dir, progress=False)
    assert info.value.missing == {LORA_FILE: lora_dir / LORA_FILE}
    message = str(info.value)
    assert "cannot reach http://127.0.0.1:" in message
    assert f"{LORA_FILE} -> {(lora_dir / LORA_FILE).resolve()}" in message
    assert f"https://modelscope.cn/models/{LORA_REPO}/files" in message

    # A CogVideoX folder with only some files: the message lists what is missing, including the
    # shards named by the text encoder's index and the transformer weights (any *.safetensors).
    base = models_dir / "CogVideo" / "CogVideoX-2b"
    for repo_path in ("model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors.index.json"):
        (base / repo_path).parent.mkdir(parents=True, exist_ok=True)
        (base / repo_path).write_bytes(REPOS[COG_2B][repo_path])
    with pytest.raises(DownloadError) as info:
        download_models("CogVideoX-2B", models_dir=models_dir, progress=False)
    missing = info.value.missing
    assert f"text_encoder/{SHARDS[0]}" in missing and f"text_encoder/{SHARDS[1]}" in missing
    assert "transformer/*.safetensors" in missing and "vae/diffusion_pytorch_model.safetensors" in missing
    assert "model_index.json" not in missing and "text_encoder/config.json" not in missing
    assert str((base / "vae" / "diffusion_pytorch_model.safetensors").resolve()) in str(info.value)


def test_offline_with_complete_local_copy_succeeds(
    hub: ModelScopeEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, models_dir: Path
) -> None:
    (base,) = download_models("CogVideoX-2B", models_dir=models_dir, progress=False)
    (models_dir / MANIFEST_FOLDER / "CogVideoX-2B.json").unlink()  # as if copied by hand
    isolate_modelscope(monkeypatch, tmp_path / "home2", closed_port_endpoint())
    assert download_models("CogVideoX-2B", models_dir=models_dir, progress=False) == [base]


def test_endpoint_argument_overrides_the_environment(
    hub: ModelScopeEmulator, monkeypatch: pytest.MonkeyPatch, models_dir: Path
) -> None:
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", closed_port_endpoint())
    (path,) = download_models(
        "ExVideo-CogVideoX-LoRA-129f-v1", models_dir=models_dir, endpoint=hub.endpoint, progress=False
    )
    assert path.read_bytes() == REPOS[LORA_REPO][LORA_FILE]


def test_custom_registry_overrides_presets(hub: ModelScopeEmulator, models_dir: Path) -> None:
    tiny = ModelPreset(
        name="tiny-vae",
        model_id=COG_2B,
        subfolder="custom/vae-only",
        allow_patterns=("vae/*",),
        required=("vae/config.json",),
    )
    (path,) = download_models("tiny-vae", models_dir=models_dir, progress=False, presets={"tiny-vae": tiny})
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == [
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    absent = ModelPreset(name="absent", model_id=LORA_REPO, subfolder="lora", files=("nope.safetensors",))
    with pytest.raises(DownloadError, match="has no file nope.safetensors"):
        download_models("absent", models_dir=models_dir, progress=False, presets={"absent": absent})
    no_repo = ModelPreset(name="no-repo", model_id="nobody/nothing", subfolder="x", files=("a.bin",))
    with pytest.raises(DownloadError, match="cannot list nobody/nothing"):
        download_models("no-repo", models_dir=models_dir, progress=False, presets={"no-repo": no_repo})


def test_unknown_preset_lists_valid_names(models_dir: Path) -> None:
    with pytest.raises(UnknownPresetError) as info:
        download_models(["CogVideoX-5B", "CogVideoX-7B"], models_dir=models_dir)
    for name in PRESETS:
        assert name in str(info.value)
    assert not models_dir.exists()  # rejected before anything was downloaded


def test_presets_match_diffsynth_layout() -> None:
    assert get_preset("CogVideoX-5B").local_dir("models") == Path("models/CogVideo/CogVideoX-5b")
    assert get_preset("CogVideoX-5B-I2V").model_id == "ZhipuAI/CogVideoX-5b-I2V"
    lora = get_preset("ExVideo-CogVideoX-LoRA-129f-v1")
    assert lora.result_path("models") == Path("models/lora") / LORA_FILE
    with pytest.raises(ValueError, match="exactly one"):
        ModelPreset(name="x", model_id="a/b", subfolder="x")
