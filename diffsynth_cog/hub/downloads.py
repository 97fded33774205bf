"""Model downloads from ModelScope into DiffSynth-Studio's `models/` layout (uploads: `uploads.py`).

Downloads go through the real `modelscope` client (`snapshot_download(..., local_dir=...)`), which
verifies every file against the Sha256 of the repository listing and resumes `*.incomplete` partial
files with HTTP Range requests. On top of it this module adds:

* the presets of `presets.py` (DiffSynth-Studio's names and folder layout);
* a skip that needs no network: after a verified download a manifest
  (`<models_dir>/.manifests/<preset>.json`: size, Sha256 and mtime of each file) is written; a later call
  whose files still match it returns at once. A file whose mtime changed is re-hashed and compared with
  the recorded Sha256, so a replaced file is not trusted on its size alone;
* when online, files already present are compared with the listing's size and Sha256 and only the
  missing or different ones are fetched;
* errors a user can act on (`DownloadError`): offline machines get the list of missing files and the
  exact local path for each; checksum mismatches are errors, and the client has removed the bad bytes.

Endpoint: the `endpoint` argument, else env `MODELSCOPE_ENDPOINT` (read on every call), else the
client's default (modelscope.cn).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from diffsynth_cog.errors import DiffSynthCogError
from diffsynth_cog.hub.presets import ModelPreset, get_preset
from diffsynth_cog.io.atomic import write_json_atomic

logger = logging.getLogger(__name__)

MANIFEST_FOLDER = ".manifests"
_HASH_BLOCK = 16 * 1024 * 1024


class DownloadError(DiffSynthCogError, RuntimeError):
    """A model could not be downloaded or verified.

    Attributes:
        missing: repository path -> local path where that file must be placed.
        failed: repository path -> reason the download of that file failed.
    """

    def __init__(
        self,
        message: str,
        missing: Mapping[str, Path] | None = None,
        failed: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing: dict[str, Path] = dict(missing or {})
        self.failed: dict[str, str] = dict(failed or {})


# --------------------------------------------------------------------------------------------- local state
@dataclass(frozen=True)
class _RemoteFile:
    path: str
    size: int
    sha256: str | None


def sha256_of(path: Path) -> str:
    """The sha256 (hex) of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _manifest_path(models_dir: Path, preset: ModelPreset) -> Path:
    return models_dir / MANIFEST_FOLDER / f"{preset.name}.json"


def _read_manifest(models_dir: Path, preset: ModelPreset) -> dict[str, dict[str, Any]] | None:
    path = _manifest_path(models_dir, preset)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable download manifest %s: %s", path, error)
        return None
    if data.get("model_id") != preset.model_id or not isinstance(data.get("files"), dict):
        return None
    return data["files"]


def _write_manifest(models_dir: Path, preset: ModelPreset, files: Sequence[_RemoteFile]) -> None:
    local_dir = preset.local_dir(models_dir)
    entries = {}
    for remote in files:
        stat = (local_dir / remote.path).stat()
        entries[remote.path] = {"size": stat.st_size, "sha256": remote.sha256, "mtime_ns": stat.st_mtime_ns}
    # Atomic, so a crash never leaves a truncated manifest that vouches for missing files.
    write_json_atomic(
        _manifest_path(models_dir, preset), {"preset": preset.name, "model_id": preset.model_id, "files": entries}
    )


def _matches_record(path: Path, size: int, sha256: str | None, record: Mapping[str, Any] | None) -> bool:
    """Whether `path` holds the file with this size and Sha256.

    `record` (a manifest entry) serves as a hash cache: a file whose size and mtime are those recorded
    after a verified download is not hashed again (hashing a 10 GB shard takes most of a minute).
    """
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    if stat.st_size != size:
        return False
    if sha256 is None:
        return True
    if record is not None and record.get("sha256") == sha256 and record.get("mtime_ns") == stat.st_mtime_ns:
        return True
    return sha256_of(path) == sha256


def _manifest_complete(local_dir: Path, manifest: Mapping[str, Mapping[str, Any]]) -> bool:
    return bool(manifest) and all(
        _matches_record(local_dir / path, int(entry["size"]), entry.get("sha256"), entry)
        for path, entry in manifest.items()
    )


def _missing_offline(preset: ModelPreset, local_dir: Path, manifest: Mapping[str, Any] | None) -> dict[str, Path]:
    """Repository path (or glob) -> local path, for everything a complete local copy lacks."""
    if manifest:
        return {
            path: local_dir / path
            for path, entry in manifest.items()
            if not _matches_record(local_dir / path, int(entry["size"]), entry.get("sha256"), entry)
        }
    missing: dict[str, Path] = {}
    for requirement in preset.offline_requirements():
        if glob.has_magic(requirement):
            if not any(p.is_file() for p in local_dir.glob(requirement)):
                missing[requirement] = local_dir / requirement
        elif not (local_dir / requirement).is_file():
            missing[requirement] = local_dir / requirement
    # Sharded weights: every shard an index names must be present (shard names differ between repos).
    for index in sorted(local_dir.glob("**/*.index.json")):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError):
            missing[str(index.relative_to(local_dir))] = index  # unreadable index: fetch it again
            continue
        for shard in sorted(shards):
            if not (index.parent / shard).is_file():
                missing[str((index.parent / shard).relative_to(local_dir))] = index.parent / shard
    return missing


@dataclass(frozen=True)
class LocalStatus:
    """What `models_dir` holds of a preset, judged without network access and without hashing.

    `state`: "verified" (every file as the last verified download left it: size and mtime as in the
    manifest), "changed" (all present, but some file's size or mtime differs from the manifest: check it
    with `download --verify`), "present" (everything a complete copy needs is there, no manifest: copied
    by hand), "incomplete" (`missing` names what is not), or "absent" (nothing there).
    """

    preset: str
    state: str
    path: Path
    size: int = 0
    missing: tuple[str, ...] = ()


def local_status(preset: ModelPreset, models_dir: str | os.PathLike[str]) -> LocalStatus:
    """How much of `preset` is in `models_dir` (see `LocalStatus`); reads file metadata only."""
    root = Path(models_dir)
    local_dir = preset.local_dir(root)
    result = preset.result_path(root)
    if not result.exists():
        return LocalStatus(preset.name, "absent", result)
    manifest = _read_manifest(root, preset)
    if manifest:
        missing, changed, size = [], False, 0
        for path, entry in manifest.items():
            try:
                stat = (local_dir / path).stat()
            except FileNotFoundError:
                missing.append(path)
                continue
            size += stat.st_size
            changed |= stat.st_size != entry.get("size") or stat.st_mtime_ns != entry.get("mtime_ns")
        if missing:
            return LocalStatus(preset.name, "incomplete", result, size, tuple(sorted(missing)))
        return LocalStatus(preset.name, "changed" if changed else "verified", result, size)
    missing = tuple(sorted(_missing_offline(preset, local_dir, None)))
    files = [result] if result.is_file() else [f for f in result.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    return LocalStatus(preset.name, "incomplete" if missing else "present", result, size, missing)


# --------------------------------------------------------------------------------------------- client glue
def _effective_endpoint(endpoint: str | None) -> str | None:
    # Read the env var on every call and pass it explicitly: the client caches its default
    # configuration per process, so a later change of MODELSCOPE_ENDPOINT would otherwise be ignored.
    return endpoint or os.environ.get("MODELSCOPE_ENDPOINT") or None


def _describe_endpoint(endpoint: str | None) -> str:
    return endpoint or "the default ModelScope endpoint (https://www.modelscope.cn)"


def _is_network_error(error: BaseException) -> bool:
    import requests

    return isinstance(error, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout))


def _list_remote(preset: ModelPreset, endpoint: str | None) -> list[_RemoteFile]:
    """The repository listing (path, size, Sha256) of the files the preset selects."""
    from modelscope.hub.api import HubApi

    listing = HubApi(endpoint=endpoint).list_repo_files(preset.model_id, "model")
    selected = [
        _RemoteFile(entry.path, int(entry.size), entry.sha256 or None)
        for entry in listing
        if entry.type != "tree" and preset.selects(entry.path)
    ]
    listed = {f.path for f in selected}
    absent = [path for path in preset.files if path not in listed]
    if absent:
        raise DownloadError(
            f"{preset.model_id} on {_describe_endpoint(endpoint)} has no file {', '.join(absent)} "
            f"(preset {preset.name}); it lists: {', '.join(sorted(e.path for e in listing)) or 'nothing'}"
        )
    if not selected:
        raise DownloadError(
            f"{preset.model_id} on {_describe_endpoint(endpoint)} has no file matching "
            f"{', '.join(preset.allow_patterns)} (preset {preset.name})"
        )
    return selected


def _offline_message(preset: ModelPreset, local_dir: Path, missing: Mapping[str, Path], reason: str) -> str:
    lines = [
        f"{reason}, and {preset.name} is incomplete in {local_dir.resolve()}.",
        f"Download these files from https://modelscope.cn/models/{preset.model_id}/files "
        "on a machine with network access and put each at the path shown:",
    ]
    for repo_path, local_path in sorted(missing.items()):
        if glob.has_magic(repo_path):
            lines.append(
                f"  {repo_path} (at least one file; all shards its .index.json names) -> {local_path.parent.resolve()}/"
            )
        else:
            lines.append(f"  {repo_path} -> {local_path.resolve()}")
    return "\n".join(lines)


def _discard_if_bad(target: Path, remote: _RemoteFile) -> None:
    """Remove a file that fails its checksum, so nothing corrupt stays where a loader would find it."""
    for leftover in (target.with_name(target.name + ".incomplete"), target.with_name(target.name + ".parallel_tmp")):
        leftover.unlink(missing_ok=True)
    if target.exists() and not _matches_record(target, remote.size, remote.sha256, None):
        logger.warning("removing %s: it does not match the repository's size/Sha256", target)
        target.unlink()


def _fetch(
    preset: ModelPreset,
    local_dir: Path,
    wanted: Sequence[_RemoteFile],
    endpoint: str | None,
    max_workers: int,
) -> None:
    """Download `wanted` into `local_dir` with the modelscope client, mapping its errors to DownloadError."""
    import requests
    from modelscope import snapshot_download
    from modelscope_hub.errors import FileIntegrityError, HubError

    by_path = {remote.path: remote for remote in wanted}
    # Exact paths as patterns (glob-escaped) so the client fetches precisely these files.
    patterns = [glob.escape(remote.path) for remote in wanted]
    logger.info("downloading %d file(s) of %s from %s", len(wanted), preset.model_id, _describe_endpoint(endpoint))
    try:
        snapshot_download(
            preset.model_id,
            local_dir=str(local_dir),
            allow_patterns=patterns,
            endpoint=endpoint,
            max_workers=max_workers,
        )
    except HubError as error:
        failed_files: Mapping[str, BaseException] = getattr(error, "failed_files", None) or {}
        if not failed_files:
            if _is_network_error(error):
                missing = {p: local_dir / p for p in by_path}
                raise DownloadError(
                    _offline_message(
                        preset, local_dir, missing, f"cannot reach {_describe_endpoint(endpoint)} ({error})"
                    ),
                    missing=missing,
                ) from error
            raise DownloadError(f"downloading {preset.name} ({preset.model_id}) failed: {error}") from error
        reasons: dict[str, str] = {}
        for repo_path, cause in failed_files.items():
            target = local_dir / repo_path
            if isinstance(cause, FileIntegrityError):
                reasons[repo_path] = f"checksum or size mismatch with the repository listing ({cause})"
                if repo_path in by_path:
                    _discard_if_bad(target, by_path[repo_path])
            else:
                reasons[repo_path] = f"{type(cause).__name__}: {cause}"
        detail = "\n".join(
            f"  {p}: {why}\n    (destination {(local_dir / p).resolve()})" for p, why in sorted(reasons.items())
        )
        raise DownloadError(
            f"{len(reasons)} file(s) of {preset.name} ({preset.model_id}) failed to download; nothing corrupt was "
            f"kept at the destination. Re-run to retry (finished files are kept):\n{detail}",
            missing={p: local_dir / p for p in reasons},
            failed=reasons,
        ) from error
    except requests.HTTPError as error:
        # The client turns "not found / not allowed" into HTTPError.
        raise DownloadError(
            f"{preset.model_id} is not available on {_describe_endpoint(endpoint)} (not found or access denied): {error}"
        ) from error


# --------------------------------------------------------------------------------------------- public API
def download_models(
    names: str | Sequence[str],
    models_dir: str | os.PathLike[str] = "models",
    endpoint: str | None = None,
    progress: bool = True,
    *,
    presets: Mapping[str, ModelPreset] | None = None,
    verify: bool = False,
    max_workers: int = 4,
) -> list[Path]:
    """Download model presets into DiffSynth-Studio's layout under `models_dir`; one path per name.

    Args:
        names: preset name(s), e.g. "CogVideoX-5B" or ["CogVideoX-5B", "ExVideo-CogVideoX-LoRA-129f-v1"].
        models_dir: root folder (DiffSynth's `models/`).
        endpoint: ModelScope URL; default: env MODELSCOPE_ENDPOINT, else the client's default.
        progress: show a bar over the presets. The modelscope client draws its own per-file bars
            regardless: tqdm reads TQDM_DISABLE only when it is imported, so set TQDM_DISABLE=1 in the
            environment before starting Python to hide those too.
        presets: a registry to use instead of `PRESETS` (tests, mirrors, private repos).
        verify: ignore the local manifest: list the repository and re-hash every local file against it.
        max_workers: parallel file downloads.

    Returns:
        For each name, the folder (`models/CogVideo/CogVideoX-5b`) or, for one-file presets, the file
        (`models/lora/ExVideo-CogVideoX-LoRA-129f-v1.safetensors`).

    Raises:
        UnknownPresetError: an unknown preset name (a KeyError; the message lists the valid ones).
        DownloadError: the hub is unreachable and local files are missing (each is named with the exact
            path to put it at), a file failed its checksum (removed, never kept), or the repository
            lacks a preset's files.
    """
    requested = [names] if isinstance(names, str) else list(names)
    chosen = [get_preset(name, presets) for name in requested]  # fail on a bad name before any download
    root = Path(models_dir)
    effective_endpoint = _effective_endpoint(endpoint)
    unreachable: list[DownloadError] = []
    for preset in tqdm(chosen, desc="models", unit="preset", disable=not progress or len(chosen) < 2):
        try:
            _download_one(preset, root, effective_endpoint, verify=verify, max_workers=max_workers)
        except DownloadError as error:
            if not error.missing or error.failed:  # not "offline with files missing": nothing to gather
                raise
            unreachable.append(error)  # the other presets' missing files go into the same message
    if unreachable:
        raise _combined(unreachable)
    return [preset.result_path(root) for preset in chosen]


def _combined(errors: Sequence[DownloadError]) -> DownloadError:
    """One error listing what every preset lacks, so that a user fetches everything in one go."""
    if len(errors) == 1:
        return errors[0]
    missing: dict[str, Path] = {}
    for error in errors:
        missing.update(error.missing)
    return DownloadError("\n".join(str(e) for e in errors), missing=missing)


def check_local(
    names: str | Sequence[str],
    models_dir: str | os.PathLike[str] = "models",
    *,
    presets: Mapping[str, ModelPreset] | None = None,
    reason: str = "downloads are off (--no-download)",
) -> list[Path]:
    """The local paths of presets that must not be downloaded; a DownloadError listing every missing file
    of every preset (with the path to put it at) when any is incomplete. Reads file metadata only."""
    requested = [names] if isinstance(names, str) else list(names)
    chosen = [get_preset(name, presets) for name in requested]
    root = Path(models_dir)
    errors = []
    for preset in chosen:
        local_dir = preset.local_dir(root)
        missing = _missing_offline(preset, local_dir, _read_manifest(root, preset))
        if missing:
            errors.append(DownloadError(_offline_message(preset, local_dir, missing, reason), missing=missing))
    if errors:
        raise _combined(errors)
    return [preset.result_path(root) for preset in chosen]


def _download_one(preset: ModelPreset, root: Path, endpoint: str | None, *, verify: bool, max_workers: int) -> None:
    local_dir = preset.local_dir(root)
    manifest = _read_manifest(root, preset)
    if not verify and manifest is not None and _manifest_complete(local_dir, manifest):
        logger.info("%s is complete in %s (checked against %s); skipping", preset.name, local_dir, MANIFEST_FOLDER)
        return

    import requests
    from modelscope_hub.errors import HubError

    try:
        remote = _list_remote(preset, endpoint)
    except DownloadError:
        raise
    except (HubError, requests.RequestException) as error:
        if not _is_network_error(error):  # not found, access denied, server error: not "offline"
            raise DownloadError(f"cannot list {preset.model_id} on {_describe_endpoint(endpoint)}: {error}") from error
        missing = _missing_offline(preset, local_dir, manifest)
        if missing:
            raise DownloadError(
                _offline_message(preset, local_dir, missing, f"cannot reach {_describe_endpoint(endpoint)} ({error})"),
                missing=missing,
            ) from error
        logger.warning(
            "cannot reach %s (%s); using the local copy of %s in %s without checking it against the repository",
            _describe_endpoint(endpoint),
            error,
            preset.name,
            local_dir,
        )
        return

    # The manifest doubles as a hash cache (unchanged size and mtime: no re-hash), except under verify.
    known = {} if verify or manifest is None else manifest
    to_fetch = [f for f in remote if not _matches_record(local_dir / f.path, f.size, f.sha256, known.get(f.path))]
    if to_fetch:
        _fetch(preset, local_dir, to_fetch, endpoint, max_workers)
    else:
        logger.info("%s: every file in %s already matches the repository", preset.name, local_dir)
    # The client checked each downloaded file's Sha256 while writing it; check presence and sizes here.
    wrong = {f.path: local_dir / f.path for f in remote if not _matches_record(local_dir / f.path, f.size, None, None)}
    if wrong:
        raise DownloadError(
            f"after downloading {preset.name}, these files are missing or have the wrong size: "
            + ", ".join(f"{p} ({path})" for p, path in sorted(wrong.items())),
            missing=wrong,
        )
    _write_manifest(root, preset, remote)
