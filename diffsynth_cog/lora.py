"""LoRA for the CogVideoX DiT: merge files into a model (inference), inject and export (training).

Inference
---------
``merge_lora(model, path_or_state_dict, alpha)`` folds a LoRA into the Linear weights in place and
``restore_base_weights(model)`` brings back the exact base weights, however many LoRAs were stacked.
Two file layouts are read (safetensors only, never pickle), told apart by their key names:

* **DiffSynth** (ExVideo's release): PEFT names on our/DiffSynth module names,
  ``blocks.N.attn1.to_q.lora_A.default.weight`` / ``...lora_B.default.weight`` (``.default``
  optional). Merged as DiffSynth does: ``W += alpha * B @ A``, no rank scaling (any lora_alpha the
  file may carry is ignored, as DiffSynth ignores it).
* **diffusers / PEFT**: ``transformer.transformer_blocks.N.attn1.to_q.lora_A.weight`` (the
  ``transformer.`` or PEFT's ``base_model.model.`` prefix optional), diffusers module names
  (``attn1.to_out.0``, ``ff.net.0.proj``, ``ff.net.2``, ...). Merged as PEFT computes it:
  ``W += alpha * (lora_alpha / r) * B @ A`` (``lora_alpha / sqrt(r)`` for rsLoRA). Where
  ``lora_alpha`` comes from, first found wins:

  1. ``lora_config=`` given by the caller (a LoraConfig-like dict);
  2. the ``lora_adapter_metadata`` entry of the safetensors header: a JSON LoraConfig dict that
     diffusers writes (``save_lora_weights(..., transformer_lora_adapter_metadata=...)``, keys
     prefixed ``transformer.``; or ``save_lora_adapter``, unprefixed). Fields used: ``r``,
     ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` (patterns matched against the module
     name as PEFT matches them), ``use_rslora``, ``use_dora`` (refused);
  3. ``adapter_config.json`` beside the file (what PEFT's ``save_pretrained`` writes), same fields;
  4. per-layer ``<module>.alpha`` scalars (the kohya / "network alpha" convention). diffusers'
     CogVideoX loader does not read these (it passes no network alphas); we honour them because
     that is what their writer meant, and require them for every layer;
  5. nothing: ``lora_alpha = r`` (scale 1), what diffusers assumes too, with a warning.

Everything is checked before the first weight changes (key names, pairing, ranks, shapes against
the model's Linear layers, dtypes, finite values); any problem raises ``LoRAError`` listing each
one, and the model is left bitwise as it was.

Training
--------
``inject_lora`` swaps chosen Linear layers for ``LoRALinear`` (base weight/bias kept under their
own names, frozen; fp32 ``lora_A``/``lora_B`` added), ``lora_parameters`` / ``lora_state_dict``
give what to optimise and checkpoint, ``ema_lora_state_dicts`` averages saved checkpoints as
ExVideo does, and ``export_lora`` writes a DiffSynth-layout file with the alpha/rank scale folded
into B, so DiffSynth's merge and ``merge_lora(..., alpha=1.0)`` both reproduce the trained model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from diffsynth_cog.atomic import save_safetensors_atomic
from diffsynth_cog.errors import DiffSynthCogError
from diffsynth_cog.loading.dit_loader import dit_rename
from diffsynth_cog.loading.state_dict import resolve_weights, safetensors_metadata

logger = logging.getLogger(__name__)

# The eight Linear layers of every CogVideoX block, as ``inject_lora`` targets (our names).
BLOCK_LINEAR_TARGETS: tuple[str, ...] = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out",
    "ff.0",
    "ff.2",
    "norm1.linear",
    "norm2.linear",
)

DIFFSYNTH = "diffsynth"
DIFFUSERS = "diffusers"

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")
# Prefixes of diffusers/PEFT files: the pipeline's component name, PEFT's model wrapper.
_DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.")
# Module names that only DiffSynth's (our) layout uses; diffusers spells these differently.
_DIFFSYNTH_ONLY_NAME = re.compile(r"^(blocks\.\d+\.|text_proj$|time_embed\.)")
_HEADER_CONFIG_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry
_ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's save_pretrained
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# LoraConfig fields that, when set, make the update something other than W + s * B @ A (weight
# decomposition, base-weight truncation, routing, token-activated or transposed layouts, bias on B).
_UNMERGEABLE_FIELDS = (
    "use_dora",
    "fan_in_fan_out",
    "lora_bias",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "kasa_config",
    "arrow_config",
    "monteclora_config",
)
_RECORD_ATTR = "_diffsynth_cog_lora_record"
_MAX_LISTED = 20  # problems listed in one error message


class LoRAError(DiffSynthCogError, ValueError):
    """A LoRA file or request does not fit the model; nothing was changed."""


# ----------------------------------------------------------------------------------------------
# Reading LoRA tensors (lazily: a 1 GB file is checked from its header before any data is read)


@dataclass(frozen=True)
class _Tensors:
    """Key -> (shape, dtype name) of a LoRA, plus a way to fetch each tensor on demand."""

    source: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors dtype names ("F32", "BF16", ...)
    metadata: dict[str, str]
    folder: Path | None  # where an adapter_config.json could sit
    files: dict[str, Path] = field(default_factory=dict)  # key -> file (path input)
    values: Mapping[str, torch.Tensor] | None = None  # state-dict input

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[str], torch.Tensor]]:
        """Yields ``get(key) -> tensor`` (CPU); file handles stay open for the whole block."""
        if self.values is not None:
            values = self.values
            yield lambda key: values[key].detach()
            return
        with contextlib.ExitStack() as stack:
            handles: dict[Path, Any] = {}
            try:
                for f in sorted(set(self.files.values())):
                    handles[f] = stack.enter_context(safe_open(f, framework="pt", device="cpu"))
            except SafetensorError as e:
                raise LoRAError(f"{self.source}: corrupt safetensors file ({e})") from e
            yield lambda key: handles[self.files[key]].get_tensor(key)


def _dtype_name(t: torch.Tensor) -> str:
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
    return names.get(t.dtype, str(t.dtype))


def _open_lora(lora: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> _Tensors:
    if isinstance(lora, Mapping):
        bad = [k for k, v in lora.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise LoRAError(f"LoRA state dict: values must be tensors; {bad[:3]} are not")
        return _Tensors(
            source="LoRA state dict",
            shapes={k: tuple(v.shape) for k, v in lora.items()},
            dtypes={k: _dtype_name(v) for k, v in lora.items()},
            metadata={},
            folder=None,
            values=lora,
        )
    source = resolve_weights(lora)
    non_st = [str(f) for f in source.files if f.suffix != ".safetensors"]
    if non_st:
        raise LoRAError(f"{source.path}: LoRA files are read from safetensors only (no pickle); got {non_st}")
    if source.path.is_dir() and len(source.files) > 1 and not list(source.path.glob("*.index.json")):
        raise LoRAError(f"{source.path}: several safetensors files {[f.name for f in source.files]}; pass one")
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    files: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    for f in source.files:
        metadata.update(safetensors_metadata(f))  # also checks the header and that no byte is missing
        try:
            with safe_open(f, framework="pt", device="cpu") as st:
                for k in st.keys():
                    if k in files:
                        raise LoRAError(f"{f}: key {k!r} appears in more than one shard")
                    sl = st.get_slice(k)
                    shapes[k], dtypes[k], files[k] = tuple(sl.get_shape()), sl.get_dtype(), f
        except SafetensorError as e:
            raise LoRAError(f"{f}: corrupt safetensors file ({e})") from e
    name = str(source.files[0]) if len(source.files) == 1 else str(source.path)
    return _Tensors(name, shapes, dtypes, metadata, source.files[0].parent, files=files)


# ----------------------------------------------------------------------------------------------
# Planning a merge: every check happens here, before any weight is touched


@dataclass(frozen=True)
class _Pair:
    module: str  # our module name
    key_a: str
    key_b: str
    rank: int
    scale: float | None  # the caller's alpha included; None until read from ``alpha_key``
    alpha_key: str | None = None


@dataclass(frozen=True)
class LoRAMergeReport:
    """What one ``merge_lora`` call did.

    ``format`` is the key layout ("diffsynth" or "diffusers"); ``scales[layer]`` is the factor
    applied to ``B @ A`` (the caller's alpha included); ``alpha_source`` says where lora_alpha
    came from, or why no rank scaling applies.
    """

    source: str
    format: str
    alpha: float
    alpha_source: str
    layers: tuple[str, ...]
    ranks: dict[str, int]
    scales: dict[str, float]

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: the first pattern (a regular expression) that matches
    the end of ``name`` at a dot boundary; a leading ``^`` makes it match the full name only."""
    for pattern, value in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?({pattern})$", name)
        except re.error as e:
            raise LoRAError(f"rank/alpha pattern {pattern!r} is not a valid regular expression ({e})") from e
        if hit:
            return value
    return default


def _config_from_header(metadata: Mapping[str, str], source: str) -> dict[str, Any] | None:
    raw = metadata.get(_HEADER_CONFIG_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoRAError(f"{source}: header entry {_HEADER_CONFIG_KEY!r} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise LoRAError(f"{source}: header entry {_HEADER_CONFIG_KEY!r} is not a JSON object")
    # The pipeline writer prefixes every field with the component name; keep the transformer's.
    prefixed = {k[len("transformer.") :]: v for k, v in config.items() if k.startswith("transformer.")}
    return prefixed or config


def _config_from_folder(folder: Path | None, source: str) -> tuple[dict[str, Any], str] | None:
    if folder is None or not (folder / _ADAPTER_CONFIG_FILE).is_file():
        return None
    path = folder / _ADAPTER_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LoRAError(f"{path}: cannot read the adapter config beside {source} ({e})") from e
    if not isinstance(config, dict):
        raise LoRAError(f"{path}: expected a JSON object")
    return config, str(path)


class _Alphas:
    """lora_alpha and rank per module name, from a LoraConfig-like dict."""

    def __init__(self, config: Mapping[str, Any], where: str) -> None:
        variants = [k for k in _UNMERGEABLE_FIELDS if config.get(k)]
        if variants:
            raise LoRAError(
                f"{where}: a LoRA variant ({', '.join(f'{k}={config[k]!r}' for k in variants)}) that is not "
                "the plain W + s * B @ A update; it cannot be merged here"
            )
        # PEFT's LoraConfig defaults, which diffusers falls back to for missing fields.
        self.r = config.get("r", 8)
        self.lora_alpha = config.get("lora_alpha", 8)
        self.rank_pattern = config.get("rank_pattern") or {}
        self.alpha_pattern = config.get("alpha_pattern") or {}
        self.rslora = bool(config.get("use_rslora", False))
        self.where = where

    def scale(self, name: str, rank: int, problems: list[str]) -> float:
        r = _pattern_value(self.rank_pattern, name, self.r)
        alpha = _pattern_value(self.alpha_pattern, name, self.lora_alpha)
        if r != rank:
            problems.append(f"layer {name!r}: {self.where} gives rank {r}, the tensors have rank {rank}")
        return float(alpha) / (math.sqrt(rank) if self.rslora else rank)


def _parse_keys(tensors: _Tensors) -> tuple[str | None, dict[str, dict[str, str]], list[str]]:
    """Groups keys by module, {file module name: {"A": key, "B": key, "alpha": key}}, and tells
    the layout from the names: "diffsynth", "diffusers", or None when every name is spelled the
    same in both (``proj_out``, ``norm_out.linear``)."""
    groups: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    ours_example = theirs_example = None
    for key in tensors.shapes:
        prefix = next((p for p in _DIFFUSERS_PREFIXES if key.startswith(p)), "")
        body = key[len(prefix) :]
        m = _LORA_KEY.match(body) or _ALPHA_KEY.match(body)
        if m is None:
            problems.append(
                f"key {key!r}: not a LoRA tensor (expected '<module>.lora_A[.default].weight', "
                f"'<module>.lora_B[.default].weight' or '<module>.alpha')"
            )
            continue
        module = m.group("module")
        part = m.groupdict().get("part") or "alpha"
        renamed = dit_rename(module + ".weight")
        if _DIFFSYNTH_ONLY_NAME.match(module) and not prefix:
            ours_example = ours_example or key
        if prefix or (renamed is not None and renamed != module + ".weight"):
            theirs_example = theirs_example or key
        slot = groups.setdefault(prefix + module, {})
        if part in slot:
            problems.append(f"layer {module!r}: two {part} tensors ({slot[part]!r} and {key!r})")
        slot[part] = key
    if ours_example and theirs_example:
        problems.append(
            f"the file mixes DiffSynth names (e.g. {ours_example!r}) and diffusers/PEFT names "
            f"(e.g. {theirs_example!r}); a LoRA must use one layout"
        )
    naming = DIFFUSERS if theirs_example else DIFFSYNTH if ours_example else None
    return naming, groups, problems


def _alpha_config(
    tensors: _Tensors, naming: str | None, lora_config: Mapping[str, Any] | None, has_alpha_keys: bool
) -> tuple[_Alphas | None, str]:
    """Where the scale comes from: (PEFT-style config or None, a description for the report)."""
    src = tensors.source
    if lora_config is not None:
        found: tuple[Mapping[str, Any], str] | None = (lora_config, "lora_config argument")
    elif naming == DIFFSYNTH:
        if tensors.metadata.get(_HEADER_CONFIG_KEY):
            logger.info("%s: DiffSynth-layout LoRA; its lora_alpha metadata is ignored, as DiffSynth does", src)
        return None, "DiffSynth layout: no rank scaling"
    elif (header := _config_from_header(tensors.metadata, src)) is not None:
        found = (header, f"safetensors header entry {_HEADER_CONFIG_KEY!r}")
    else:
        found = _config_from_folder(tensors.folder, src)
    if found is not None:
        if has_alpha_keys:
            raise LoRAError(f"{src}: lora_alpha given twice (per-layer '.alpha' keys and {found[1]}); ambiguous")
        return _Alphas(found[0], found[1]), found[1]
    if has_alpha_keys:
        return None, "per-layer '.alpha' keys"
    return None, "none found: lora_alpha = rank (scale 1)"


def _check_pair(
    file_name: str, slot: Mapping[str, str], ours: str, layer: nn.Linear, tensors: _Tensors, problems: list[str]
) -> int | None:
    """The rank of one A/B pair, or None (with the reasons appended to ``problems``)."""
    key_a, key_b = slot["A"], slot["B"]
    shape_a, shape_b = tensors.shapes[key_a], tensors.shapes[key_b]
    before = len(problems)
    for key in (key_a, key_b):
        if tensors.dtypes[key] not in _FLOAT_DTYPES:
            problems.append(f"key {key!r}: dtype {tensors.dtypes[key]} is not a floating-point type")
    where = f"Linear {ours!r} (weight [{layer.out_features}, {layer.in_features}])"
    if len(shape_a) != 2 or shape_a[1] != layer.in_features:
        problems.append(
            f"key {key_a!r}: lora_A must be [rank, in_features={layer.in_features}] for {where}, found {list(shape_a)}"
        )
    if len(shape_b) != 2 or shape_b[0] != layer.out_features:
        problems.append(
            f"key {key_b!r}: lora_B must be [out_features={layer.out_features}, rank] for {where}, "
            f"found {list(shape_b)}"
        )
    if len(problems) > before:
        return None
    if shape_a[0] != shape_b[1] or shape_a[0] == 0:
        problems.append(
            f"layer {file_name!r}: lora_A has rank {shape_a[0]} ({list(shape_a)}), lora_B has rank "
            f"{shape_b[1]} ({list(shape_b)}); they must be equal and positive"
        )
        return None
    if "alpha" in slot and math.prod(tensors.shapes[slot["alpha"]]) != 1:
        problems.append(
            f"key {slot['alpha']!r}: must hold one number, found shape {list(tensors.shapes[slot['alpha']])}"
        )
        return None
    return shape_a[0]


def _plan(
    model: nn.Module,
    tensors: _Tensors,
    alpha: float,
    lora_config: Mapping[str, Any] | None,
) -> tuple[str, str, list[_Pair]]:
    """Checks the whole LoRA against the model; returns (layout, alpha source, pairs) or raises."""
    src = tensors.source
    if not tensors.shapes:
        raise LoRAError(f"{src}: holds no tensors")
    naming, groups, problems = _parse_keys(tensors)
    has_alpha_keys = any("alpha" in slot for slot in groups.values())
    if naming == DIFFSYNTH and has_alpha_keys and lora_config is None:
        example = next(slot["alpha"] for slot in groups.values() if "alpha" in slot)
        problems.append(
            f"key {example!r}: per-layer '.alpha' keys are not part of the DiffSynth layout "
            f"(merged without rank scaling); pass lora_config= to scale it the PEFT way"
        )
        has_alpha_keys = False
    alphas, alpha_source = _alpha_config(tensors, naming, lora_config, has_alpha_keys)
    if naming is None:  # names common to both layouts: the scaling information decides
        naming = DIFFUSERS if alphas is not None or has_alpha_keys else DIFFSYNTH

    modules = dict(model.named_modules())
    pairs: list[_Pair] = []
    missing: list[str] = []
    for file_name, slot in groups.items():
        name = file_name
        for p in _DIFFUSERS_PREFIXES:
            name = name.removeprefix(p)
        if naming == DIFFUSERS:
            renamed = dit_rename(name + ".weight")
            ours = renamed[: -len(".weight")] if renamed is not None else None
        else:
            ours = name
        any_key = next(iter(slot.values()))
        if "A" not in slot or "B" not in slot:
            have = ", ".join(repr(k) for k in slot.values())
            problems.append(f"layer {file_name!r}: lora_A and lora_B must come in pairs; found only {have}")
            continue
        layer = modules.get(ours) if ours is not None else None
        if layer is None:
            missing.append(any_key)
            continue
        if not isinstance(layer, nn.Linear):
            problems.append(f"key {any_key!r}: {ours!r} is a {type(layer).__name__}, not a Linear layer")
            continue
        if layer.weight.is_meta:
            problems.append(f"key {any_key!r}: the weight of {ours!r} is on the meta device (not loaded)")
            continue
        rank = _check_pair(file_name, slot, ours, layer, tensors, problems)
        if rank is None:
            continue
        if alphas is not None:
            scale: float | None = alpha * alphas.scale(name, rank, problems)
        elif "alpha" in slot:
            scale = None  # needs the tensor's value: read below
        elif has_alpha_keys:
            problems.append(f"layer {file_name!r}: no '.alpha' key, while other layers of the file have one")
            continue
        else:
            scale = alpha
        pairs.append(_Pair(ours, slot["A"], slot["B"], rank, scale, slot.get("alpha")))

    if missing:
        total = len(groups)
        listed = ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        if len(missing) == total:
            head = f"none of its {total} LoRA layers exists in this {type(model).__name__} (a LoRA for another model?)"
        else:
            head = f"{len(missing)} of its {total} LoRA layers do not exist in this {type(model).__name__}"
        problems.insert(0, f"{head}: {listed}")
    counts = Counter(p.module for p in pairs)
    problems += [f"layer {name!r} is addressed by {n} entries of the file" for name, n in counts.items() if n > 1]
    if problems:
        _raise(src, model, problems)

    # Values: finite, and the per-layer alphas (these need the data, not only the header).
    resolved: list[_Pair] = []
    with tensors.reader() as get:
        for p in pairs:
            for key in (p.key_a, p.key_b):
                if not torch.isfinite(get(key)).all():
                    problems.append(f"key {key!r}: holds NaN or infinite values")
            scale = p.scale
            if scale is None:
                value = float(get(p.alpha_key).float().reshape(()))
                if not math.isfinite(value):
                    problems.append(f"key {p.alpha_key!r}: alpha is {value}")
                scale = alpha * value / p.rank
            resolved.append(_Pair(p.module, p.key_a, p.key_b, p.rank, scale, p.alpha_key))
    if problems:
        _raise(src, model, problems)
    if naming == DIFFUSERS and alphas is None and not has_alpha_keys:
        logger.warning(
            "%s: no lora_alpha information (no %r header entry, no %s beside it, no '.alpha' keys); "
            "using lora_alpha = rank (scale 1) as diffusers does. If it was trained with another lora_alpha, "
            "pass alpha=lora_alpha/rank.",
            src,
            _HEADER_CONFIG_KEY,
            _ADAPTER_CONFIG_FILE,
        )
    return naming, alpha_source, resolved


def _raise(source: str, model: nn.Module, problems: Sequence[str]) -> None:
    listed = "\n".join(f"  - {p}" for p in problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise LoRAError(
        f"{source}: cannot merge this LoRA into {type(model).__name__}; no weight was changed. "
        f"{len(problems)} problem(s):\n{listed}{more}"
    )


# ----------------------------------------------------------------------------------------------
# Merging and restoring


@dataclass
class _LoRARecord:
    """Kept on the model between merges: exact CPU copies of each touched base weight."""

    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    merged: list[LoRAMergeReport] = field(default_factory=list)


def _record(model: nn.Module) -> _LoRARecord:
    record = getattr(model, _RECORD_ATTR, None)
    if record is None:
        record = _LoRARecord()
        # A plain attribute (not a buffer), so it never enters the model's state dict.
        object.__setattr__(model, _RECORD_ATTR, record)
    return record


@torch.no_grad()
def merge_lora(
    model: nn.Module,
    lora: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    alpha: float = 1.0,
    *,
    lora_config: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> LoRAMergeReport:
    """Folds a LoRA into the model's Linear weights in place: ``W += scale * B @ A``.

    Args:
        model: the DiT (any module whose Linear layers carry the LoRA's module names).
        lora: a ``.safetensors`` file, a folder holding one, or a state dict.
        alpha: the strength; DiffSynth layout: scale = alpha; diffusers layout:
            scale = alpha * lora_alpha / r (see the module docstring for where lora_alpha comes from).
        lora_config: a LoraConfig-like dict (``r``, ``lora_alpha``, ``rank_pattern``, ...) that
            overrides what the file says; forces diffusers/PEFT scaling.
        progress: show a tqdm bar over layers.

    The arithmetic is float32 on the weight's device, cast back to the weight's dtype. The first
    time a layer is touched its exact base weight is copied to CPU, so ``restore_base_weights``
    can undo any number of stacked merges bitwise. Raises ``LoRAError`` (model untouched) when
    anything in the LoRA does not fit.
    """
    if not math.isfinite(alpha):
        raise LoRAError(f"alpha must be a finite number, got {alpha}")
    tensors = _open_lora(lora)
    fmt, alpha_source, pairs = _plan(model, tensors, alpha, lora_config)
    modules = dict(model.named_modules())
    record = _record(model)
    first_touch: list[str] = []
    done: list[_Pair] = []
    try:
        with tensors.reader() as get:
            for p in tqdm(pairs, desc="merge LoRA", unit="layer", disable=not progress):
                weight = modules[p.module].weight
                if p.module not in record.base_weights:
                    record.base_weights[p.module] = weight.detach().to("cpu", copy=True)
                    first_touch.append(p.module)
                a = get(p.key_a).to(weight.device, torch.float32)  # [r, in]
                b = get(p.key_b).to(weight.device, torch.float32)  # [out, r]
                merged = weight.float() + p.scale * (b @ a)  # [out, in]
                weight.copy_(merged.to(weight.dtype))
                done.append(p)
    except BaseException:
        _roll_back(modules, record, first_touch, done, tensors)
        raise
    report = LoRAMergeReport(
        source=tensors.source,
        format=fmt,
        alpha=alpha,
        alpha_source=alpha_source,
        layers=tuple(p.module for p in pairs),
        ranks={p.module: p.rank for p in pairs},
        scales={p.module: p.scale for p in pairs},
    )
    record.merged.append(report)
    ranks = sorted(set(report.ranks.values()))
    scales = sorted(set(report.scales.values()))
    logger.info(
        "merged LoRA %s into %s: %d Linear layers changed (%s layout, rank %s, scale %s; lora_alpha: %s)",
        tensors.source,
        type(model).__name__,
        report.num_layers,
        fmt,
        ranks[0] if len(ranks) == 1 else ranks,
        scales[0] if len(scales) == 1 else f"{scales[0]:.4g}..{scales[-1]:.4g}",
        alpha_source,
    )
    return report


def _roll_back(
    modules: Mapping[str, nn.Module],
    record: _LoRARecord,
    first_touch: Sequence[str],
    done: Sequence[_Pair],
    tensors: _Tensors,
) -> None:
    """Undo a merge that failed midway (out of memory, interrupted).

    Layers this merge touched first come back bitwise from their base copy; layers an earlier
    LoRA had changed get this merge's delta subtracted (float32, so only approximately), with a
    warning: ``restore_base_weights`` still gives the exact base.
    """
    approximate = []
    with tensors.reader() as get:
        for p in done:
            weight = modules[p.module].weight
            if p.module in first_touch:
                continue
            a = get(p.key_a).to(weight.device, torch.float32)
            b = get(p.key_b).to(weight.device, torch.float32)
            weight.copy_((weight.float() - p.scale * (b @ a)).to(weight.dtype))
            approximate.append(p.module)
    for name in first_touch:
        modules[name].weight.copy_(record.base_weights.pop(name))
    if approximate:
        logger.warning(
            "LoRA merge failed midway; %d stacked layers were rolled back approximately (float rounding). "
            "restore_base_weights() restores the exact base weights.",
            len(approximate),
        )


@torch.no_grad()
def restore_base_weights(model: nn.Module) -> list[str]:
    """Puts back the exact base weight of every layer any ``merge_lora`` touched; returns their names."""
    record = getattr(model, _RECORD_ATTR, None)
    if record is None or not record.base_weights:
        logger.debug("restore_base_weights: no LoRA merged into %s", type(model).__name__)
        return []
    modules = dict(model.named_modules())
    names = list(record.base_weights)
    gone = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if gone:
        raise LoRAError(
            f"restore_base_weights: layers merged earlier are no longer Linear layers of the model: {gone[:5]}"
        )
    for name in names:
        weight = modules[name].weight
        if weight.dtype != record.base_weights[name].dtype:
            logger.warning(
                "%s: weight dtype changed since the merge (%s -> %s); the restored base is cast",
                name,
                record.base_weights[name].dtype,
                weight.dtype,
            )
        weight.copy_(record.base_weights[name])
    object.__delattr__(model, _RECORD_ATTR)
    logger.info("restored the base weights of %d layers of %s", len(names), type(model).__name__)
    return names


def merged_loras(model: nn.Module) -> tuple[LoRAMergeReport, ...]:
    """The reports of the LoRAs merged into ``model`` since its base weights were last restored."""
    record = getattr(model, _RECORD_ATTR, None)
    return tuple(record.merged) if record is not None else ()


# ----------------------------------------------------------------------------------------------
# Training: LoRALinear, injection, state dicts, EMA, export


class LoRALinear(nn.Linear):
    """A Linear layer plus a trainable low-rank update: ``y = x W^T + b + scale * (x A^T) B^T``.

    ``weight`` / ``bias`` stay under their own names (so the DiT's base state-dict keys do not
    change) and are frozen; ``lora_A`` ([rank, in]) and ``lora_B`` ([out, rank]) are bias-free
    Linear submodules, so their keys read ``<layer>.lora_A.weight`` like PEFT's. scale = alpha / rank.

    Precision: the LoRA parameters are float32 whatever the base dtype (ExVideo trains its extension
    in fp32 over a bf16 model); the branch runs in float32 with autocast off and its result is added
    in the base output's dtype. Cast the base (``model.to(torch.bfloat16)``) *before* injecting:
    a later ``.to(dtype)`` casts the LoRA parameters too.

    Init as PEFT: A kaiming-uniform, B zeros, so a fresh layer computes exactly the base layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float | None = None,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: float | None = None,
        *,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> LoRALinear:
        """Wraps an existing Linear: its weight/bias Parameters are reused (no copy) and frozen."""
        with torch.device("meta"):  # no memory or init time spent on a weight we replace at once
            layer = cls(
                linear.in_features, linear.out_features, rank, alpha, bias=linear.bias is not None, dropout=dropout
            )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        device = linear.weight.device
        layer.lora_A.to_empty(device=device)
        layer.lora_B.to_empty(device=device)
        layer.reset_lora_parameters(generator)
        layer.train(linear.training)
        return layer

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        if self.lora_A.weight.is_meta:
            return
        # nn.Linear's own init for A (what PEFT uses); B = 0 makes the update start at exactly zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update this layer adds to ``weight``: scale * B @ A, float32 [out, in]."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in] -> [..., out]
        out = F.linear(x, self.weight, self.bias)  # [..., out], base dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = self.lora_dropout(x.float())  # [..., in] fp32
            delta = self.lora_B(self.lora_A(h)) * self.scale  # [..., rank] -> [..., out] fp32
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


TargetSpec = int | tuple[int, float] | Mapping[str, Any]


def _target_settings(
    targets: Sequence[str] | str | Mapping[str, TargetSpec], rank: int | None, alpha: float | None
) -> dict[str, tuple[int, float | None]]:
    if isinstance(targets, str):
        targets = [targets]
    settings: dict[str, tuple[int, float | None]] = {}
    if isinstance(targets, Mapping):
        for target, spec in targets.items():
            if isinstance(spec, int):
                settings[target] = (spec, alpha)
            elif isinstance(spec, tuple) and len(spec) == 2:
                settings[target] = (int(spec[0]), float(spec[1]))
            elif isinstance(spec, Mapping) and "rank" in spec:
                settings[target] = (int(spec["rank"]), spec.get("alpha", alpha))
            else:
                raise LoRAError(
                    f"target {target!r}: expected a rank, (rank, alpha) or {{'rank': r, 'alpha': a}}, got {spec!r}"
                )
    else:
        if rank is None:
            raise LoRAError("inject_lora: give rank=, or targets as a dict of per-target ranks")
        settings = {t: (rank, alpha) for t in targets}
    if not settings:
        raise LoRAError("inject_lora: no targets given")
    return settings


def inject_lora(
    model: nn.Module,
    targets: Sequence[str] | str | Mapping[str, TargetSpec],
    rank: int | None = None,
    alpha: float | None = None,
    *,
    dropout: float = 0.0,
    freeze_others: bool = True,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Replaces the targeted Linear layers with ``LoRALinear`` in place; returns their names.

    Args:
        targets: name suffixes at a dot boundary (``"attn1.to_q"``, ``"ff.0"``, ``"norm1.linear"``,
            ``"proj_out"``; ``BLOCK_LINEAR_TARGETS`` = all eight Linear layers of each block), or a
            dict target -> rank, (rank, alpha) or {"rank": r, "alpha": a}, e.g. rank 64 everywhere
            and 128 on attention: ``{**dict.fromkeys(BLOCK_LINEAR_TARGETS, 64),
            **dict.fromkeys(["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out"], 128)}``.
            When several targets match one layer the longest wins (``"attn1.to_q"`` over ``"to_q"``).
        rank, alpha: defaults for targets that give none; alpha defaults to the rank (scale 1).
        freeze_others: set requires_grad False on every other parameter of the model, so only
            the LoRA trains (ExVideo's parameter freezing).
        generator: seeds the kaiming init of the A matrices.

    Raises ``LoRAError`` if a target matches no layer, matches a non-Linear module, or a layer
    already carries a LoRA.
    """
    settings = _target_settings(targets, rank, alpha)
    inside_lora = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    candidates = [(n, m) for n, m in model.named_modules() if n and not any(n.startswith(p + ".") for p in inside_lora)]
    chosen: dict[str, str] = {}  # module name -> target
    matched = dict.fromkeys(settings, 0)
    problems = []
    for name, module in candidates:
        hits = [t for t in settings if name == t or name.endswith("." + t)]
        if not hits:
            continue
        for t in hits:  # a target overridden by a longer one still matched something
            matched[t] += 1
        target = max(hits, key=len)
        if isinstance(module, LoRALinear):
            problems.append(f"{name!r} already carries a LoRA (target {target!r})")
        elif not isinstance(module, nn.Linear):
            problems.append(f"target {target!r} matches {name!r}, a {type(module).__name__}, not a Linear layer")
        else:
            chosen[name] = target
    unmatched = [t for t, n in matched.items() if n == 0]
    if unmatched:
        linear_names = [n for n, m in candidates if isinstance(m, nn.Linear)]
        problems.append(
            f"target(s) {unmatched} match no layer of {type(model).__name__}; Linear layers are named like "
            f"{linear_names[:10]}"
        )
    if problems:
        raise LoRAError("inject_lora: " + "; ".join(problems))

    for name, target in chosen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        r, a = settings[target]
        layer = LoRALinear.from_linear(getattr(parent, child), r, a, dropout=dropout, generator=generator)
        setattr(parent, child, layer)
    if freeze_others:
        # Everything but LoRA parameters (also those of an earlier inject_lora call) stops training.
        keep = {id(p) for p in lora_parameters(model)}
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
    ranks = sorted({settings[t][0] for t in chosen.values()})
    count = sum(p.numel() for p in lora_parameters(model))
    logger.info(
        "injected LoRA (rank %s) into %d Linear layers; %d trainable LoRA parameters", ranks, len(chosen), count
    )
    return list(chosen)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Name -> LoRALinear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters (A and B of every LoRALinear), for the optimiser."""
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<layer>.lora_A.weight`` / ``<layer>.lora_B.weight`` -> detached float32 CPU copies (B unscaled)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach().to("cpu", torch.float32, copy=True)
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach().to("cpu", torch.float32, copy=True)
    return out


def _check_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    expected = {k: tuple(s) for k, s in _lora_shapes(model).items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = [f"missing {k!r}" for k in expected if k not in found]
    problems += [f"unexpected {k!r}" for k in found if k not in expected]
    problems += [
        f"{k!r}: expected shape {list(s)}, found {list(found[k])}"
        for k, s in expected.items()
        if k in found and found[k] != s
    ]
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED]) + (" ..." if len(problems) > _MAX_LISTED else "")
        raise LoRAError(f"LoRA state dict does not fit the model's LoRA layers: {listed}")


def _lora_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Key -> shape of what ``lora_state_dict`` returns, without copying anything."""
    out: dict[str, torch.Size] = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.shape
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.shape
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Loads ``lora_state_dict``-style values (e.g. an EMA) into the model's LoRA layers; strict."""
    _check_lora_state_dict(model, state_dict)
    for name, layer in lora_layers(model).items():
        layer.lora_A.weight.copy_(state_dict[f"{name}.lora_A.weight"])
        layer.lora_B.weight.copy_(state_dict[f"{name}.lora_B.weight"])


def ema_lora_state_dicts(
    state_dicts: Iterable[Mapping[str, torch.Tensor]], gamma: float = 0.9
) -> dict[str, torch.Tensor]:
    """Exponential moving average over saved checkpoints, oldest first (ExVideo's post-training EMA).

    ``ema_1 = sd_1``, ``ema_k = gamma * ema_{k-1} + (1 - gamma) * sd_k``, in float32. A and B are
    averaged separately, as ExVideo averages every trainable tensor. ``state_dicts`` may be a
    generator that loads one checkpoint at a time. All must have the same keys and shapes.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    ema: dict[str, torch.Tensor] | None = None
    for i, sd in enumerate(state_dicts):
        if ema is None:
            ema = {k: v.detach().to(torch.float32, copy=True) for k, v in sd.items()}
            continue
        if set(sd) != set(ema):
            diff = sorted(set(sd) ^ set(ema))
            raise LoRAError(f"checkpoint {i} has other keys than checkpoint 0 (e.g. {diff[:5]})")
        for k, v in sd.items():
            if v.shape != ema[k].shape:
                raise LoRAError(
                    f"checkpoint {i}, key {k!r}: shape {list(v.shape)}, checkpoint 0 has {list(ema[k].shape)}"
                )
            ema[k].mul_(gamma).add_(v.detach().to(ema[k].device, torch.float32), alpha=1.0 - gamma)
    if ema is None:
        raise ValueError("ema_lora_state_dicts: no state dicts given")
    return ema


def export_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    lora_weights: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Writes the model's LoRA as a DiffSynth-layout safetensors file, atomically; returns the path.

    Keys: ``<layer>.lora_A.default.weight`` (A) and ``<layer>.lora_B.default.weight``
    (scale * B, alpha/rank folded in), so DiffSynth's merge ``W += 1.0 * B @ A`` and our
    ``merge_lora(..., alpha=1.0)`` both give the trained model. The header records the per-layer
    ranks, alphas and targets (JSON strings) plus any ``metadata`` given.

    Args:
        lora_weights: ``lora_state_dict``-style values to write instead of the model's current
            ones (e.g. ``ema_lora_state_dicts(...)``); scales still come from the model's layers.
        dtype: of the written tensors (the fold is done in float32 first).

    The file is written atomically (:mod:`diffsynth_cog.atomic`): a failed write leaves no partial
    file and any older file intact.
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError(f"export_lora: {type(model).__name__} has no LoRA layers (call inject_lora first)")
    if lora_weights is not None:
        _check_lora_state_dict(model, lora_weights)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        a = (lora_weights[f"{name}.lora_A.weight"] if lora_weights is not None else layer.lora_A.weight).detach()
        b = (lora_weights[f"{name}.lora_B.weight"] if lora_weights is not None else layer.lora_B.weight).detach()
        tensors[f"{name}.lora_A.default.weight"] = a.to("cpu", torch.float32).to(dtype).contiguous()
        tensors[f"{name}.lora_B.default.weight"] = (b.to("cpu", torch.float32) * layer.scale).to(dtype).contiguous()
    header = {
        "format": "pt",
        "lora_format": "diffsynth",
        "lora_scale_folded_into_B": "true",
        "lora_targets": json.dumps(list(layers)),
        "lora_ranks": json.dumps({n: m.rank for n, m in layers.items()}),
        "lora_alphas": json.dumps({n: m.alpha for n, m in layers.items()}),
    }
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise LoRAError(f"export_lora: metadata must map str to str; {k!r}: {v!r} does not")
        if k in header or k == _HEADER_CONFIG_KEY:
            raise LoRAError(f"export_lora: metadata key {k!r} is reserved")
        header[k] = v
    target = save_safetensors_atomic(path, tensors, header)
    logger.info("exported LoRA of %d layers to %s", len(layers), target)
    return target
