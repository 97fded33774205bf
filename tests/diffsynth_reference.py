"""DiffSynth-Studio 1.1.9's own CogVideoX sampling code, loaded from the installed `diffsynth` wheel.

Installed with ``pip install --no-deps diffsynth==1.1.9`` (``.ci/run`` does): its declared dependencies
would pull torchvision and with it a CUDA build of torch. Importing the package runs every model module
of it (torchvision, ...), so only the three files CogVideoX sampling needs are loaded, by path, into a
private package name:

* ``schedulers/ddim.py`` (``EnhancedDDIMScheduler``; imports torch and math only);
* ``pipelines/base.py`` (``BasePipeline``: ``generate_noise``, the size check); its module-level
  ``from torchvision.transforms import GaussianBlur`` gets a stand-in, used only by methods we never call;
* ``pipelines/cog_video.py`` (``CogVideoPipeline.__call__``: noise, CFG, the denoising loop); the model,
  prompter and VAE classes it imports by name are stand-ins, since a test plugs in its own DiT,
  prompt embeddings and a decoder that records the final latents.

Nothing here is our code: these are DiffSynth-Studio's own functions, run unchanged.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

VERSION = "1.1.9"
_PACKAGE = "_diffsynth_reference"


def diffsynth_root() -> Path | None:
    """The installed ``diffsynth`` package folder if it is version 1.1.9, else None."""
    try:
        if importlib.metadata.version("diffsynth") != VERSION:
            return None
    except importlib.metadata.PackageNotFoundError:
        return None
    spec = importlib.util.find_spec("diffsynth")  # finds the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


requires_diffsynth = pytest.mark.skipif(
    diffsynth_root() is None, reason=f"needs DiffSynth-Studio: pip install --no-deps diffsynth=={VERSION}"
)


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _package(name: str, path: Path | None = None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path is not None else []
    sys.modules[name] = module
    return module


def _stand_in(name: str) -> type:
    return type(name, (), {"__doc__": "stand-in: the test supplies this part"})


def load_reference() -> types.SimpleNamespace:
    """``EnhancedDDIMScheduler`` and ``CogVideoPipeline`` from DiffSynth-Studio 1.1.9 (loaded once)."""
    if f"{_PACKAGE}.pipelines.cog_video" in sys.modules:
        loaded = sys.modules[f"{_PACKAGE}.pipelines.cog_video"]
        return types.SimpleNamespace(
            EnhancedDDIMScheduler=sys.modules[f"{_PACKAGE}.schedulers"].EnhancedDDIMScheduler,
            CogVideoPipeline=loaded.CogVideoPipeline,
        )
    root = diffsynth_root()
    if root is None:
        raise RuntimeError(f"DiffSynth-Studio {VERSION} is not installed")
    _package(_PACKAGE, root)
    schedulers = _package(f"{_PACKAGE}.schedulers")
    ddim = _load(f"{_PACKAGE}.schedulers.ddim", root / "schedulers" / "ddim.py")
    schedulers.EnhancedDDIMScheduler = ddim.EnhancedDDIMScheduler
    models = _package(f"{_PACKAGE}.models")
    for name in ("ModelManager", "FluxTextEncoder2", "CogDiT", "CogVAEEncoder", "CogVAEDecoder"):
        setattr(models, name, _stand_in(name))
    prompters = _package(f"{_PACKAGE}.prompters")
    prompters.CogPrompter = _stand_in("CogPrompter")
    _package(f"{_PACKAGE}.pipelines", root / "pipelines")

    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.transforms")}
    torchvision = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.GaussianBlur = _stand_in("GaussianBlur")
    torchvision.transforms = transforms
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = torchvision, transforms
    try:
        _load(f"{_PACKAGE}.pipelines.base", root / "pipelines" / "base.py")
    finally:  # the stand-in must not leak into other tests
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    cog_video = _load(f"{_PACKAGE}.pipelines.cog_video", root / "pipelines" / "cog_video.py")
    return types.SimpleNamespace(
        EnhancedDDIMScheduler=ddim.EnhancedDDIMScheduler, CogVideoPipeline=cog_video.CogVideoPipeline
    )


class _DiTAdapter(torch.nn.Module):
    """Our DiT behind DiffSynth's CogDiT call signature (it computes its own positions)."""

    def __init__(self, dit: torch.nn.Module) -> None:
        super().__init__()
        self.dit = dit

    def prepare_rotary_positional_embeddings(self, *args: Any, **kwargs: Any) -> None:
        return None

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, prompt_emb: torch.Tensor, **_: Any):
        return self.dit(hidden_states, timestep, prompt_emb)


class _Prompter:
    def __init__(self, embeddings: dict[str, torch.Tensor]) -> None:
        self.embeddings = embeddings

    def encode_prompt(self, prompt: str, positive: bool = True, device: Any = "cuda") -> torch.Tensor:
        return self.embeddings[prompt].to(device)


class _RecordingDecoder:
    """Stands in for the VAE decoder: keeps the latents the loop produced, returns black frames."""

    def __init__(self) -> None:
        self.latents: torch.Tensor | None = None

    def decode_video(self, latents: torch.Tensor, **_: Any) -> torch.Tensor:
        self.latents = latents.clone()
        b, _, t, h, w = latents.shape
        return torch.zeros(b, 3, (t - 1) * 4 + 1, h * 8, w * 8)


def diffsynth_final_latents(
    dit: torch.nn.Module,
    prompt_emb: dict[str, torch.Tensor],
    *,
    torch_dtype: torch.dtype,
    progress: Callable[[Any], Any] = lambda steps: steps,
    **call_kwargs: Any,
) -> torch.Tensor:
    """Runs DiffSynth-Studio's ``CogVideoPipeline.__call__`` on the CPU with ``dit`` (our model behind an
    adapter) and the given prompt -> embedding table; returns the latents it hands to its VAE decoder."""
    reference = load_reference()
    pipe = reference.CogVideoPipeline(device="cpu", torch_dtype=torch_dtype)
    decoder = _RecordingDecoder()
    pipe.dit = _DiTAdapter(dit)
    pipe.prompter = _Prompter(prompt_emb)
    pipe.vae_decoder = decoder
    pipe(progress_bar_cmd=progress, **call_kwargs)
    assert decoder.latents is not None
    return decoder.latents


# ------------------------------------------------------------------------------------------------------------------
# LoRA loading: DiffSynth-Studio's own model files and LoRA loaders

_MODELS_PACKAGE = "_diffsynth_reference_models"


def load_model_reference() -> types.SimpleNamespace:
    """DiffSynth-Studio 1.1.9's ``models/cog_dit.py`` (CogDiT and its parts), ``models/lora.py``
    (``get_lora_loaders``) and ``models/utils.py`` (``load_state_dict``), loaded by path into a private
    package whose ``models`` folder is the real one, so their relative imports (the other model files
    ``lora.py`` names) load DiffSynth's real files too; ``diffsynth/models/__init__.py`` (which imports
    ``model_manager`` and with it torchvision) is never run. Needs torch and einops only."""
    name = f"{_MODELS_PACKAGE}.models"
    if name not in sys.modules:
        root = diffsynth_root()
        if root is None:
            raise RuntimeError(f"DiffSynth-Studio {VERSION} is not installed")
        _package(_MODELS_PACKAGE, root)
        _package(name, root / "models")
    modules = {m: importlib.import_module(f"{name}.{m}") for m in ("cog_dit", "lora", "utils", "sd3_dit")}
    return types.SimpleNamespace(**modules)


def diffsynth_cog_dit(
    *,
    dim: int,
    time_embed_dim: int,
    text_embed_dim: int,
    in_channels: int,
    out_channels: int,
    patch_size: int,
    num_layers: int,
) -> torch.nn.Module:
    """DiffSynth-Studio's ``CogDiT`` at a tiny size: its ``__init__`` hard-codes the 5B sizes, so the
    same attributes are built here from its own classes (``CogPatchify``, ``TimestepEmbeddings``,
    ``CogDiTBlock``, ``CogAdaLayerNorm``) with the given sizes, in its ``__init__``'s order. Its
    attention has 48 heads hard-coded, so ``dim`` must be a multiple of 48."""
    ref = load_model_reference().cog_dit
    if dim % 48:
        raise ValueError(f"dim must be a multiple of 48 (DiffSynth's CogDiT has 48 heads), got {dim}")
    model = ref.CogDiT.__new__(ref.CogDiT)
    torch.nn.Module.__init__(model)
    model.patchify = ref.CogPatchify(in_channels, dim, patch_size)
    model.time_embedder = ref.TimestepEmbeddings(dim, time_embed_dim)
    model.context_embedder = torch.nn.Linear(text_embed_dim, dim)
    model.blocks = torch.nn.ModuleList([ref.CogDiTBlock(dim, time_embed_dim, 48) for _ in range(num_layers)])
    model.norm_final = torch.nn.LayerNorm((dim,), eps=1e-05, elementwise_affine=True)
    model.norm_out = ref.CogAdaLayerNorm(dim, time_embed_dim, single=True)
    model.proj_out = torch.nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)
    return model


def diffsynth_load_lora(model: torch.nn.Module, path: str, lora_alpha: float = 1.0) -> bool:
    """What DiffSynth-Studio's ``ModelManager.load_lora(path, lora_alpha)`` does for one model: read the
    file with its ``load_state_dict``, try its ``get_lora_loaders()`` in order, the first whose ``match``
    accepts the file merges it with its ``load``. Returns whether one did (DiffSynth prints "Cannot load
    LoRA" otherwise and leaves the model as it was). The loop is ``model_manager.py``'s, restated:
    that file imports torchvision."""
    ref = load_model_reference()
    state_dict = ref.utils.load_state_dict(path)
    for loader in ref.lora.get_lora_loaders():
        match = loader.match(model, state_dict)
        if match is not None:
            lora_prefix, model_resource = match
            loader.load(model, state_dict, lora_prefix, alpha=lora_alpha, model_resource=model_resource)
            return True
    return False
