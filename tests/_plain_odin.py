"""A deliberately plain ODIN, the test oracle for ``gq_loss.odin``.

Written from DESIGN.md section 1, one sample at a time, in float64, with every formula spelled out:

    loss     = -log S_ŷ(x; T) = -(z_ŷ / T - log Σ_j exp(z_j / T))       (cross-entropy of z/T vs ŷ)
    s_k      = sign(∂loss / ∂x_k), with sign(0) = ``sign_of_zero``       (+1 in the original code)
    x̃_k      = clamp(x_k - ε · s_k / std[channel(k)], lo, hi)
    score(x) = max_j exp(z̃_j / T - log Σ_i exp(z̃_i / T))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def _log_sum_exp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _sign(value: float, sign_of_zero: int) -> float:
    if value > 0:
        return 1.0
    if value < 0:
        return -1.0
    return float(sign_of_zero)


def _per_channel(value: float | Sequence[float] | None, channel: int, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return float(value)
    return float(value[channel])


def plain_odin(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    temperature: float,
    epsilon: float,
    input_std: float | Sequence[float] | None = None,
    sign_of_zero: int = 0,
    clamp: tuple[float | Sequence[float], float | Sequence[float]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ODIN scores ``(B,)`` and perturbed inputs ``(B, ...)`` of an eval-mode float64 model."""
    scores, perturbed = [], []
    for i in range(inputs.shape[0]):
        x = inputs[i : i + 1].detach().to(torch.float64).clone().requires_grad_(True)
        z = model(x)[0]
        z_values = z.detach().tolist()
        y_hat = z_values.index(max(z_values))  # first maximum, as torch.argmax
        scaled = z / temperature
        top = scaled.max().detach()
        lse = top + torch.log(torch.exp(scaled - top).sum())
        loss = -(scaled[y_hat] - lse)
        (grad,) = torch.autograd.grad(loss, x)

        flat_x = x.detach().reshape(-1).tolist()
        flat_g = grad.reshape(-1).tolist()
        per_channel = math.prod(x.shape[2:]) if x.ndim > 2 else 1
        new = []
        for k, (xk, gk) in enumerate(zip(flat_x, flat_g, strict=True)):
            c = k // per_channel
            step = epsilon * _sign(gk, sign_of_zero) / _per_channel(input_std, c, 1.0)
            value = xk - step
            if clamp is not None:
                value = min(
                    max(value, _per_channel(clamp[0], c, 0.0)), _per_channel(clamp[1], c, 0.0)
                )
            new.append(value)
        x_tilde = torch.tensor(new, dtype=torch.float64).reshape(x.shape)
        with torch.no_grad():
            z_tilde = [float(v) / temperature for v in model(x_tilde)[0]]
        lse_tilde = _log_sum_exp(z_tilde)
        scores.append(max(math.exp(v - lse_tilde) for v in z_tilde))
        perturbed.append(x_tilde[0])
    return torch.tensor(scores, dtype=torch.float64), torch.stack(perturbed)
