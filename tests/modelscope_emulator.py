"""A local stand-in for the ModelScope hub, for tests that drive the real `modelscope` client.

The server answers the HTTP calls that modelscope 1.40.2 (through `modelscope_hub` 0.5.x) makes for
`snapshot_download` / `model_file_download` / `HubApi.list_repo_files`, checked against that source:

    GET  /api/v1/models/{owner}/{name}/repo/files?Revision=..&Recursive=..[&Root=dir]  -> file listing
    GET  /api/v1/models/{owner}/{name}/repo?Revision=..&FilePath=..                    -> file bytes
    HEAD /api/v1/models/{owner}/{name}/repo?...                                          -> headers only
    GET  /api/v1/models/{owner}/{name}/revisions                                         -> branches/tags
    GET  /api/v1/models/{owner}/{name}                                                   -> repo info
    GET  /api/v1/repos/internalAccelerationInfo                                          -> 404 (no intranet)

Uploads (`HubApi.create_repo`, `upload_file`, `upload_folder`), read off `modelscope_hub` 0.5.1
(`api.HubApi.create_repo`, `_legacy_api.LegacyClient.create_repo/validate_blobs/upload_blob/create_commit`,
`_upload.UploadManager`):

    POST /api/v1/models                      {"Path": owner, "Name", "Visibility": 1 private | 5 public, "License"}
         -> 200 {"Code": 200, "Data": {...}}; an existing repo -> 400 with business Code 10010101001, which
            the client maps to AlreadyExistsError (`create_repo(exist_ok=True)` and the uploader ignore it)
    POST /api/v1/repos/models/{owner}/{name}/info/lfs/objects/batch   {"operation": "upload", "objects":
         [{"oid": sha256, "size"}]} -> Data.objects[i].actions.upload.href = where to PUT the bytes (no
            "actions" when the blob is already stored: the client skips the transfer)
    PUT  {href}  (here /lfs/{owner}/{name}/{sha256})  raw bytes; the server checks size and Sha256
    POST /api/v1/repos/models/{owner}/{name}/commit/{revision}  {"commit_message", "actions": [{"action":
         "create"|"update"|"delete", "path", "type": "lfs"|"normal", "size", "sha256", "content" (base64
         for "normal"), "encoding"}]} -> the files appear in the repository (and in the download listing)

LFS ("type": "lfs") is what the client uses for `.safetensors` (its MODEL_LFS_SUFFIX) and for anything
large; small text files ride inline in the commit. Writes need `Authorization: Bearer <token>` (the
client also sends the token as cookie `m_session_id`) naming a token in `tokens` whose user is the
repository's owner: no or an unknown token -> 401 (AuthenticationError), someone else's namespace ->
403 (PermissionDeniedError). Reads stay anonymous, so a test can download what it uploaded.

File downloads honour `Range: bytes=N-` (and `bytes=N-M`) with `206 Partial Content`, like the real CDN.
Repositories live in memory; each listing entry carries the file's true Size and Sha256, so
`corrupt()` makes the server send different bytes of the same length: the client's checksum test
must catch it. Every request is recorded, so tests can prove that a second download is skipped.

Only 127.0.0.1 is bound (port 0: the OS picks a free port), so nothing leaves the machine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

_MODEL_ROUTE = re.compile(r"^/api/v1/models/(?P<owner>[^/]+)/(?P<name>[^/]+)(?P<rest>/.*)?$")
_WRITE_ROUTE = re.compile(r"^/api/v1/repos/models/(?P<owner>[^/]+)/(?P<name>[^/]+)/(?P<rest>.+)$")
_BLOB_ROUTE = re.compile(r"^/lfs/(?P<owner>[^/]+)/(?P<name>[^/]+)/(?P<oid>[0-9a-f]{64})$")
# Business codes of the real hub that the client maps to exception classes (modelscope_hub.errors).
CODE_MODEL_EXISTS = 10010101001
CODE_BAD_TOKEN = 10010103009
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class RecordedRequest:
    """One request the emulator received (path without the query; query values as single strings)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class EmulatedRepo:
    """An in-memory model repository: repo path -> bytes; `served` overrides what a download sends.

    `visibility` is what `create_repo` asked for (1 private, 5 public); `commits` the commit messages."""

    files: dict[str, bytes]
    served: dict[str, bytes] = field(default_factory=dict)
    visibility: int = 5
    commits: list[str] = field(default_factory=list)

    def body(self, path: str) -> bytes:
        return self.served.get(path, self.files[path])


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that hang up early (the client probes internalAccelerationInfo with a 0.2 s
        timeout and drops the connection); report anything else as usual."""
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class ModelScopeEmulator:
    """In-process HTTP server that speaks enough of the ModelScope API for downloads.

    Use as a context manager, or call `start()` / `stop()`. `endpoint` is the URL to hand the
    client (argument `endpoint=` or env `MODELSCOPE_ENDPOINT`).
    """

    def __init__(
        self, repos: Mapping[str, Mapping[str, bytes]] | None = None, tokens: Mapping[str, str] | None = None
    ) -> None:
        """`repos`: repo id -> {path: bytes}. `tokens`: access token -> user name (who may write to the
        repositories under that owner name)."""
        self.repos: dict[str, EmulatedRepo] = {}
        # Bytes a second of file downloads (None: as fast as the socket goes); a slow link lets a test watch the
        # files grow (the web UI's download progress).
        self.bytes_per_second: float | None = None
        self.tokens: dict[str, str] = dict(tokens or {})
        self.blobs: dict[str, bytes] = {}  # LFS storage: sha256 -> bytes
        for repo_id, files in (repos or {}).items():
            self.add_repo(repo_id, files)
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- repository content
    def add_repo(self, repo_id: str, files: Mapping[str, bytes]) -> None:
        """Create (or replace) repository `repo_id` ("owner/name") with these files."""
        self.repos[repo_id] = EmulatedRepo(files=dict(files))

    def corrupt(self, repo_id: str, path: str) -> None:
        """Serve different bytes of the same length for `path`; the listing keeps the true Sha256."""
        original = self.repos[repo_id].files[path]
        self.repos[repo_id].served[path] = bytes(b ^ 0xFF for b in original) if original else b"x"

    # ----------------------------------------------------------------- request accounting
    def download_count(self, repo_id: str, path: str) -> int:
        """How many GET requests asked for the bytes of `path` in `repo_id`."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if r.method == "GET" and r.path == f"/api/v1/models/{repo_id}/repo" and r.query.get("FilePath") == path
            )

    def counts_by_path(self) -> Counter[str]:
        """Request counts keyed by "METHOD path[?FilePath=...]"."""
        with self._lock:
            keys = [
                f"{r.method} {r.path}" + (f"?FilePath={r.query['FilePath']}" if "FilePath" in r.query else "")
                for r in self.requests
            ]
        return Counter(keys)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    # ----------------------------------------------------------------- server lifecycle
    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the emulator is not running; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ModelScopeEmulator:
        handler = _make_handler(self)
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        # A short poll interval makes stop() (shutdown waits for one poll) cost ~0.05 s instead of 0.5 s.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="modelscope-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ModelScopeEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _listing_entry(path: str, data: bytes) -> dict[str, Any]:
    return {
        "Name": path.rsplit("/", 1)[-1],
        "Path": path,
        "Type": "blob",
        "Size": len(data),
        "Sha256": hashlib.sha256(data).hexdigest(),
        "Revision": "master",
    }


def _make_handler(emulator: ModelScopeEmulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's pooled session expects

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by the base class
            """Silence the default stderr access log (pytest shows it as noise)."""

        # ------------------------------------------------------------- plumbing
        def _send_json(self, status: int, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _not_found(self, message: str) -> None:
            self._send_json(404, {"Code": 10010205001, "Message": message, "Success": False})

        def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
            self.do_GET()

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _start(self) -> tuple[str, dict[str, str]]:
            split = urlsplit(self.path)
            path = unquote(split.path)
            query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            emulator._record(RecordedRequest(self.command, path, query, dict(self.headers.items())))
            return path, query

        def _authorized(self, owner: str) -> bool:
            """Checks the Bearer token against `emulator.tokens`; answers 401/403 itself when it fails."""
            auth = self.headers.get("Authorization", "")
            token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
            user = emulator.tokens.get(token) if token else None
            if user is None:
                message = "AccessToken is invalid or expired" if token else "login required: no access token"
                self._send_json(401, {"Code": CODE_BAD_TOKEN, "Message": message, "Success": False})
                return False
            if user != owner:
                self._send_json(403, {"Code": 403, "Message": f"{user} cannot write to {owner}", "Success": False})
                return False
            return True

        def _ok(self, data: Any) -> None:
            self._send_json(200, {"Code": 200, "Success": True, "Data": data})

        def do_POST(self) -> None:  # noqa: N802 - http.server naming
            path, _ = self._start()
            body = self._read_body()
            try:
                payload = json.loads(body) if body else {}
            except json.JSONDecodeError:
                self._send_json(400, {"Code": 400, "Message": "body is not JSON", "Success": False})
                return
            if path == "/api/v1/models":
                self._create_repo(payload)
                return
            match = _WRITE_ROUTE.match(path)
            if match is None:
                self._not_found(f"unknown API path {path}")
                return
            repo_id = f"{match['owner']}/{match['name']}"
            if not self._authorized(match["owner"]):
                return
            repo = emulator.repos.get(repo_id)
            if repo is None:
                self._not_found(f"model {repo_id} does not exist")
            elif match["rest"] == "info/lfs/objects/batch":
                self._lfs_batch(repo_id, payload)
            elif match["rest"].startswith("commit/"):
                self._commit(repo, payload)
            else:
                self._not_found(f"unknown API path {path}")

        def _create_repo(self, payload: dict[str, Any]) -> None:
            owner, name = str(payload.get("Path", "")), str(payload.get("Name", ""))
            if not owner or not name:
                self._send_json(400, {"Code": 400, "Message": "Path and Name are required", "Success": False})
                return
            if not self._authorized(owner):
                return
            repo_id = f"{owner}/{name}"
            if repo_id in emulator.repos:
                message = f"model {repo_id} already exists"
                self._send_json(400, {"Code": CODE_MODEL_EXISTS, "Message": message, "Success": False})
                return
            emulator.repos[repo_id] = EmulatedRepo(files={}, visibility=int(payload.get("Visibility", 5)))
            self._ok({"Path": owner, "Name": name, "Visibility": emulator.repos[repo_id].visibility})

        def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> None:
            objects = []
            for obj in payload.get("objects", []):
                oid, size = str(obj["oid"]), int(obj["size"])
                entry: dict[str, Any] = {"oid": oid, "size": size}
                if oid not in emulator.blobs:  # stored blobs are reused: no upload action
                    entry["actions"] = {"upload": {"href": f"{emulator.endpoint}/lfs/{repo_id}/{oid}"}}
                objects.append(entry)
            self._ok({"objects": objects})

        def _commit(self, repo: EmulatedRepo, payload: dict[str, Any]) -> None:
            staged: dict[str, bytes | None] = {}
            for action in payload.get("actions", []):
                path = str(action["path"])
                if action["action"] == "delete":
                    staged[path] = None
                elif action.get("type") == "lfs":
                    data = emulator.blobs.get(str(action["sha256"]))
                    if data is None or len(data) != int(action["size"]):
                        message = f"{path}: LFS object {action['sha256']} was not uploaded"
                        self._send_json(400, {"Code": 400, "Message": message, "Success": False})
                        return
                    staged[path] = data
                else:
                    staged[path] = base64.b64decode(action.get("content", ""))
            for path, data in staged.items():  # all or nothing, like a git commit
                if data is None:
                    repo.files.pop(path, None)
                else:
                    repo.files[path] = data
            repo.commits.append(str(payload.get("commit_message", "")))
            self._ok({"CommitId": hashlib.sha1(repr(sorted(repo.files)).encode()).hexdigest()})

        def do_PUT(self) -> None:  # noqa: N802 - http.server naming
            path, _ = self._start()
            data = self._read_body()
            match = _BLOB_ROUTE.match(path)
            if match is None:
                self._not_found(f"unknown upload path {path}")
                return
            if not self._authorized(match["owner"]):
                return
            if hashlib.sha256(data).hexdigest() != match["oid"]:
                self._send_json(400, {"Code": 400, "Message": "content does not match its Sha256", "Success": False})
                return
            emulator.blobs[match["oid"]] = data
            self._ok({})

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            path, query = self._start()

            if path == "/api/v1/repos/internalAccelerationInfo":
                # Not inside an Alibaba Cloud region: the client falls back to the public route.
                self._not_found("no intranet acceleration")
                return
            match = _MODEL_ROUTE.match(path)
            if match is None:
                self._not_found(f"unknown API path {path}")
                return
            repo_id = f"{match['owner']}/{match['name']}"
            repo = emulator.repos.get(repo_id)
            if repo is None:
                self._not_found(f"model {repo_id} does not exist")
                return
            rest = match["rest"] or ""
            if rest == "":
                self._send_json(
                    200, {"Code": 200, "Success": True, "Data": {"Path": match["owner"], "Name": match["name"]}}
                )
            elif rest == "/revisions":
                revision_map = {"Branches": [{"Revision": "master", "CreatedAt": 0}], "Tags": []}
                self._send_json(200, {"Code": 200, "Success": True, "Data": {"RevisionMap": revision_map}})
            elif rest == "/repo/files":
                self._listing(repo, query)
            elif rest == "/repo":
                self._file(repo, query.get("FilePath", ""))
            else:
                self._not_found(f"unknown model API path {rest}")

        def _listing(self, repo: EmulatedRepo, query: dict[str, str]) -> None:
            root = query.get("Root", "").strip("/")
            entries = [
                _listing_entry(p, data)
                for p, data in sorted(repo.files.items())
                if not root or p == root or p.startswith(root + "/")
            ]
            if root and not entries:
                self._not_found(f"path {root} does not exist")
                return
            self._send_json(200, {"Code": 200, "Success": True, "Data": {"Files": entries}})

        def _file(self, repo: EmulatedRepo, file_path: str) -> None:
            if file_path not in repo.files:
                self._not_found(f"file {file_path} does not exist")
                return
            data = repo.body(file_path)
            start, end, status = 0, len(data) - 1, 200
            range_header = self.headers.get("Range")
            if range_header:
                m = _RANGE.match(range_header.strip())
                if m is None or int(m[1]) >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(m[1])
                end = min(int(m[2]), len(data) - 1) if m[2] else len(data) - 1
                status = 206
            chunk = data[start : end + 1]
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(chunk)))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if self.command != "HEAD":
                rate = emulator.bytes_per_second
                step = len(chunk) if rate is None else max(1, int(rate / 20))
                for i in range(0, len(chunk), step):
                    self.wfile.write(chunk[i : i + step])
                    if rate is not None:
                        self.wfile.flush()
                        time.sleep(step / rate)

    return Handler


# Environment variables that would route the client elsewhere or make it use real credentials.
_ENV_TO_CLEAR = (
    "MODELSCOPE_DOMAIN",
    "MODELSCOPE_PREFER_AI_SITE",
    "MODELSCOPE_DOWNLOAD_INTRA_CLOUD",
    "MODELSCOPE_DOWNLOAD_INTRA_CLOUD_REGION",
    "MODELSCOPE_DOWNLOAD_INTER_CLOUD_REGIONS",
)


def isolate_modelscope(monkeypatch: pytest.MonkeyPatch, home: Path, endpoint: str) -> None:
    """Point the client at `endpoint` and keep its cache, config and credentials under `home`.

    `modelscope_hub.HubConfig` reads these variables when it is built, but the client keeps one
    default config per process (`get_default_config()`), so that cached config is dropped here and
    again when the test ends (monkeypatch restores the attribute).

    The client retries a failed file listing (4 attempts, sleeping 1, 2, 4 s between them) when the
    endpoint cannot be reached, as it does for a real offline machine. Every attempt is still made
    here, but without the sleeps: its setting (env MODELSCOPE_REPO_TREE_PAGE_RETRY_MAX_DELAY_SECONDS)
    is read once at import and cannot be 0, so the imported value is patched.
    """
    import modelscope_hub._legacy_api
    import modelscope_hub.config

    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)
    monkeypatch.setattr(modelscope_hub._legacy_api, "REPO_TREE_PAGE_RETRY_MAX_DELAY_SECONDS", 0)
    for name in _ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(home / "modelscope_cache"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(home / "modelscope_home"))
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "")  # anonymous: never read a stored login
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", endpoint)


@contextmanager
def emulated_modelscope(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    repos: Mapping[str, Mapping[str, bytes]] | None = None,
    tokens: Mapping[str, str] | None = None,
) -> Iterator[ModelScopeEmulator]:
    """Run an emulator for the duration of a test, with MODELSCOPE_ENDPOINT and the cache isolated.

    Test modules wrap this in a fixture (a fixture defined here would have to be star-imported).
    """
    with ModelScopeEmulator(repos, tokens) as emulator:
        isolate_modelscope(monkeypatch, tmp_path / "home", emulator.endpoint)
        yield emulator


def closed_port_endpoint() -> str:
    """An http URL on 127.0.0.1 where nothing listens (bind, read the port, close)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
