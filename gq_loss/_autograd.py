"""Small autograd helpers shared by the kernels' backends (package-internal)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def operand_of(logits: Tensor, operand: str, temperature: float) -> Tensor:
    """`softmax`/`log_softmax`/identity of `logits / T` in at least float32 `(B, N)`."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if operand == "softmax":
        return z.softmax(dim=1)
    if operand == "log_softmax":
        return z.log_softmax(dim=1)
    return z


def norm_rows(grad: Tensor, p: float) -> Tensor:
    return torch.linalg.vector_norm(grad.flatten(1), ord=p, dim=1)


def selected(op: Tensor, columns: Tensor | None) -> Tensor:
    return op if columns is None else op.gather(1, columns)


def input_grad(out: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    (grad,) = torch.autograd.grad(
        out,
        x,
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    return grad


def unwrap_ddp(model: Any) -> Any:
    # Recomputing through a DistributedDataParallel wrapper would re-enter its reducer.
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
