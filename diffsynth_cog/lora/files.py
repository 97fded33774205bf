"""Reading LoRA files and planning a merge into the CogVideoX DiT (no weight is touched here).

Two file layouts are read (safetensors only, never pickle), told apart by their key names:

* **DiffSynth** (ExVideo's release, DiffSynth-Studio's trainer, our ``export_lora``): PEFT names on
  DiffSynth-Studio's module names, ``blocks.N.attn1.to_q.lora_A.default.weight`` /
  ``...lora_B.default.weight``; outside the blocks ``context_embedder``,
  ``time_embedder.timestep_embedder.0`` / ``.2``, ``norm_out.linear``, ``proj_out`` (our own names
  ``text_proj``, ``time_embed.0`` / ``.2``, which older exports used, are read too). Read as
  DiffSynth-Studio 1.1.x reads it: any adapter name in place of ``default`` (or none), a leading
  ``diffusion_model.`` stripped, ``.alpha`` keys ignored (logged), and merged as
  ``W += alpha * B @ A`` with no rank scaling (any lora_alpha metadata is ignored too).
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
the model's Linear layers, dtypes, finite values): :func:`plan_merge` returns the checked pairs
or raises ``LoRAError`` listing each problem.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from diffsynth_cog.errors import LoRAError
from diffsynth_cog.loading.dit_loader import diffsynth_rename, dit_rename
from diffsynth_cog.loading.state_dict import resolve_weights, safetensors_metadata

logger = logging.getLogger(__name__)

DIFFSYNTH = "diffsynth"
DIFFUSERS = "diffusers"

# PEFT's key; the adapter name (``default``) may be any one segment, or absent, as DiffSynth reads it.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")
# Prefixes of diffusers/PEFT files: the pipeline's component name, PEFT's model wrapper.
_DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.")
# A prefix DiffSynth strips (ComfyUI-style files); it marks the DiffSynth layout.
_DIFFSYNTH_PREFIX = "diffusion_model."
# Module names of the DiffSynth layout (DiffSynth-Studio's, or our own older ones) that diffusers spells
# differently; ``norm_out.linear`` and ``proj_out`` are the same in every layout.
_DIFFSYNTH_ONLY_NAME = re.compile(r"^(blocks\.\d+\.|context_embedder$|time_embedder\.|text_proj$|time_embed\.)")
_HEADER_CONFIG_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry
TRAINED_ATTENTION_KEY = "diffsynth_cog_attention"  # the attention spec a LoRA was trained under (trainer's export)
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
_MAX_LISTED = 20  # problems listed in one error message


# ----------------------------------------------------------------------------------------------
# Reading LoRA tensors (lazily: a 1 GB file is checked from its header before any data is read)


@dataclass(frozen=True)
class LoRATensors:
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


def open_lora(lora: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> LoRATensors:
    """A LoRA file, a folder holding one (or a shard index), or a state dict, read from headers only."""
    if isinstance(lora, Mapping):
        bad = [k for k, v in lora.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise LoRAError(f"LoRA state dict: values must be tensors; {bad[:3]} are not")
        return LoRATensors(
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
    return LoRATensors(name, shapes, dtypes, metadata, source.files[0].parent, files=files)


def trained_attention(lora: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> str | None:
    """The attention spec (e.g. ``"window:2"``) a LoRA exported by this trainer was trained under, from its
    header; None for a LoRA trained dense or written elsewhere."""
    return open_lora(lora).metadata.get(TRAINED_ATTENTION_KEY)


# ----------------------------------------------------------------------------------------------
# Planning a merge: every check happens here, before any weight is touched


@dataclass(frozen=True)
class LoRAPair:
    """One checked A/B pair of a LoRA and the Linear layer (our name) it updates."""

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


def _parse_keys(tensors: LoRATensors) -> tuple[str | None, dict[str, dict[str, str]], list[str]]:
    """Groups keys by module, {file module name: {"A": key, "B": key, "alpha": key}}, and tells
    the layout from the names: "diffsynth", "diffusers", or None when every name is spelled the
    same in both (``proj_out``, ``norm_out.linear``)."""
    groups: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    ours_example = theirs_example = None
    adapters: set[str] = set()
    stripped = 0
    for key in tensors.shapes:
        prefix = next((p for p in (*_DIFFUSERS_PREFIXES, _DIFFSYNTH_PREFIX) if key.startswith(p)), "")
        body = key[len(prefix) :]
        m = _LORA_KEY.match(body) or _ALPHA_KEY.match(body)
        if m is None:
            problems.append(
                f"key {key!r}: not a LoRA tensor (expected '<module>.lora_A[.<adapter>].weight', "
                f"'<module>.lora_B[.<adapter>].weight' or '<module>.alpha')"
            )
            continue
        module = m.group("module")
        part = m.groupdict().get("part") or "alpha"
        adapters.add(m.groupdict().get("adapter") or "default")
        renamed = dit_rename(module + ".weight")
        if prefix == _DIFFSYNTH_PREFIX or (_DIFFSYNTH_ONLY_NAME.match(module) and not prefix):
            ours_example = ours_example or key
            stripped += prefix == _DIFFSYNTH_PREFIX
        if prefix in _DIFFUSERS_PREFIXES or (renamed is not None and renamed != module + ".weight"):
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
    if adapters - {"default"}:
        logger.info(
            "%s: adapter name(s) %s read like 'default' (any name, as DiffSynth reads it)",
            tensors.source,
            sorted(adapters - {"default"}),
        )
    if stripped:
        logger.info(
            "%s: the '%s' prefix of %d keys stripped, as DiffSynth does", tensors.source, _DIFFSYNTH_PREFIX, stripped
        )
    return naming, groups, problems


def _alpha_config(
    tensors: LoRATensors, naming: str | None, lora_config: Mapping[str, Any] | None, has_alpha_keys: bool
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
    file_name: str, slot: Mapping[str, str], ours: str, layer: nn.Linear, tensors: LoRATensors, problems: list[str]
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


def plan_merge(
    model: nn.Module,
    tensors: LoRATensors,
    alpha: float,
    lora_config: Mapping[str, Any] | None,
) -> tuple[str, str, list[LoRAPair]]:
    """Checks the whole LoRA against the model; returns (layout, alpha source, pairs) or raises."""
    src = tensors.source
    if not tensors.shapes:
        raise LoRAError(f"{src}: holds no tensors")
    naming, groups, problems = _parse_keys(tensors)
    has_alpha_keys = any("alpha" in slot for slot in groups.values())
    ignored_alphas = 0
    if naming == DIFFSYNTH and has_alpha_keys and lora_config is None:
        groups, ignored_alphas = _drop_alpha_keys(src, groups)
        has_alpha_keys = False
    alphas, alpha_source = _alpha_config(tensors, naming, lora_config, has_alpha_keys)
    if ignored_alphas:
        alpha_source += f"; {ignored_alphas} '.alpha' keys ignored, as DiffSynth does"
    naming = _settle_naming(src, model, naming, alphas, has_alpha_keys)

    pairs, missing = _match_pairs(model, tensors, groups, naming, alpha, alphas, has_alpha_keys, problems)
    _note_unmatched(model, len(groups), missing, pairs, problems)
    if problems:
        _raise(src, model, problems)

    resolved = _read_values(tensors, pairs, alpha, problems)
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


def _drop_alpha_keys(src: str, groups: dict[str, dict[str, str]]) -> tuple[dict[str, dict[str, str]], int]:
    """Drops the '.alpha' keys of a DiffSynth-layout file; returns (the groups left, how many were dropped)."""
    # DiffSynth-Studio reads only the lora_B keys and their lora_A partners: '.alpha' keys never count.
    ignored_alphas = sum(slot.pop("alpha", None) is not None for slot in groups.values())
    groups = {name: slot for name, slot in groups.items() if slot}
    logger.warning(
        "%s: %d '.alpha' keys ignored, as DiffSynth-Studio ignores them (DiffSynth layout: W += alpha * B @ A, "
        "no rank scaling); pass lora_config= to scale it the PEFT way instead",
        src,
        ignored_alphas,
    )
    return groups, ignored_alphas


def _settle_naming(src: str, model: nn.Module, naming: str | None, alphas: _Alphas | None, has_alpha_keys: bool) -> str:
    """The layout to read the file with (deciding names common to both), checked against the model's family."""
    family = getattr(getattr(model, "config", None), "family", None)  # a DiT's family (families.Family)
    if naming is None and family is not None and family.lora_layouts == (DIFFUSERS,):
        naming = DIFFUSERS  # names common to both layouts, on a family with one layout
    if naming is None:  # names common to both layouts: the scaling information decides
        naming = DIFFUSERS if alphas is not None or has_alpha_keys else DIFFSYNTH
    if family is not None and naming not in family.lora_layouts:
        raise LoRAError(
            f"{src}: a DiffSynth-layout LoRA (DiffSynth-Studio's module names) cannot be merged into {family.label}: "
            "DiffSynth-Studio has no CogVideoX 1.5, so such files were trained on CogVideoX 1.0 (their shapes may fit, "
            f"their weights do not); use a diffusers / PEFT LoRA trained on {family.label}"
        )
    return naming


def _module_names(file_name: str, naming: str) -> tuple[str, str | None]:
    """(the file's module name without prefixes, our module name or None when it has no counterpart)."""
    name = file_name
    for p in (*_DIFFUSERS_PREFIXES, _DIFFSYNTH_PREFIX):
        name = name.removeprefix(p)
    if naming == DIFFUSERS:
        renamed = dit_rename(name + ".weight")
        ours = renamed[: -len(".weight")] if renamed is not None else None
    else:  # DiffSynth-Studio's names (or ours); other names are looked up as they are
        renamed = diffsynth_rename(name + ".weight")
        ours = renamed[: -len(".weight")] if renamed is not None else name
    return name, ours


def _match_pairs(
    model: nn.Module,
    tensors: LoRATensors,
    groups: Mapping[str, Mapping[str, str]],
    naming: str,
    alpha: float,
    alphas: _Alphas | None,
    has_alpha_keys: bool,
    problems: list[str],
) -> tuple[list[LoRAPair], list[str]]:
    """Matches each layer of the file to a Linear of the model: (pairs, keys of layers the model lacks);
    the scale of a pair is None where it needs the value of its '.alpha' key."""
    modules = dict(model.named_modules())
    pairs: list[LoRAPair] = []
    missing: list[str] = []
    for file_name, slot in groups.items():
        name, ours = _module_names(file_name, naming)
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
        pairs.append(LoRAPair(ours, slot["A"], slot["B"], rank, scale, slot.get("alpha")))
    return pairs, missing


def _note_unmatched(
    model: nn.Module, total: int, missing: Sequence[str], pairs: Sequence[LoRAPair], problems: list[str]
) -> None:
    """Adds to ``problems`` the layers the model lacks (first) and the layers addressed more than once (last)."""
    if missing:
        listed = ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        if len(missing) == total:
            head = f"none of its {total} LoRA layers exists in this {type(model).__name__} (a LoRA for another model?)"
        else:
            head = f"{len(missing)} of its {total} LoRA layers do not exist in this {type(model).__name__}"
        problems.insert(0, f"{head}: {listed}")
    counts = Counter(p.module for p in pairs)
    problems += [f"layer {name!r} is addressed by {n} entries of the file" for name, n in counts.items() if n > 1]


def _read_values(tensors: LoRATensors, pairs: Sequence[LoRAPair], alpha: float, problems: list[str]) -> list[LoRAPair]:
    """Values: finite, and the per-layer alphas (these need the data, not only the header); returns the
    pairs with every scale filled in."""
    resolved: list[LoRAPair] = []
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
            resolved.append(LoRAPair(p.module, p.key_a, p.key_b, p.rank, scale, p.alpha_key))
    return resolved


def _raise(source: str, model: nn.Module, problems: Sequence[str]) -> None:
    listed = "\n".join(f"  - {p}" for p in problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise LoRAError(
        f"{source}: cannot merge this LoRA into {type(model).__name__}; no weight was changed. "
        f"{len(problems)} problem(s):\n{listed}{more}"
    )
