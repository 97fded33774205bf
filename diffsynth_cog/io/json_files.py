"""The one way this project reads a JSON file a user handed it: the value, or the caller's own error naming the file.

Configs, indexes, caches' descriptions, adapter configs and settings files are all read here, so that every one
of them fails the same way: ``<file>: cannot be read (<reason>)``, ``<file>: not valid JSON (<line, column>)`` or
``<file>: expected a JSON object, found a list``, raised as the caller's exception class (a ``TrainConfigError``
for a training config, a ``LoRAError`` for an adapter config, ...). Whether a missing file is an error, and what
the user should do about it, stays with the caller: it knows the hint (run ``prepare`` first, ...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_KINDS = {dict: "object", list: "list"}


def read_json(path: str | os.PathLike[str], error: type[Exception], expect: type = dict, shape: str = "") -> Any:
    """The JSON value in ``path``, which must be a ``dict`` or a ``list`` (``expect``); else ``error(message)``.

    ``shape`` describes the expected value for the message (``"of {'file_name': ..., 'text': ...} objects"``)."""
    if expect not in _KINDS:
        raise ValueError(f"expect must be dict or list, got {expect!r}")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{p}: cannot be read ({e})") from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{p}: not valid JSON ({e})") from e
    if not isinstance(value, expect):
        wanted = " ".join(filter(None, (f"a JSON {_KINDS[expect]}", shape)))
        raise error(f"{p}: expected {wanted}, found a {type(value).__name__}")
    return value
