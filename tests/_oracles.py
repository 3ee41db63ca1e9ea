"""Brute-force float64 references for the kernels and the loss.

Everything here is written for clarity, not speed: one sample and one class at a time, plain
formulas, no code shared with the package.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

Model = Callable[[Tensor], Tensor]
F64 = torch.float64
NORMS = (1, 2, math.inf)
HYPO = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# (method, chunk_size) pairs run by the parity tests; every method appears, with and without chunks.
VARIANTS: tuple[tuple[str, int | None], ...] = (
    ("auto", None),
    ("auto", 2),
    ("loop", None),
    ("recompute", None),
    ("recompute", 1),
    ("recompute", 2),
    ("batched", None),
    ("batched", 1),
    ("batched", 3),
    ("jacrev", None),
    ("jacrev", 2),
)


def operand_of(logits: Tensor, operand: str, temperature: float) -> Tensor:
    """The scores whose input gradients are measured, ``(B, N)``."""
    z = logits / temperature
    if operand == "softmax":
        return torch.softmax(z, dim=1)
    if operand == "log_softmax":
        return torch.log_softmax(z, dim=1)
    if operand == "logits":
        return z
    raise ValueError(f"unknown operand {operand!r}")


def norm(v: Tensor, p: float) -> Tensor:
    """The p-norm of all elements of ``v``, written out."""
    v = v.reshape(-1)
    if p == 1:
        return v.abs().sum()
    if p == 2:
        squares = (v * v).sum()
        # sqrt has no derivative at 0; take the subgradient 0 there (as torch's norms do).
        return squares.sqrt() if squares > 0 else squares
    return v.abs().max()


def brute_norms(
    model: Model, x: Tensor, operand: str = "softmax", temperature: float = 1.0, p: float = 1
) -> Tensor:
    """``n[i, j] = ||d operand_j(x_i) / d x_i||_p`` one sample and one class at a time, ``(B, N)``.

    Each sample is run as a batch of one (the model must not couple samples: eval-mode BatchNorm,
    no Dropout). The result keeps the graph: it can be differentiated w.r.t. the parameters and,
    when ``x`` requires grad, w.r.t. ``x``.
    """
    rows = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        if not xi.requires_grad:
            xi = xi.detach().requires_grad_(True)
        scores = operand_of(model(xi), operand, temperature)[0]
        row = []
        for j in range(scores.shape[0]):
            (g,) = torch.autograd.grad(scores[j], xi, create_graph=True, allow_unused=True)
            row.append(norm(g, p) if g is not None else scores.new_zeros(()))
        rows.append(torch.stack(row))
    if not rows:
        n = model(x).shape[1]
        return x.new_zeros(0, n)
    return torch.stack(rows)


def batch_sum_norms(
    model: Model, x: Tensor, operand: str = "softmax", temperature: float = 1.0, p: float = 1
) -> Tensor:
    """Batch-sum definition: row i of ``d/dx sum_k operand_j(x_k)``, one class at a time.

    Equal to :func:`brute_norms` when samples are independent; this is the definition with
    train-mode BatchNorm, where the batch statistics couple the samples. ``(B, N)``.
    """
    xl = x.detach().requires_grad_(True)
    scores = operand_of(model(xl), operand, temperature)
    cols = []
    for j in range(scores.shape[1]):
        (g,) = torch.autograd.grad(scores[:, j].sum(), xl, create_graph=True, retain_graph=True)
        cols.append(torch.stack([norm(g[i], p) for i in range(x.shape[0])]))
    return torch.stack(cols, dim=1)


def brute_gq(
    model: Model,
    x: Tensor,
    y: Tensor,
    temperature: float = 1.0,
    p: float = 1,
    eps: float = 1e-12,
    operand: str = "softmax",
) -> Tensor:
    """Paper Eq. 7 per sample: ``n[i, y_i] / (sum_{j != y_i} n[i, j] + eps)``, ``(B,)``."""
    n = brute_norms(model, x, operand, temperature, p)
    out = []
    for i in range(n.shape[0]):
        label = int(y[i])
        others = sum(n[i, j] for j in range(n.shape[1]) if j != label)
        out.append(n[i, label] / (others + eps))
    return torch.stack(out) if out else n.new_zeros(0)


def low_precision_norms(model: Model, x: Tensor, dtype: torch.dtype) -> Tensor:
    """The model's own ``dtype`` input gradient of each softmax column, its L1 norm in float64."""
    xl = x.to(dtype).requires_grad_(True)
    op = model(xl).float().softmax(dim=1)
    cols = [
        torch.autograd.grad(op[:, j].sum(), xl, retain_graph=True)[0].double().abs().flatten(1)
        for j in range(op.shape[1])
    ]
    return torch.stack([c.sum(1) for c in cols], dim=1)


def reference_formulation(
    model: Model,
    x: Tensor,
    y: Tensor,
    p: float = 1,
    eps: float = 1e-12,
    operand: str = "logits",
    temperature: float = 1.0,
) -> Tensor:
    """The authors' batch-level ratio, written from its description in DESIGN.md.

    ``num = ||d/dx sum_i o_{y_i}(x_i)||_p`` and ``den = ||d/dx sum_i sum_{j != y_i} o_j(x_i)||_p``
    with the norm over the whole batch tensor; returns ``num / (den + eps)`` (a scalar).
    """
    xl = x.detach().requires_grad_(True)
    scores = operand_of(model(xl), operand, temperature)
    target_mask = torch.zeros_like(scores)
    for i in range(scores.shape[0]):
        target_mask[i, int(y[i])] = 1.0
    other_mask = 1.0 - target_mask
    (g_num,) = torch.autograd.grad((scores * target_mask).sum(), xl, create_graph=True)
    (g_den,) = torch.autograd.grad((scores * other_mask).sum(), xl, create_graph=True)
    return norm(g_num, p) / (norm(g_den, p) + eps)


# --------------------------------------------------------------------------- small models


class Flat(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def make_model(kind: str, in_shape: tuple[int, ...], n: int, seed: int = 0) -> nn.Module:
    """Small float64 classifiers in eval mode; ``in_shape`` excludes the batch dimension."""
    torch.manual_seed(seed)
    d = math.prod(in_shape)
    if kind == "mlp_gelu":
        model: nn.Module = nn.Sequential(Flat(), nn.Linear(d, 6), nn.GELU(), nn.Linear(6, n))
    elif kind == "softplus":
        model = nn.Sequential(
            Flat(), nn.Linear(d, 5), nn.Softplus(), nn.Linear(5, 5), nn.Softplus(), nn.Linear(5, n)
        )
    elif kind == "conv_bn":
        conv, bn = (
            (nn.Conv1d(in_shape[0], 3, 3, padding=1), nn.BatchNorm1d(3))
            if len(in_shape) == 2
            else (nn.Conv2d(in_shape[0], 3, 3, padding=1), nn.BatchNorm2d(3))
        )
        with torch.no_grad():  # non-trivial statistics and affine parameters
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
        model = nn.Sequential(
            conv, bn, nn.Tanh(), Flat(), nn.Linear(3 * math.prod(in_shape[1:]), n)
        )
    elif kind in ("conv_gn", "conv_ln"):
        # Per-sample norms over channels and space: GroupNorm (2 groups of 2 channels) and
        # LayerNorm over (C, H, W) (or (C, L)), with non-trivial affine parameters.
        spatial = in_shape[1:]
        conv_type = nn.Conv1d if len(in_shape) == 2 else nn.Conv2d
        conv = conv_type(in_shape[0], 4, 3, padding=1)
        norm = nn.GroupNorm(2, 4) if kind == "conv_gn" else nn.LayerNorm((4, *spatial))
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
        model = nn.Sequential(conv, norm, nn.Tanh(), Flat(), nn.Linear(4 * math.prod(spatial), n))
    else:
        raise ValueError(kind)
    return model.to(F64).eval()


def input_shape(kind: str, rank: int) -> tuple[int, ...]:
    """Per-sample shape for an input of ``rank`` dimensions (batch included)."""
    if kind.startswith("conv_"):
        return (2, 5) if rank <= 3 else (2, 3, 3)
    return {2: (4,), 3: (2, 3), 4: (2, 2, 2)}[rank]


class Shifted(nn.Module):
    """``f(x) + c + g(x)``: the same shift for every class (constant or input-dependent)."""

    def __init__(self, inner: nn.Module, c: float, input_dependent: bool) -> None:
        super().__init__()
        self.inner, self.c, self.input_dependent = inner, c, input_dependent

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x) + self.c
        if self.input_dependent:
            out = out + (x.flatten(1) ** 2).sum(1, keepdim=True)
        return out


def buffers(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


class FirstOrderTanh(torch.autograd.Function):
    """tanh whose backward has no derivative of its own (like a custom kernel)."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return grad * (1 - out**2)
