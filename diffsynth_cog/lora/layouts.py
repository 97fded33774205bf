"""The two LoRA file layouts: how each names its keys and how each scales its update.

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

``_parse_keys`` groups a file's keys by layer and tells the layout from their names (``_settle_naming``
decides names common to both layouts, against the model's family; ``_module_names`` turns a file's name
into ours); ``_alpha_config`` finds where lora_alpha comes from, in the order above, and ``_Alphas``
gives each layer's scale from a LoraConfig-like dict.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from diffsynth_cog.errors import LoRAError
from diffsynth_cog.io.json_files import read_json
from diffsynth_cog.loading.dit_loader import diffsynth_rename, dit_rename
from diffsynth_cog.lora.reader import LoRATensors

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
_ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's save_pretrained
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
    return read_json(path, LoRAError), str(path)


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
