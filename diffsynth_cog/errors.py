"""Exceptions users can act on. Each names the file, key or value at fault."""

from __future__ import annotations


class DiffSynthCogError(Exception):
    """Base class of the toolkit's own errors."""


class WeightsFileError(DiffSynthCogError, ValueError):
    """A weights file or folder is missing, unreadable, corrupt or truncated."""


class StateDictMismatchError(DiffSynthCogError, ValueError):
    """A checkpoint does not fit the model: keys left over, keys missing, or shapes that disagree."""


class ModelDetectionError(DiffSynthCogError, ValueError):
    """A path holds no model this toolkit knows how to load."""


class LoRAError(DiffSynthCogError, ValueError):
    """A LoRA file or request does not fit the model; nothing was changed."""


class QuantizationError(DiffSynthCogError, ValueError):
    """A quantization request cannot be carried out; the model was not changed."""


class OutputPathError(DiffSynthCogError, ValueError):
    """An output path cannot be written (a folder, a read-only place, an existing file without overwrite).

    Raised by the checks that run before any expensive work; nothing was written."""


class WriteError(DiffSynthCogError, OSError):
    """Writing a file failed (full disk, read-only file system, ...); the message names the file and says
    that any earlier file at that path was left as it was. ``errno`` is the OS error code, when there is one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


class MissingExtraError(DiffSynthCogError, ImportError):
    """A command needs an optional dependency that is not installed; the message gives the pip command."""


def shorten(text: str, limit: int = 200) -> str:
    """``text`` for a log line: at most ``limit`` characters, the cut marked with how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"
