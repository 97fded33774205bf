"""The one way this project writes a file: all of it, or nothing.

:func:`atomic_path` yields a temporary path in the target's folder; the caller's writer (safetensors,
ffmpeg, ``json``, ``torch.save``) writes there. When the block ends without an exception, the
temporary file is flushed to disk (``fsync``), renamed over the target (``os.replace``: atomic
within one file system) and, by default, the folder is fsynced so that the rename itself survives a
crash. When the block raises anything (``KeyboardInterrupt`` included) the temporary file is
removed and the target is untouched. Readers see the old file or the new one, never a part of one.

The temporary name is hidden, unique per process and call (several ranks may write the same file at
once; the last rename wins) and keeps the target's suffix (ffmpeg picks the container from it):
``.video.mp4.<pid>.<random>.partial.mp4``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def temporary_name(target: Path) -> Path:
    """The hidden temporary path beside ``target`` that :func:`atomic_path` writes first."""
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial{target.suffix}")


def _fsync(path: Path, *, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: the writer finished without creating the file") from None
    except OSError:
        if directory:  # some platforms cannot open a folder (Windows); the rename stands regardless
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some file systems refuse to fsync a folder (EINVAL); a file must sync
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync_dir: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed.

    The parent folder is created if needed. A writer that creates no file is an error
    (FileNotFoundError), so a file is never reported written unless it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_name(target)
    try:
        yield partial
        _fsync(partial)  # the data reaches the disk before the name points at it
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if fsync_dir:
        _fsync(target.parent, directory=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as partial:
        partial.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Writes ``text`` to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike[str], values: Any) -> Path:
    """Writes ``values`` as indented, key-sorted JSON (plus a final newline) atomically; returns the path.

    The text is built before anything is written, so a value JSON cannot hold changes nothing.
    """
    return write_text_atomic(path, json.dumps(values, indent=2, sort_keys=True) + "\n")


def save_safetensors_atomic(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Writes ``tensors`` (made contiguous) as a safetensors file atomically; returns the path."""
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as partial:
        save_file(contiguous, str(partial), metadata=dict(metadata) if metadata is not None else None)
    return Path(path)


def torch_save_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (training checkpoints); returns the path."""
    with atomic_path(path) as partial:
        torch.save(obj, partial)
    return Path(path)
