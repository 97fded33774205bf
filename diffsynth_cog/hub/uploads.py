"""LoRA uploads to ModelScope through the real `modelscope` client.

`upload_lora` creates the model repository if needed (private by default) and uploads a file or a
folder; the client sends `.safetensors` and large files through the hub's LFS blob store and then
makes one commit. The client's errors (unreachable hub, missing or refused token, no write access to
the namespace) become one `UploadError` whose message names the endpoint and what to do; the client's
own exception is not chained, so the command line prints a single line.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from diffsynth_cog.errors import DiffSynthCogError
from diffsynth_cog.hub.downloads import _describe_endpoint, _effective_endpoint, _is_network_error
from diffsynth_cog.hub.presets import REPO_ID

logger = logging.getLogger(__name__)


class UploadError(DiffSynthCogError, RuntimeError):
    """An upload to ModelScope failed; the message says why and what to do (no traceback needed)."""


TOKEN_PAGE = "https://modelscope.cn/my/myaccesstoken"


def _short_reason(error: BaseException) -> str:
    """The first line of a client error, without its request dump (or the OS error of a refused connection)."""
    text = getattr(error, "message", None) or str(error)
    errno = re.search(r"\[Errno -?\d+\] [^\"')]+", text)
    if errno:
        return errno.group(0).strip()
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def upload_lora(
    path: str | os.PathLike[str],
    repo_id: str,
    token: str | None = None,
    endpoint: str | None = None,
    *,
    path_in_repo: str | None = None,
    commit_message: str | None = None,
    visibility: str = "private",
    api: Any | None = None,
) -> str:
    """Upload a trained LoRA (a `.safetensors` file, or a folder of files) to a ModelScope model repo.

    Creates `repo_id` ("owner/name") if needed (`visibility` "private" by default, so nothing is
    published by accident), then uploads with `HubApi.upload_file` / `upload_folder` (large and
    `.safetensors` files go through the hub's LFS blob store, then one commit). `token` defaults to
    the client's stored login or env MODELSCOPE_API_TOKEN; `api` takes an existing
    `modelscope.hub.api.HubApi` (tests, custom sessions). Returns the repository id.

    Raises:
        UploadError: the hub cannot be reached, refuses the token, or refuses the write; one message
            that names the endpoint and what to do (the client's own exception is not chained).
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"LoRA to upload not found: {source}")
    if source.is_file() and source.suffix != ".safetensors":
        raise ValueError(f"expected a .safetensors LoRA file; got {source}")
    if not REPO_ID.match(repo_id):
        raise ValueError(f"repo_id must look like 'owner/name'; got {repo_id!r}")
    if visibility not in ("private", "public"):
        raise ValueError(f"visibility must be 'private' or 'public'; got {visibility!r}")
    if api is None:
        from modelscope.hub.api import HubApi

        api = HubApi(endpoint=_effective_endpoint(endpoint), token=token)
    where = _describe_endpoint(getattr(api, "endpoint", None) or _effective_endpoint(endpoint))
    message = commit_message or f"Upload LoRA {source.name}"
    try:
        api.create_repo(repo_id, visibility=visibility, exist_ok=True)
        if source.is_file():
            api.upload_file(
                repo_id=repo_id,
                path_or_fileobj=str(source),
                path_in_repo=path_in_repo or source.name,
                commit_message=message,
            )
        else:
            api.upload_folder(
                repo_id=repo_id,
                folder_path=str(source),
                path_in_repo=path_in_repo or "",
                commit_message=message,
            )
    except Exception as error:  # the client's errors, mapped to one actionable message
        mapped = _upload_error(error, repo_id, where)
        if mapped is None:
            raise
        raise mapped from None
    logger.info("uploaded %s to ModelScope repo %s", source, repo_id)
    return repo_id


def _upload_error(error: Exception, repo_id: str, where: str) -> UploadError | None:
    """An UploadError for the client's errors (network, token, permission, hub); None for anything else."""
    from modelscope_hub.errors import (
        AuthenticationError,
        HubError,
        NetworkError,
        PermissionDeniedError,
        RequestTimeoutError,
    )

    reason = _short_reason(error)
    if isinstance(error, (NetworkError, RequestTimeoutError)) or _is_network_error(error):
        return UploadError(
            f"cannot reach {where} to upload {repo_id} ({reason}). Check the network connection, or point "
            "--endpoint / MODELSCOPE_ENDPOINT at a reachable ModelScope hub."
        )
    if isinstance(error, AuthenticationError):
        return UploadError(
            f"{where} refused the access token for uploading {repo_id} ({reason}): it is missing, invalid or "
            f"expired. Create a token at {TOKEN_PAGE} and pass it with --token or MODELSCOPE_API_TOKEN."
        )
    if isinstance(error, PermissionDeniedError):
        owner = repo_id.split("/")[0]
        return UploadError(
            f"{where} does not let this token write to {repo_id} ({reason}). Use a repo id under the token "
            f"account's user name or one of its organisations, or a token of {owner!r}."
        )
    if isinstance(error, HubError):
        return UploadError(f"uploading to {repo_id} on {where} failed: {reason}")
    return None
