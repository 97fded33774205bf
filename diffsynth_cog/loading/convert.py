"""Key conversion with a full accounting.

A converter maps each checkpoint key to one of our parameter names, or rejects it with a
reason. :func:`convert_state_dict` then checks that every key of the checkpoint was either
used or explicitly rejected as harmless, that every parameter of the model was filled, and
that every shape agrees. Nothing is dropped silently: a leftover key is an error that names it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from diffsynth_cog.errors import StateDictMismatchError

# A rename returns our name for a checkpoint key, or None if the key is not ours at all
# (an error unless the key is listed as ignorable).
Rename = Callable[[str], "str | None"]


@dataclass
class ConversionReport:
    """What happened to every key; ``ok`` when nothing is missing, left over or misshapen."""

    source: str
    used: dict[str, str] = field(default_factory=dict)  # checkpoint key -> our key
    ignored: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it is safe to skip
    unknown: list[str] = field(default_factory=list)  # checkpoint keys nobody claimed
    missing: list[str] = field(default_factory=list)  # our keys with no checkpoint tensor
    duplicates: list[str] = field(default_factory=list)  # our keys claimed by two checkpoint keys
    shape_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unknown or self.missing or self.duplicates or self.shape_errors)

    def describe(self, limit: int = 10) -> str:
        parts = []
        for title, items in (
            ("unexpected keys (not used by the model)", self.unknown),
            ("missing keys (the model needs them)", self.missing),
            ("keys mapped twice", self.duplicates),
            ("shape mismatches", self.shape_errors),
        ):
            if items:
                shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
                parts.append(f"{len(items)} {title}: {shown}")
        return "; ".join(parts) if parts else "all keys accounted for"

    def raise_if_bad(self) -> None:
        if not self.ok:
            raise StateDictMismatchError(f"{self.source}: {self.describe()}")


def account_keys(
    source_shapes: Mapping[str, tuple[int, ...]],
    target_shapes: Mapping[str, tuple[int, ...]],
    rename: Rename,
    *,
    source: str,
    ignorable: Callable[[str], str | None] = lambda key: None,
) -> ConversionReport:
    """Plans a conversion from shapes alone (no tensor data), so it runs on meta-device models
    and on full-size checkpoints read header-only."""
    report = ConversionReport(source=source)
    claimed: dict[str, str] = {}
    for key in sorted(source_shapes):
        reason = ignorable(key)
        if reason is not None:
            report.ignored[key] = reason
            continue
        ours = rename(key)
        if ours is None or ours not in target_shapes:
            report.unknown.append(key if ours is None else f"{key} (-> {ours})")
            continue
        if ours in claimed:
            report.duplicates.append(f"{ours} <- {claimed[ours]}, {key}")
            continue
        claimed[ours] = key
        report.used[key] = ours
        want, got = tuple(target_shapes[ours]), tuple(source_shapes[key])
        if want != got:
            report.shape_errors.append(f"{key}: expected {list(want)}, found {list(got)}")
    report.missing = sorted(k for k in target_shapes if k not in claimed)
    return report


def model_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of everything a checkpoint must provide (parameters and persistent buffers)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model: torch.nn.Module,
    rename: Rename,
    *,
    source: str,
    ignorable: Callable[[str], str | None] = lambda key: None,
) -> dict[str, torch.Tensor]:
    """Renames ``state_dict`` onto ``model``'s keys; raises StateDictMismatchError unless every
    key is accounted for and every shape agrees."""
    report = account_keys(
        {k: tuple(v.shape) for k, v in state_dict.items()},
        model_shapes(model),
        rename,
        source=source,
        ignorable=ignorable,
    )
    report.raise_if_bad()
    return {ours: state_dict[key] for key, ours in report.used.items()}


def first_match(key: str, prefixes: Iterable[str]) -> str | None:
    for p in prefixes:
        if key.startswith(p):
            return p
    return None
