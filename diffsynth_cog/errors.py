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
