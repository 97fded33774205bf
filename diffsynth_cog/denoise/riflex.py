"""RIFLEx: training-free temporal extrapolation of RoPE video transformers (arXiv 2502.15894).

A RoPE transformer sees time through the rotation frequencies of the temporal axis of its head
dim: frequency ``theta_j = base^(-2(j-1)/d)`` (j = 1..d/2) turns by ``theta_j`` per latent frame, so
it repeats every ``N_j = round(2 pi / theta_j)`` frames. RIFLEx observes that a model asked for more
frames than it was trained on starts repeating content after about the period of one *intrinsic*
frequency (index k): once positions exceed that period, its phase comes round again and the model
sees "the same time" twice. The fix lowers just that frequency so that the whole target length L
stays within 90 % of one period: ``theta_k = 0.9 * 2 pi / L``, applied only when L > N_k (below
that, the model's own frequency never wraps and nothing changes). Positions stay 0..L-1; the other
frequencies are untouched.

Published for CogVideoX-5B: k = 2, N_k = 20 (head dim 64, so the temporal axis has d = 16 channels,
8 frequencies with periods 6, 20, 63, ...). :func:`identify_k` finds k for another RoPE model from the
latent frame at which its over-long videos start to repeat.

CogVideoX 1.5: the rule carries over unchanged (the same 3D RoPE, head dim 64, the same 8 temporal
frequencies), but its temporal positions count *temporal patches* of 2 latent frames (8 pixel frames),
so k, N_k and L are in temporal patches there, and no setting is published for 1.5:
``riflex=True`` is refused on it (pass ``(k, N_k)`` found with :func:`identify_k` from the temporal patch at
which its over-long videos repeat); borrowing 5B's (2, 20) would be a guess for another model.

Not for CogVideoX-2B: it has no RoPE. Its positions are a fixed sin-cos table *added* to the tokens
before the q/k projections, so attention logits do not depend on a position difference through
``cos((m - n) theta_j)``; no single frequency's phase wrap explains the repetition, and the learned
projections mix the table's channels, so lowering one of its frequencies has no analysis behind it.
The pipeline refuses ``riflex`` for such models instead of guessing (:func:`resolve_riflex`).

In this package the rule lives in the RoPE table (``models.positions.rope_table(..., riflex=(k, N_k))``,
cached per setting) and the setting is an input of a DiT call (``CogDiT.embed(..., riflex=...)``), so
compiled blocks see new tables as tensor values, never as new code. L is the length of the call: with
temporal windows (``diffsynth_cog.denoise.windows``) each window is a call of the window's length.
"""

from __future__ import annotations

import math

from diffsynth_cog.configs import DiTConfig, published_riflex


def intrinsic_periods(dim: int, theta: float) -> list[int]:
    """Period in latent frames, ``round(2 pi / theta_j)``, of each temporal RoPE frequency j = 1..dim/2."""
    return [round(2 * math.pi * theta ** (2 * (j - 1) / dim)) for j in range(1, dim // 2 + 1)]


def identify_k(repeat_frame: int, dim: int = 16, theta: float = 10000.0) -> tuple[int, int]:
    """RIFLEx's intrinsic frequency: the (1-based) index k of the temporal frequency whose period is closest
    to ``repeat_frame``, the latent frame at which the base model's over-long videos start repeating, and
    that period N_k. ``dim``: channels of the temporal RoPE axis (head_dim / 4 in CogVideoX).
    Ties go to the lower index (the higher frequency)."""
    if repeat_frame < 1:
        raise ValueError(f"repeat_frame must be a latent frame index >= 1; got {repeat_frame}")
    periods = intrinsic_periods(dim, theta)
    k = min(range(len(periods)), key=lambda j: abs(periods[j] - repeat_frame)) + 1
    return k, periods[k - 1]


def resolve_riflex(config: DiTConfig, riflex: bool | tuple[int, int] | None) -> tuple[int, int] | None:
    """A call's ``riflex`` option -> (k, N_k) or None; checked against the model before anything runs.

    ``True``: the published setting of this model (CogVideoX-5B: (2, 20)); ``(k, N_k)``: that setting;
    ``None``/``False``: off. Refused for models without RoPE (CogVideoX-2B, see the module docstring).
    """
    if riflex is None or riflex is False:
        return None
    if not config.use_rotary_positional_embeddings:
        raise ValueError(
            "riflex needs a RoPE model (CogVideoX-5B / 5B-I2V): this transformer (CogVideoX-2B) adds fixed sin-cos "
            "positions to its tokens, where no single temporal frequency governs when videos repeat, so RIFLEx has "
            "no defined effect; for longer 2B videos use windowed denoising (windows=..., --window-frames)"
        )
    n_freq = config.attention_head_dim // 8  # temporal axis: head_dim / 4 channels, one frequency per pair
    if riflex is True:
        setting = published_riflex(config)
        if setting is None:
            unit = (
                "latent frame"
                if config.temporal_patch == 1
                else f"temporal patch ({config.temporal_patch} latent frames)"
            )
            raise ValueError(
                f"no published RIFLEx setting for this transformer ({config.family.label}; only CogVideoX-5B has one: "
                "k=2, N_k=20); pass riflex=(k, N_k) (CLI: --riflex K N_K), with N_k in RoPE temporal positions (one per "
                f"{unit}); diffsynth_cog.denoise.riflex.identify_k(repeat_frame, dim={config.attention_head_dim // 4}, "
                f"theta={config.rope_theta}) finds them from the {unit} at which the model's long videos start "
                "repeating"
            )
        return setting
    try:
        k, n_k = (int(v) for v in riflex)
    except (TypeError, ValueError):
        raise ValueError(f"riflex must be True, False/None or a pair (k, N_k) of integers; got {riflex!r}") from None
    if not 1 <= k <= n_freq:
        raise ValueError(f"riflex k={k} must be in 1..{n_freq} (this model's temporal RoPE frequencies)")
    if n_k < 1:
        raise ValueError(f"riflex N_k={n_k} must be a positive number of latent frames")
    return k, n_k
