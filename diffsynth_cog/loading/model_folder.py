"""What a CogVideoX model folder holds and where: the one resolver every loader and entry point uses.

A model folder in the diffusers layout::

    text_encoder/  tokenizer/  transformer/  vae/  scheduler/scheduler_config.json

:func:`resolve_model_folder` starts from the whole folder, from one part of it (a ``transformer/``,
``text_encoder/`` or ``vae/`` folder, or a weights file inside one: DiffSynth-Studio's example
passes ``.../vae/diffusion_pytorch_model.safetensors`` with no config beside it), or from parts given
one by one, and finds the rest beside it. It also reads what the weights cannot tell:

* the prompt length: the transformer's ``max_text_seq_length`` (226 for every CogVideoX 1.0 model),
  which the T5 tokenizer must pad and truncate to;
* the VAE's latent scale: the VAE's config.json, else the rule of the family the transformer belongs
  to (:func:`~diffsynth_cog.configs.dit_family`: no RoPE means 2B);
* the scheduler config (absent: the family's preset, see :func:`~diffsynth_cog.schedulers.scheduler_preset`).

Only config files and safetensors headers are read; no tensor data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from diffsynth_cog.configs import DEFAULT_MAX_LENGTH, DiTConfig, dit_family, vae_scaling_factor
from diffsynth_cog.errors import ModelDetectionError
from diffsynth_cog.loading.dit_loader import infer_dit_config
from diffsynth_cog.loading.state_dict import read_config, resolve_weights, tensor_shapes

logger = logging.getLogger(__name__)

# The parts that hold weights, in load order; any of them makes a folder a model folder.
WEIGHT_PARTS = ("text_encoder", "transformer", "vae")
PARTS = (*WEIGHT_PARTS, "tokenizer")
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
# diffusers / transformers class names in config.json -> the part they are.
PART_OF_CLASS = {
    "CogVideoXTransformer3DModel": "transformer",
    "AutoencoderKLCogVideoX": "vae",
    "T5EncoderModel": "text_encoder",
}


@dataclass(frozen=True)
class ModelFolder:
    """Where each part of a CogVideoX model is, and what its configs say.

    ``root`` is the model folder (None for parts that stand alone). A part that was not found is
    None. ``dit_config`` comes from the transformer's config.json or, without one, from its tensor
    headers. ``vae_scaling_factor`` is None when neither a VAE config.json nor a transformer tells
    it (the VAE loader then uses the 5B value and says so).
    """

    path: Path | None
    root: Path | None
    transformer: Path | None
    text_encoder: Path | None
    tokenizer: Path | None
    vae: Path | None
    scheduler_config: Path | None
    dit_config: DiTConfig | None
    vae_scaling_factor: float | None
    vae_scaling_factor_source: str
    tokenizer_searched: tuple[Path, ...] = ()

    @property
    def family(self) -> str | None:
        """``cogvideox-2b`` / ``cogvideox-5b`` / ``cogvideox-5b-i2v``, or None without a transformer."""
        return dit_family(self.dit_config) if self.dit_config is not None else None

    @property
    def max_text_seq_length(self) -> int:
        """Tokens per prompt for the T5 tokenizer: the transformer's, else 226."""
        return self.dit_config.max_text_seq_length if self.dit_config is not None else DEFAULT_MAX_LENGTH

    def weight_parts(self) -> list[Path]:
        """The parts holding weights that were found, in load order (text encoder, transformer, VAE)."""
        found = (self.text_encoder, self.transformer, self.vae)
        return [p for p in found if p is not None]

    def require(self, part: str) -> Path:
        """The path of ``part`` ("transformer", "text_encoder", "tokenizer", "vae"), or a FileNotFoundError
        that says where it was looked for and what to pass instead."""
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; valid: {PARTS}")
        found: Path | None = getattr(self, part)
        if found is not None:
            return found
        if part == "tokenizer":
            looked = ", ".join(str(p) for p in self.tokenizer_searched) or "nowhere (no text encoder or model folder)"
            raise FileNotFoundError(
                f"no T5 tokenizer found for {self.text_encoder or self.path}: looked in {looked} for a folder with "
                f"{' or '.join(TOKENIZER_FILES)}; pass tokenizer_path=<the model's tokenizer/ folder>"
            )
        where = f"the model folder {self.root}" if self.root is not None else f"{self.path} (not inside a model folder)"
        raise FileNotFoundError(
            f"no {part}/ in {where}; pass a CogVideoX model folder that has one, or the {part}'s path itself"
        )

    def require_dit_config(self) -> DiTConfig:
        """The transformer's config; FileNotFoundError (as :meth:`require`) without a transformer."""
        self.require("transformer")
        assert self.dit_config is not None
        return self.dit_config


def is_model_folder(path: Path) -> bool:
    """A folder with a ``text_encoder/``, ``transformer/`` or ``vae/`` subfolder (and no config.json of its own)."""
    return path.is_dir() and not (path / "config.json").exists() and any((path / sub).is_dir() for sub in WEIGHT_PARTS)


def declared_part(path: Path) -> str | None:
    """The part that the config.json of ``path`` (or of its folder) declares, by class name; None without one."""
    try:
        found = read_config(path)
    except ValueError as e:  # WeightsFileError: unreadable JSON
        raise ModelDetectionError(f"unreadable config.json for {path} ({e})") from e
    if found is None:
        return None
    config = found[0]
    for name in [config.get("_class_name"), *(config.get("architectures") or [])]:
        if name in PART_OF_CLASS:
            return PART_OF_CLASS[name]
    return None


def _folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _root_of(part: Path) -> Path | None:
    """The model folder a part sits in: the folder above the part's own, if it is one."""
    parent = _folder(part).parent
    return parent if is_model_folder(parent) else None


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def _unique(paths: list[Path]) -> tuple[Path, ...]:
    return tuple(dict.fromkeys(paths))


def read_transformer_config(transformer: Path) -> DiTConfig:
    """The transformer's config: its config.json, else inferred from tensor headers (no data read)."""
    found = read_config(transformer)
    if found is not None:
        return DiTConfig.from_dict(found[0], source=str(found[1]))
    source = resolve_weights(transformer)
    return infer_dit_config(tensor_shapes(source), source=str(source.path))


def _vae_scale(vae: Path | None, dit_config: DiTConfig | None, transformer: Path | None) -> tuple[float | None, str]:
    found = read_config(vae) if vae is not None else None
    if found is not None and "scaling_factor" in found[0]:
        return float(found[0]["scaling_factor"]), str(found[1])
    if dit_config is not None:
        family = dit_family(dit_config)
        return vae_scaling_factor(family), f"the {family} family of the transformer {transformer}"
    return None, "unknown: no VAE config.json and no transformer to tell the model family"


def _check_exists(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found: {path} (expected a CogVideoX model folder with text_encoder/, tokenizer/, "
            "transformer/, vae/, or one of these parts)"
        )
    return path


def resolve_model_folder(
    path: str | os.PathLike[str] | None = None,
    *,
    part: str | None = None,
    transformer: str | os.PathLike[str] | None = None,
    text_encoder: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    vae: str | os.PathLike[str] | None = None,
) -> ModelFolder:
    """Where the parts of the model at ``path`` are (see the module docstring).

    Args:
        path: a whole model folder, or one part of it: a folder or a weights file of the
            transformer, the text encoder or the VAE.
        part: which part ``path`` is ("transformer", "text_encoder" or "vae"); by default told by
            its config.json's class name, else by its folder's name.
        transformer, text_encoder, tokenizer, vae: paths that override the folder's parts (with no
            ``path``, the model folder is the one the first of them sits in).

    Raises FileNotFoundError for a path that does not exist, ModelDetectionError when ``path`` is
    neither a model folder nor a part that can be told.
    """
    explicit = {
        name: _check_exists(Path(value).expanduser(), name.replace("_", " "))
        for name, value in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae))
        if value is not None
    }
    given_tokenizer = _check_exists(Path(tokenizer).expanduser(), "tokenizer") if tokenizer is not None else None
    anchor, root = _anchor_and_root(path, part, explicit, given_tokenizer)
    found = _find_parts(explicit, root)
    searched_once = _tokenizer_candidates(given_tokenizer, root, found["text_encoder"], anchor)
    tokenizer_folder = next((c for c in searched_once if _has_tokenizer(c)), None)
    scheduler = _scheduler_config(root, anchor)

    dit_config = read_transformer_config(found["transformer"]) if found["transformer"] is not None else None
    scale, scale_source = _vae_scale(found["vae"], dit_config, found["transformer"])
    return ModelFolder(
        path=Path(path).expanduser() if path is not None else None,
        root=root,
        transformer=found["transformer"],
        text_encoder=found["text_encoder"],
        tokenizer=tokenizer_folder,
        vae=found["vae"],
        scheduler_config=scheduler,
        dit_config=dit_config,
        vae_scaling_factor=scale,
        vae_scaling_factor_source=scale_source,
        tokenizer_searched=searched_once,
    )


def _anchor_and_root(
    path: str | os.PathLike[str] | None,
    part: str | None,
    explicit: dict[str, Path],
    given_tokenizer: Path | None,
) -> tuple[Path | None, Path | None]:
    """(the part that places the model, the model folder): ``path`` when given (a part found there is
    added to ``explicit``, unless overridden), else the first explicit part, else the tokenizer."""
    anchor: Path | None = None
    root: Path | None = None
    if path is not None:
        p = _check_exists(Path(path).expanduser(), "model")
        if is_model_folder(p):
            root = p
        else:
            kind = part or declared_part(p) or (_folder(p).name if _folder(p).name in WEIGHT_PARTS else None)
            if kind not in WEIGHT_PARTS:
                raise ModelDetectionError(
                    f"{p}: cannot tell which part of a CogVideoX model this is (no config.json naming its class, "
                    f"folder not named {' / '.join(WEIGHT_PARTS)}); pass a whole model folder, or say part="
                    f"{' / '.join(repr(n) for n in WEIGHT_PARTS)}"
                )
            explicit.setdefault(kind, p)
            anchor, root = p, _root_of(p)
    else:
        anchor = next((explicit[n] for n in WEIGHT_PARTS if n in explicit), given_tokenizer)
        if anchor is None:
            raise ValueError("resolve_model_folder: pass a model folder or the path of at least one of its parts")
        root = _root_of(anchor)
    return anchor, root


def _find_parts(explicit: Mapping[str, Path], root: Path | None) -> dict[str, Path | None]:
    """{part: its path} for each of WEIGHT_PARTS: the explicit one, else the model folder's subfolder, else None."""

    def find(name: str) -> Path | None:
        if name in explicit:
            return explicit[name]
        return root / name if root is not None and (root / name).is_dir() else None

    return {name: find(name) for name in WEIGHT_PARTS}


def _tokenizer_candidates(
    given_tokenizer: Path | None, root: Path | None, text_encoder: Path | None, anchor: Path | None
) -> tuple[Path, ...]:
    """The folders searched for the tokenizer, in order, each once."""
    searched: list[Path] = []
    if given_tokenizer is not None:
        searched.append(given_tokenizer)
    else:
        if root is not None:
            searched.append(root / "tokenizer")
        if text_encoder is not None:
            te = _folder(text_encoder)
            searched += [te / "tokenizer", te]
        if anchor is not None:
            searched.append(_folder(anchor) / "tokenizer")
    return _unique(searched)


def _scheduler_config(root: Path | None, anchor: Path | None) -> Path | None:
    """The scheduler config: the model folder's, else the one beside the anchoring part, else None."""
    schedulers = [root / SCHEDULER_CONFIG] if root is not None else []
    if anchor is not None:
        schedulers.append(_folder(anchor) / SCHEDULER_CONFIG)
    return next((c for c in schedulers if c.is_file()), None)
