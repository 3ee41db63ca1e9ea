"""Small helpers shared by the loss-side tests: parameter gradients read with plain autograd, and
mismatches collected so that one test reports every variant that fails.

No code shared with the package (the float64 references are in `_oracles`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def grads(model: nn.Module, value: Tensor, weights: Tensor | None = None) -> list[Tensor]:
    """Parameter gradient of ``value`` (weighted sum when it is a vector); zeros where unused."""
    params = list(model.parameters())
    total = value.sum() if weights is None else (value * weights).sum()
    if not total.requires_grad:
        return [torch.zeros_like(q) for q in params]
    out = torch.autograd.grad(total, params, allow_unused=True)
    return [torch.zeros_like(q) if g is None else g for q, g in zip(params, out, strict=True)]


def named_grads(model: nn.Module, value: Tensor) -> dict[str, Tensor]:
    """Parameter gradient of the scalar ``value``, by parameter name."""
    names, params = zip(*model.named_parameters(), strict=True)
    return dict(zip(names, torch.autograd.grad(value, params), strict=True))


def compare(errors: list[str], label: str, got: Any, want: Any, rtol: float = 1e-8) -> None:
    """Appends ``label`` and the first lines of the mismatch to ``errors`` when ``got`` is not
    ``want`` (``torch.testing.assert_close`` with ``rtol`` and ``atol=1e-10``)."""
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-10)
    except AssertionError as err:
        errors.append(f"{label}: {str(err).splitlines()[:6]}")
