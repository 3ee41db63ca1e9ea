r"""GQ's quotient from per-class norms, and the sampled estimator's classes (package-internal).

`estimator="sampled"` differentiates the target and $K$ = `num_sampled` other classes instead
of all $N$, weighted so that the denominator of Eq. 7 is unbiased (`docs/math.md` has the
proposals and their measured spread): `draw_columns` draws the classes and their weights,
`quotient` forms Eq. 7 from all $N$ norms or from the drawn ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._runtime import float64


def draw_columns(
    logits: Tensor,
    targets: Tensor,
    temperature: float,
    operand: str,
    estimator: str,
    num_sampled: int | None,
    generator: torch.Generator | None,
) -> tuple[Tensor | None, Tensor | None]:
    """Class columns `(B, 1 + K)` (target first, on the logits' device) and denominator weights
    `(B, K)` (float64).

    `(None, None)` means every class, exactly. The draws run in float64 where the detectors'
    scores do (`_runtime.float64`: the logits' device, or the CPU for a device without
    float64), and so does `generator`. The proposal fits the operand (`docs/math.md`).
    """
    num_classes = logits.shape[1]
    if estimator == "exact" or num_sampled is None or num_sampled >= num_classes - 1:
        return None, None
    with torch.no_grad():
        z = float64(logits.detach()) / temperature
        if generator is not None and generator.device.type != z.device.type:
            raise ValueError(
                f"`generator` must be on the device where the sampled estimator draws, {z.device} "
                f"(float64, for logits on {logits.device}), got a generator on {generator.device}"
            )
        targets = targets.to(z.device)[:, None]
        if operand == "softmax":
            others, weights = softmax_draws(z, targets, num_sampled, generator)
        else:
            others, weights = uniform_draws(z, targets, num_sampled, generator)
        columns = torch.cat([targets, others], dim=1).to(logits.device)
    return columns, weights


def softmax_draws(
    z: Tensor, targets: Tensor, num_sampled: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Softmax operand, whose norms scale with S_j: the K // 2 most probable other classes
    exactly, the rest drawn with replacement from the tail with q_j proportional to S_j."""
    top_k = num_sampled // 2
    drawn = num_sampled - top_k
    masked = z.scatter(1, targets, float("-inf"))
    top = masked.topk(top_k, dim=1).indices
    q = masked.scatter(1, top, float("-inf")).softmax(dim=1)
    draws = torch.multinomial(q, drawn, replacement=True, generator=generator)
    tail_weights = 1.0 / (drawn * q.gather(1, draws))
    weights = torch.cat([tail_weights.new_ones(top.shape), tail_weights], dim=1)
    return torch.cat([top, draws], dim=1), weights


def uniform_draws(
    z: Tensor, targets: Tensor, num_sampled: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Logits and log-softmax operands, whose norms do not scale with S_j: K of the N - 1 other
    classes drawn uniformly without replacement, each weighted (N - 1) / K."""
    keys = torch.rand(z.shape, dtype=z.dtype, device=z.device, generator=generator)
    others = keys.scatter(1, targets, -1.0).topk(num_sampled, dim=1).indices
    return others, z.new_full(others.shape, (z.shape[1] - 1) / num_sampled)


def quotient(norms: Tensor, targets: Tensor, weights: Tensor | None, eps: float) -> Tensor:
    """Eq. 7 from all N norms (`weights` None) or from the sampled columns (target first)."""
    if weights is None:
        numerator = norms.gather(1, targets[:, None]).squeeze(1)
        denominator = norms.sum(dim=1) - numerator
    else:
        numerator = norms[:, 0]
        denominator = (norms[:, 1:] * weights.to(norms.dtype).to(norms.device)).sum(dim=1)
    return numerator / (denominator + eps)
