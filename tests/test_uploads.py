"""LoRA uploads through the real modelscope client, against the local ModelScope emulator.

The emulator answers the client's upload protocol (repo creation, LFS blob upload, commit; see
tests/modelscope_emulator.py), so the bytes a test uploads can be read back from its repositories
and downloaded again through the client.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from modelscope_emulator import ModelScopeEmulator, closed_port_endpoint, emulated_modelscope, isolate_modelscope

from diffsynth_cog.hub.downloads import download_models
from diffsynth_cog.hub.presets import ModelPreset
from diffsynth_cog.hub.uploads import UploadError, upload_lora


def _blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


# ----------------------------------------------------------------------------------------------- uploads
# Through the real modelscope client, against the emulator's upload protocol (repo creation, LFS blob
# upload, commit; see tests/modelscope_emulator.py).
TOKENS = {"secret-token": "me"}


@pytest.fixture
def upload_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[ModelScopeEmulator]:
    with emulated_modelscope(monkeypatch, tmp_path, tokens=TOKENS) as emulator:
        yield emulator


def lora_file(tmp_path: Path, seed: int = 7, name: str = "my_lora.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(_blob(seed, 6000))
    return path


def test_upload_lora_arrives_intact_through_the_real_client(
    upload_hub: ModelScopeEmulator, tmp_path: Path, models_dir: Path
) -> None:
    lora = lora_file(tmp_path)
    assert upload_lora(lora, "me/my-lora", token="secret-token") == "me/my-lora"
    repo = upload_hub.repos["me/my-lora"]
    assert repo.files == {"my_lora.safetensors": lora.read_bytes()}
    assert repo.visibility == 1  # private unless asked otherwise
    assert repo.commits == ["Upload LoRA my_lora.safetensors"]
    # The weights went through the LFS blob store (one PUT of the bytes), then one commit.
    puts = [r for r in upload_hub.requests if r.method == "PUT"]
    assert len(puts) == 1 and puts[0].path.endswith(hashlib.sha256(lora.read_bytes()).hexdigest())

    # The repository exists now: a second upload replaces the file; downloading it gives the new bytes.
    lora.write_bytes(_blob(8, 4000))
    upload_lora(lora, "me/my-lora", token="secret-token", commit_message="v2")
    assert repo.files["my_lora.safetensors"] == lora.read_bytes() and repo.commits[-1] == "v2"
    mine = ModelPreset(name="mine", model_id="me/my-lora", subfolder="lora", files=("my_lora.safetensors",))
    (path,) = download_models("mine", models_dir=models_dir, progress=False, presets={"mine": mine})
    assert path.read_bytes() == lora.read_bytes()


def test_upload_lora_folder_keeps_the_layout(upload_hub: ModelScopeEmulator, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    (folder / "configs").mkdir(parents=True)
    lora_file(folder, name="adapter.safetensors")
    (folder / "configs" / "lora.json").write_text('{"rank": 4}')
    upload_lora(folder, "me/folder-lora", token="secret-token", visibility="public")
    repo = upload_hub.repos["me/folder-lora"]
    assert repo.visibility == 5
    assert repo.files["adapter.safetensors"] == (folder / "adapter.safetensors").read_bytes()
    assert repo.files["configs/lora.json"] == b'{"rank": 4}'


@pytest.mark.parametrize(
    "token,repo_id,expected",
    [
        ("wrong-token", "me/x", "refused the access token"),
        (None, "me/x", "refused the access token"),
        ("secret-token", "someone-else/x", "does not let this token write to someone-else/x"),
    ],
)
def test_upload_lora_token_problems_are_one_clear_error(
    upload_hub: ModelScopeEmulator, tmp_path: Path, token: str | None, repo_id: str, expected: str
) -> None:
    with pytest.raises(UploadError) as info:
        upload_lora(lora_file(tmp_path), repo_id, token=token)
    message = str(info.value)
    assert expected in message and upload_hub.endpoint in message
    assert "MODELSCOPE_API_TOKEN" in message or "token of 'someone-else'" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained client traceback
    assert repo_id not in upload_hub.repos  # nothing was created


def test_upload_lora_offline_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelscope.hub.api import HubApi

    endpoint = closed_port_endpoint()
    isolate_modelscope(monkeypatch, tmp_path / "home", endpoint)
    api = HubApi(endpoint=endpoint, token="secret-token", max_retries=0)  # the client retries for ~15 s otherwise
    with pytest.raises(UploadError) as info:
        upload_lora(lora_file(tmp_path), "me/x", api=api)
    message = str(info.value)
    assert f"cannot reach {endpoint}" in message and "Connection refused" in message and "--endpoint" in message
    assert "\n" not in message and info.value.__cause__ is None


def run_cli(args: list[str], home: Path, endpoint: str) -> subprocess.CompletedProcess[str]:
    """``diffsynth-cog`` in a fresh process (real logging setup, real stderr), the client isolated in home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSCOPE_")}
    env |= {
        "HOME": str(home),
        "MODELSCOPE_CACHE": str(home / "cache"),
        "MODELSCOPE_ENDPOINT": endpoint,
        "MODELSCOPE_API_TOKEN": "",
        "MODELSCOPE_API_MAX_RETRIES": "1",  # read by the client at import (>= 1): not 15 s of retries offline
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "diffsynth_cog.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_upload_lora_cli_failures_print_one_message_and_exit_2(upload_hub: ModelScopeEmulator, tmp_path: Path) -> None:
    lora = str(lora_file(tmp_path))
    for endpoint, token, expected in [
        (upload_hub.endpoint, "wrong-token", "refused the access token"),
        (closed_port_endpoint(), "secret-token", "cannot reach"),
    ]:
        result = run_cli(["upload-lora", lora, "--repo-id", "me/cli", "--token", token], tmp_path / "home", endpoint)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "ERROR" in lines[0] and expected in lines[0], result.stderr
        assert "--token or MODELSCOPE_API_TOKEN" in lines[0] or "--endpoint" in lines[0]


class FakeHubApi:
    """Records the calls upload_lora makes, for argument checks that need no server."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_file(self, **kwargs: Any) -> dict:
        self.calls.append(("upload_file", kwargs))
        return {}

    def upload_folder(self, **kwargs: Any) -> dict:
        self.calls.append(("upload_folder", kwargs))
        return {}


def test_upload_lora_creates_private_repo_then_uploads(tmp_path: Path) -> None:
    lora = tmp_path / "my_lora.safetensors"
    lora.write_bytes(b"weights")
    api = FakeHubApi()
    assert upload_lora(lora, "me/my-lora", api=api) == "me/my-lora"
    assert api.calls[0] == ("create_repo", {"repo_id": "me/my-lora", "visibility": "private", "exist_ok": True})
    assert api.calls[1][0] == "upload_file"
    assert api.calls[1][1]["path_in_repo"] == "my_lora.safetensors"
    assert api.calls[1][1]["path_or_fileobj"] == str(lora)
    with pytest.raises(ValueError, match="owner/name"):
        upload_lora(lora, "no-owner", api=api)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        upload_lora(tmp_path / "missing.safetensors", "me/x", api=api)
