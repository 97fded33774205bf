"""What an option of a generation is, apart from which options there are (``pipeline.options`` holds the table).

A field of an options group carries its help text and either its command-line options (:class:`Flag`) or the
reason it has none (:func:`option`); the values an option may take come from the registry of the module that
defines them (:class:`Registry`), read when a value is checked, so that the command line's ``--help`` imports no
torch. Two options are parsed into values where they enter: a step cache (:class:`StepCacheSpec`,
:func:`step_cache_value`) and an attention string (:func:`attention_value`: a kernel name or a mask part).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffsynth_cog.denoise.denoiser import AttentionPart, StepSkipper


# --------------------------------------------------------------------------------------------- registries
@dataclass(frozen=True)
class Registry:
    """Names defined by a module of the package (``module.attribute``: a tuple, a mapping's keys, or a function
    returning either), read on first use; ``extra`` names are valid too (e.g. ``"auto"``)."""

    module: str
    attribute: str
    what: str
    extra: tuple[str, ...] = ()

    def names(self) -> tuple[str, ...]:
        found = getattr(importlib.import_module(self.module), self.attribute)
        found = found() if callable(found) else found
        return (*self.extra, *(n for n in found if n not in self.extra))

    def check(self, value: str, name: str) -> str:
        valid = self.names()
        if value not in valid:
            raise ValueError(f"{name} {value!r} is not a known {self.what}; valid: {', '.join(valid)}")
        return value


SAMPLERS = Registry("diffsynth_cog.schedulers", "SAMPLERS", "sampler")  # @register_sampler fills it
CONVENTION_NAMES = Registry("diffsynth_cog.pipeline.sampling", "CONVENTIONS", "set of sampling conventions")
ATTENTION_BACKENDS = Registry("diffsynth_cog.models.attention", "BACKENDS", "attention backend")
# importing diffsynth_cog.denoise fills its registry (@register_step_skipper)
STEP_SKIPPERS = Registry("diffsynth_cog.denoise", "STEP_SKIPPERS", "step-skipping method", ("auto",))


# --------------------------------------------------------------------------------------------- field metadata
@dataclass(frozen=True)
class Flag:
    """A command-line option: its names (the first is the one messages use), the ``argparse`` destination, its
    help text and the other ``add_argument`` keywords (``default`` is the command line's default)."""

    names: tuple[str, ...]
    dest: str
    help: str
    registry: Registry | None = None  # the valid values, checked after parsing (reading it may import torch)
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def option(default: Any, help: str, *flags: Flag, python_only: str = "", factory: bool = False) -> Any:
    """A field of an options group: its Python default, help text, and its command-line options (or why none)."""
    metadata = {"help": help, "flags": flags, "python_only": python_only}
    if factory:
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag(*names: str, dest: str, help: str, registry: Registry | None = None, **kwargs: Any) -> Flag:
    return Flag(names, dest, help, registry, kwargs)


# --------------------------------------------------------------------------------------------- step cache
@dataclass(frozen=True)
class StepCacheSpec:
    """Step skipping as a value: ``threshold`` (0 = never skip = exact) and ``method``: ``"teacache"``,
    ``"first-block"`` or ``"auto"`` (TeaCache where the model has a calibration, else first-block)."""

    threshold: float
    method: str = "auto"

    @classmethod
    def parse(cls, text: str) -> StepCacheSpec:
        """``"teacache:0.2"`` / ``"first-block:0.1"`` / ``"0.2"`` (the pipeline's string form)."""
        method, sep, value = text.rpartition(":")
        try:
            return cls(float(value), method if sep else "auto")
        except ValueError:
            raise ValueError(f"step_cache {text!r} must be 'METHOD:THRESHOLD', e.g. 'teacache:0.2'") from None


def step_cache_value(step_cache: Any) -> StepSkipper | StepCacheSpec | None:
    """``step_cache=`` as a value: a number or a string becomes a :class:`StepCacheSpec`; 0 / None: none."""
    if step_cache is None or isinstance(step_cache, StepCacheSpec):
        return step_cache
    if isinstance(step_cache, str):
        return StepCacheSpec.parse(step_cache)
    if isinstance(step_cache, bool):
        raise ValueError(f"step_cache must be a threshold, a 'METHOD:THRESHOLD' string or a part; got {step_cache}")
    if isinstance(step_cache, int | float):
        return StepCacheSpec(float(step_cache))
    return step_cache  # a StepSkipper part


def attention_value(attention: Any) -> str | AttentionPart | None:
    """``attention=`` as a value: a string is parsed once (a kernel name, or a mask part)."""
    if isinstance(attention, str):
        from diffsynth_cog.denoise.masks import parse_attention

        return parse_attention(attention)
    return attention
