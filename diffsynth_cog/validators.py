"""Field validators: the one home of "an integer >= 1", "a number in (0, 1]", "one of ...", "a divisor of ...".

A :class:`Check` knows what it accepts and says so in words (``expected``), so every refusal built from it
names the field, the expectation and the value found, in one of two house styles:

  * ``check.problem("lora_rank", 0)`` -> ``"lora_rank: expected an integer >= 1, got 0"`` (config files: the
    problems of every field are collected and reported together);
  * ``check.require("ring_degree", 0, ParallelError)`` raises ``"ring_degree must be an integer >= 1; got 0"``
    (function arguments: the first bad one is refused).

A dataclass declares its fields' checks as a table ``{field: Check}`` and runs :func:`table_problems` on itself.
A config read from JSON is first held against its dataclass's annotations (:func:`check_field_types`, every wrong
type named at once) and built with unknown keys refused (:func:`config_from_dict`).
This module is the foundation layer: it imports nothing of the package (``errors`` at most).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

T = TypeVar("T")


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (possibly infinite or NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return is_real(value) and math.isfinite(value)


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n`` in increasing order (what a refusal lists as the valid degrees)."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Check:
    """A predicate on a value and the words for what it accepts (``expected``, e.g. ``"an integer >= 1"``)."""

    expected: str
    accepts: Callable[[Any], bool]

    def __call__(self, value: object) -> bool:
        return bool(self.accepts(value))

    def problem(self, name: str, value: object) -> str | None:
        """``"<name>: expected <expected>, got <value>"`` when ``value`` fails, else None."""
        return None if self(value) else f"{name}: expected {self.expected}, got {value!r}"

    def require(self, name: str, value: T, error: Callable[[str], Exception] = ValueError) -> T:
        """``value`` when it passes; raises ``error("<name> must be <expected>; got <value>")`` otherwise."""
        if not self(value):
            raise error(f"{name} must be {self.expected}; got {value!r}")
        return value

    def described(self, expected: str) -> Check:
        """The same check, worded for its field (e.g. with what a special value means)."""
        return replace(self, expected=expected)

    def or_none(self, meaning: str | None = None) -> Check:
        """Also accepts None; ``meaning`` says what None stands for (``"or None (<meaning>)"``)."""
        accepts = self.accepts
        suffix = " or None" + (f" ({meaning})" if meaning else "")
        return Check(self.expected + suffix, lambda value: value is None or accepts(value))


def _bounds_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def _within(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and not (value > low if low_open else value >= low):
        return False
    return high is None or (value < high if high_open else value <= high)


def integer(low: int | None = None, high: int | None = None) -> Check:
    """An integer (not a bool) in ``[low, high]`` (either bound optional): ``"an integer >= 1"``."""
    return Check(
        f"an integer{_bounds_text(low, high, False, False)}",
        lambda v: is_int(v) and _within(v, low, high, False, False),
    )


POSITIVE_INT = integer(1)
NON_NEGATIVE_INT = integer(0)


def number(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Check:
    """A finite number (int or float, not a bool) within the bounds: ``number(0, 1, low_open=True)`` is
    ``"a number in (0, 1]"``."""
    return Check(
        f"a number{_bounds_text(low, high, low_open, high_open)}",
        lambda v: is_number(v) and _within(v, low, high, low_open, high_open),
    )


def one_of(choices: Iterable[object]) -> Check:
    """One of ``choices`` (listed in the message)."""
    valid = list(choices)
    return Check(f"one of {valid}", lambda v: _member(v, valid))


def _member(value: object, valid: list[object]) -> bool:
    try:
        return value in valid
    except TypeError:  # an unhashable or incomparable value is simply not one of them
        return False


def divisor_of(n: int, what: str) -> Check:
    """A positive integer dividing ``n``; ``what`` names ``n`` (``"the 8 ranks"``): the message lists the divisors."""
    return Check(f"a positive divisor of {what} (valid: {divisors(n)})", lambda v: is_int(v) and v >= 1 and n % v == 0)


BOOLEAN = Check("true or false", lambda v: isinstance(v, bool))
STRING = Check("a string", lambda v: isinstance(v, str))
NON_EMPTY_PATH = Check("a non-empty path", lambda v: isinstance(v, (str, os.PathLike)) and bool(str(v)))
EXISTING_PATH = Check(
    "the path of an existing file or folder",
    lambda v: isinstance(v, (str, os.PathLike)) and bool(str(v)) and os.path.exists(os.path.expanduser(v)),
)


def sequence_of(item: Check, what: str) -> Check:
    """A tuple or list whose items all pass ``item``; ``what`` words the whole (``"a list of strings"``)."""
    return Check(what, lambda v: isinstance(v, (tuple, list)) and all(item(x) for x in v))


def pair(item: Check, what: str, rule: Callable[[Sequence[Any]], bool] = lambda _: True) -> Check:
    """A 2-tuple of values passing ``item`` that also satisfy ``rule`` (e.g. ``min <= max``)."""
    return Check(what, lambda v: isinstance(v, tuple) and len(v) == 2 and all(item(x) for x in v) and rule(v))


def table_problems(obj: object, table: Mapping[str, Check]) -> list[str]:
    """The problem of every field of ``obj`` named in ``table`` whose value fails its check, in table order."""
    problems = (check.problem(name, getattr(obj, name)) for name, check in table.items())
    return [p for p in problems if p is not None]


# ---------------------------------------------------------------------------------------------------- JSON configs
def _type_problem(annotation: str, value: Any) -> str | None:
    """What is wrong with ``value`` for a config field annotated ``annotation`` (as a string); None if it fits.

    JSON gives int, float, bool, str, list and null: an int is accepted where a float is expected, a list of
    the element type where a tuple is.
    """
    kind = annotation.replace(" ", "").removesuffix("|None")
    if value is None:
        return None if annotation.replace(" ", "").endswith("|None") else "a value (found null)"
    if kind == "bool":
        return None if isinstance(value, bool) else "true or false"
    if kind == "int":
        return None if is_int(value) else "an integer"
    if kind == "float":
        return None if is_number(value) else "a finite number"
    if kind == "str":
        return None if isinstance(value, str) else "a string"
    element = re.fullmatch(r"tuple\[(\w+),\.\.\.\]", kind)
    if element:
        items_ok = isinstance(value, (list, tuple)) and all(_type_problem(element[1], v) is None for v in value)
        return None if items_ok else f"a list of {element[1]} values"
    return None  # a field type this check does not know: left to the class's own checks


def check_field_types(cls: type, values: dict[str, Any], source: str) -> None:
    """Raises ValueError naming the file, every field whose JSON value has the wrong type, the expected type
    and the value found (before the class's own range checks, which would fail with a TypeError on them)."""
    annotations = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(cls)}
    problems = [
        f"{key!r} must be {expected}, found {value!r}"
        for key, value in values.items()
        if key in annotations and (expected := _type_problem(annotations[key], value)) is not None
    ]
    if problems:
        raise ValueError(f"{source}: wrong type for {cls.__name__} field(s): " + "; ".join(problems))


def config_from_dict(cls: type, values: dict[str, Any], *, source: str, ignored: frozenset[str]) -> Any:
    """Builds ``cls`` from a diffusers-style config dict.

    Known fields are taken, fields listed in ``ignored`` (bookkeeping such as ``_class_name``
    or options with no effect on the math) are dropped, and anything else is an error: a
    config we do not understand must not be silently half-applied.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        if key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif key.startswith("_") or key in ignored:
            continue
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: unsupported config field(s) {sorted(unknown)} for {cls.__name__}")
    check_field_types(cls, kwargs, source)
    return cls(**kwargs)
