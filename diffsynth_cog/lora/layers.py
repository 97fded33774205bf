"""Trainable LoRA layers: ``LoRALinear`` and ``inject_lora``.

``inject_lora`` swaps chosen Linear layers for ``LoRALinear`` (base weight/bias kept under their
own names, frozen; fp32 ``lora_A``/``lora_B`` added); ``lora_layers`` / ``lora_parameters`` find
them again (what to optimise). A frozen layer that is not an ``nn.Linear`` but declares
``lora_base = True`` (the quantized layers of ``diffsynth_cog.quantization``) is wrapped as the
``base`` of a ``LoRALinear`` instead: LoRA training over an fp8 / int8 base.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffsynth_cog.errors import LoRAError

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


# ----------------------------------------------------------------------------------------------
# Training: LoRALinear, injection, state dicts, EMA, export

# Rows of the input up-cast at once when the backward forms grad_A = grad_h^T @ x (bounds the fp32
# temporary: 16k rows of a 12288-wide input are 0.75 GiB).
_GRAD_A_ROWS = 16384


class _LoRADelta(torch.autograd.Function):
    """``scale * (x A^T) B^T`` in float32 that saves x in its own dtype, not as an fp32 copy.

    The same numbers as autograd through ``x.float()`` (the up-cast is exact, so the backward recasts
    it), with a quarter of the memory for a bf16 input: the branches of q, k and v share one saved
    input, and nothing of the size of the feed-forward's 4x-wide activation is kept in fp32.
    """

    @staticmethod
    def forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        h = F.linear(x.float(), a)  # [..., rank] fp32
        return (F.linear(h, b) * scale).to(dtype)  # [..., out] fp32, rounded once to the base output's dtype

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, a, b, scale, _ = inputs
        ctx.scale = scale
        # h = x A^T is recomputed in backward (rank-wide, cheap) from the saved x.
        ctx.save_for_backward(x, a, b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, None, None]:
        x, a, b = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])  # [M, in], the input's dtype
        grad2 = grad.reshape(-1, grad.shape[-1])  # [M, out], the output's dtype (up-cast per chunk, exactly)
        grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)  # [rank, in], [out, rank]
        grad_x = torch.empty_like(x2) if ctx.needs_input_grad[0] else None
        # Row chunks bound the fp32 copy of x; one chunk (the usual case) is autograd's own sequence.
        for start in range(0, x2.shape[0], _GRAD_A_ROWS):
            rows = slice(start, start + _GRAD_A_ROWS)
            xf = x2[rows].float()  # [m, in]
            h = xf @ a.t()  # [m, rank], as in forward
            g = grad2[rows].float()  # [m, out]
            g = g if ctx.scale == 1.0 else g * ctx.scale
            grad_b.addmm_(g.t(), h)
            grad_h = g @ b  # [m, rank]
            grad_a.addmm_(grad_h.t(), xf)
            if grad_x is not None:
                grad_x[rows] = grad_h @ a  # fp32 -> the input's dtype
        return None if grad_x is None else grad_x.reshape(x.shape), grad_a, grad_b, None, None


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

    ``base``: None (the base is ``weight`` / ``bias``), or a frozen module computing the base output in
    their place, e.g. a quantized layer (:meth:`over`); then ``weight`` and ``bias`` are None.
    """

    base: nn.Module | None

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
        self.base = None
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

    @classmethod
    def over(
        cls,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        *,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> LoRALinear:
        """A LoRA on top of a frozen layer that is not an ``nn.Linear`` (e.g. a quantized one), which
        maps [..., base.in_features] -> [..., base.out_features] and becomes this layer's ``base``."""
        with torch.device("meta"):
            layer = cls(base.in_features, base.out_features, rank, alpha, bias=False, dropout=dropout)
        layer.weight = None  # the base holds the weights
        layer.base = base.requires_grad_(False)
        device = next(iter([*base.parameters(), *base.buffers()])).device
        layer.lora_A.to_empty(device=device)
        layer.lora_B.to_empty(device=device)
        layer.reset_lora_parameters(generator)
        layer.train(base.training)
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
        out = self.base(x) if self.base is not None else F.linear(x, self.weight, self.bias)  # [..., out], base dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            a, b = self.lora_A.weight, self.lora_B.weight
            if (
                isinstance(self.lora_dropout, nn.Identity)
                and torch.is_grad_enabled()
                and (a.requires_grad or b.requires_grad)
            ):
                # Training: the same numbers, with the input saved in its own dtype (see _LoRADelta).
                delta = _LoRADelta.apply(x, a, b, self.scale, out.dtype)
            else:  # through the submodules, whose forward hooks (e.g. the sequential offloader's) run
                h = self.lora_dropout(x.float())  # [..., in] fp32
                delta = (self.lora_B(self.lora_A(h)) * self.scale).to(out.dtype)  # [..., rank] -> [..., out]
        return out + delta

    def extra_repr(self) -> str:
        base = "" if self.base is None else ", base=" + type(self.base).__name__
        return f"in_features={self.in_features}, out_features={self.out_features}{base}, rank={self.rank}, alpha={self.alpha:g}"


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
        elif not isinstance(module, nn.Linear) and not getattr(module, "lora_base", False):
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
        module = getattr(parent, child)
        wrap = LoRALinear.from_linear if isinstance(module, nn.Linear) else LoRALinear.over
        layer = wrap(module, r, a, dropout=dropout, generator=generator)
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
