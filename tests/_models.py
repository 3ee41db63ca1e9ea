"""Small models shared by the test files."""

from __future__ import annotations

import torch
from torch import nn


def mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    """Flatten ``(B, 3, 2, 2)`` -> Linear(12, 16) -> Tanh -> Linear(16, 5), in ``dtype``; its
    layer ``"1"`` is the first Linear (Mahalanobis' layer in the detector tests)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).to(dtype)
