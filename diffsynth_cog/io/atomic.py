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

Every file gets the permissions of a plain ``open(path, "w")``: a new file ``0o666`` less the umask (0644
under the usual umask 022), a replaced file keeps its mode, whatever the writer chose (safetensors creates
its files 0600, which would hide a LoRA from the other users of a shared machine).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffsynth_cog.errors import OutputPathError, WriteError

if TYPE_CHECKING:  # imported where used: checking an output path needs no torch
    import torch


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


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (read from /proc on Linux; elsewhere set and restored at once, under a lock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode(target: Path) -> int:
    """The permission bits ``target`` gets: an existing file's own, else ``0o666`` less the umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        return 0o666 & ~current_umask()


# OS errors of a write that the user fixes outside this program: a message, not a traceback.
_PLACE_ERRNOS = {
    errno.ENOSPC: "the disk is full: free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is exceeded: free some space or write somewhere else",
    errno.EFBIG: "the file is larger than this file system allows",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: "no permission to write there: write somewhere else or change the folder's permissions",
    errno.EPERM: "no permission to write there: write somewhere else or change the folder's permissions",
}


_FULL_BELOW = 64 * 1024  # free bytes under which a failed write is put down to a full disk


def _write_error(target: Path, error: OSError, existed: bool) -> WriteError:
    kept = f"the existing {target} was left as it was" if existed else "nothing was written"
    why = _PLACE_ERRNOS.get(error.errno or 0, "")
    return WriteError(
        f"cannot write {target}: {error.strerror or error}" + (f" ({why})" if why else "") + f"; {kept}", error.errno
    )


def _disk_full(folder: Path) -> bool:
    """Whether the file system of ``folder`` has (almost) no space left for this user."""
    try:
        return shutil.disk_usage(folder).free < _FULL_BELOW
    except OSError:
        return False


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_output_path(
    path: str | os.PathLike[str], *, what: str = "output", overwrite: bool = True, needed_bytes: int = 0
) -> Path:
    """Checks, before any work, that :func:`atomic_path` will be able to write ``path``; returns it.

    Refused with an :class:`~diffsynth_cog.errors.OutputPathError` naming ``what``: an existing folder at
    ``path``; a file where a parent folder should be; a folder that cannot be written (read-only file
    system, permissions: tried with a probe file, removed at once); an existing file when ``overwrite`` is
    False; fewer than ``needed_bytes`` free bytes. Missing parent folders are fine (they are created when
    the file is written). Nothing is left behind.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputPathError(f"{what} {target} is a folder; give the path of a file (inside it, or elsewhere)")
    if target.exists() and not overwrite:
        raise OutputPathError(
            f"{what} {target} already exists; pass --overwrite to replace it (the old file stays until the new one "
            "is complete), or choose another name"
        )
    folder = _nearest_existing(target.parent)
    if not folder.is_dir():
        raise OutputPathError(f"{what} {target}: {folder} is a file, not a folder, so nothing can be written below it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".diffsynth-cog-probe.", dir=folder)
    except OSError as error:
        why = _PLACE_ERRNOS.get(error.errno or 0, "")
        raise OutputPathError(
            f"{what} {target}: cannot write in {folder} ({error.strerror or error}" + (f"; {why})" if why else ")")
        ) from None
    os.close(fd)
    os.unlink(probe)
    if needed_bytes > 0:
        free = shutil.disk_usage(folder).free
        if free < needed_bytes:
            raise OutputPathError(
                f"{what} {target}: only {free / 2**20:.1f} MiB free in {folder}, about {needed_bytes / 2**20:.1f} MiB "
                "are needed; free some space or write somewhere else"
            )
    return target


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync_dir: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed.

    The parent folder is created if needed. A writer that creates no file is an error
    (FileNotFoundError), so a file is never reported written unless it was. OS errors the user must fix
    outside the program (full disk, read-only file system, no permission, a folder or a file in the way)
    become a :class:`~diffsynth_cog.errors.WriteError` that names ``path`` and says it was left as it was.
    """
    target = Path(path)
    existed = target.exists()
    if target.is_dir():
        raise WriteError(f"cannot write {target}: it is a folder; nothing was written", errno.EISDIR)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise WriteError(
            f"cannot write {target}: a file is in the way of its folder {target.parent}", errno.ENOTDIR
        ) from None
    except OSError as error:
        raise _write_error(target, error, existed) from None
    partial = temporary_name(target)
    mode = file_mode(target)
    try:
        yield partial
        if partial.exists() and stat.S_IMODE(partial.stat().st_mode) != mode:
            os.chmod(partial, mode)
        _fsync(partial)  # the data reaches the disk before the name points at it
        os.replace(partial, target)
    except BaseException as error:
        # Writers report a full disk in their own words (safetensors: "os error 28", torch.save: "unexpected
        # pos"): the free space, looked at before the partial file is removed, tells.
        full = not isinstance(error, (WriteError, KeyboardInterrupt)) and _disk_full(target.parent)
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteError) and error.errno in _PLACE_ERRNOS:
            raise _write_error(target, error, existed) from error
        if full:
            raise _write_error(target, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), existed) from error
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
    from safetensors.torch import save_file

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as partial:
        save_file(contiguous, str(partial), metadata=dict(metadata) if metadata is not None else None)
    return Path(path)


def torch_save_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (training checkpoints); returns the path."""
    import torch

    with atomic_path(path) as partial:
        torch.save(obj, partial)
    return Path(path)
