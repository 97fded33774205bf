"""CogVideoX's training objective: the v-prediction target and the loss the trainer minimises.

Both read ``a_t`` from the schedule (:func:`~diffsynth_cog.schedulers.alphas_cumprod`); the noised
input x_t comes from :func:`~diffsynth_cog.schedulers.add_noise`.
"""

from __future__ import annotations

import torch

from diffsynth_cog.schedulers.schedule import alpha_at


def velocity(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, alphas: torch.Tensor) -> torch.Tensor:
    """The v-prediction target v = sqrt(a_t) noise - sqrt(1 - a_t) x0. Shapes as in
    :func:`~diffsynth_cog.schedulers.add_noise`."""
    a = alpha_at(t, alphas, x0)
    return a**0.5 * noise - (1 - a) ** 0.5 * x0


def v_prediction_loss(
    v_pred: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, alphas: torch.Tensor
) -> torch.Tensor:
    """CogVideoX's training loss, a float32 scalar.

    x0_hat = sqrt(a_t) x_t - sqrt(1 - a_t) v_pred; loss = mean(1 / (1 - a_t) * (x0_hat - x0)^2).
    Since x0_hat - x0 = -sqrt(1 - a_t) (v_pred - v), this is the MSE on v; it is written in x0 form
    to stay the reference trainers' formula. v_pred, x0, x_t: [B, C, T, H, W] (any [B, ...]); t: [B].
    Computed in float32 whatever the inputs' dtype (the weight reaches ~1/(1 - a_0) ~ 1e3).
    """
    v_pred, x0, x_t = v_pred.float(), x0.float(), x_t.float()
    # Coefficients in float64: 1 - a_0 ~ 8.5e-4 loses ~4e-5 of its precision if a is rounded to float32 first.
    a = alpha_at(t, alphas, x0, dtype=torch.float64)
    x0_hat = a.sqrt().float() * x_t - (1 - a).sqrt().float() * v_pred
    weight = (1 / (1 - a)).float()
    return (weight * (x0_hat - x0) ** 2).mean()
