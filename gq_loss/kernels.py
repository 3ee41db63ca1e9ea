r"""Per-class input-gradient norms, the cost centre of the Gradient Quotient.

For a classifier $f$, an operand $o$ (softmax, log-softmax or logits, all at temperature $T$),
every sample $i$ and class $j$:

$$ n_{ij} = \Big\lVert \Big[\nabla_{x} \textstyle\sum_{k} o_j(x_k)\Big]_i \Big\rVert_p . $$

Every method differentiates the *batch sum* of class $j$. For models whose samples are
independent (eval-mode BatchNorm, no batch coupling) row $i$ of that gradient is exactly
$\nabla_{x_i} o_j(x_i)$. With train-mode BatchNorm the samples are coupled through the batch
statistics and row $i$ also holds $\nabla_{x_i} o_j(x_k)$ for $k \ne i$; that batch-sum
definition is what this package computes (and what the authors' code differentiated).

Methods (all exact, same result):

| method | how | peak memory when training through the norms |
|---|---|---|
| `loop` | one forward, one `autograd.grad` per class | grows with N: every class's double-backward graph lives until `backward()` |
| `recompute` | pass 1: the norms without a graph; during `backward()` the forward is replayed once and differentiated `chunk_size` classes at a time | forward + `chunk_size` classes |
| `batched` | `autograd.grad(is_grads_batched=True)` (vmap) over `chunk_size` classes at a time | like `loop`; meant for accelerators |

`method="auto"` picks `recompute` when `chunk_size` is given and `loop` otherwise; on the 2-core
CPU `loop` was the fastest exact method (`docs/benchmarks.md`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from ._validation import (
    check_choice,
    check_class_indices,
    check_inputs,
    check_logits,
    check_norm_order,
    check_optional_int,
    check_positive,
)

__all__ = ["METHODS", "OPERANDS", "class_gradient_norms"]

Operand = Literal["softmax", "log_softmax", "logits"]
Method = Literal["auto", "loop", "recompute", "batched"]
OPERANDS: tuple[str, ...] = ("softmax", "log_softmax", "logits")
METHODS: tuple[str, ...] = ("auto", "loop", "recompute", "batched")


def class_gradient_norms(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    *,
    operand: Operand = "softmax",
    temperature: float = 1.0,
    p: float = 1,
    classes: Tensor | None = None,
    create_graph: bool = False,
    method: Method = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Input-gradient norm of every class's operand, per sample.

    $$ n_{ij} = \lVert \nabla_{x_i} o_j(x_i) \rVert_p, \qquad
       o = \mathrm{softmax}(f(x)/T),\ \log\mathrm{softmax}(f(x)/T)\ \text{or}\ f(x)/T $$

    Args:
        model: Maps ``inputs`` ``(B, *)`` to logits ``(B, N)``. An ``nn.Module`` is needed for
            ``method="recompute"``. Its train/eval mode is used as it is.
        inputs: Batch ``(B, *)``, floating point. Not modified; its ``.grad`` is not touched.
        operand: ``"softmax"``, ``"log_softmax"`` or ``"logits"``, all at ``temperature``.
        temperature: $T > 0$.
        p: Norm order over all input elements of a sample: ``1``, ``2`` or ``math.inf``.
        classes: Optional int64 ``(B, K)``: compute only column ``classes[i, k]`` for sample ``i``.
        create_graph: Keep the graph so the norms can be differentiated w.r.t. the parameters
            (double backprop). Needed to train through the norms.
        method: ``"auto"``, ``"loop"``, ``"recompute"`` or ``"batched"`` (module docstring).
        chunk_size: Classes differentiated at once by ``recompute``/``batched``; the memory knob.

    Returns:
        ``(B, N)``, or ``(B, K)`` when ``classes`` is given; dtype ``float32`` or wider.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> norms = class_gradient_norms(model, torch.randn(4, 3, 2, 2), operand="logits")
        >>> norms.shape
        torch.Size([4, 3])
        >>> torch.allclose(norms[0], model[1].weight.abs().sum(dim=1))  # linear: weight rows
        True
    """
    check_choice("operand", operand, OPERANDS)
    temperature = check_positive("temperature", temperature)
    p = check_norm_order(p)
    resolved = resolve_method(method, chunk_size, model)
    x, logits, rng_state = forward(model, inputs, resolved)
    if classes is not None:
        check_class_indices("classes", classes, logits.shape[0], logits.shape[1], ndim=2)
    with torch.enable_grad():
        op = apply_operand(logits, operand, temperature)
        job = _Job(
            model, operand, temperature, p, classes, chunk_size, rng_state, inputs.requires_grad
        )
        return norms_from_forward(x, op, job, resolved, create_graph)


def resolve_method(method: Any, chunk_size: Any, model: Any) -> str:
    """Validates ``method``/``chunk_size`` and returns the concrete method ``auto`` stands for."""
    check_choice("method", method, METHODS)
    check_optional_int("chunk_size", chunk_size)
    if method == "auto":
        method = "recompute" if chunk_size is not None else "loop"
    if method == "loop" and chunk_size is not None:
        raise ValueError(
            "`chunk_size` has no effect with method='loop' (every class's graph is kept); "
            "use method='recompute' to bound memory"
        )
    if method == "recompute" and not isinstance(model, nn.Module):
        raise TypeError(f"method='recompute' needs an nn.Module model, got {type(model).__name__}")
    return str(method)


def forward(
    model: Callable[[Tensor], Tensor], inputs: Tensor, method: str
) -> tuple[Tensor, Tensor, Any]:
    """Runs the model once on a gradient-tracking view of ``inputs``.

    Returns ``(x, logits, rng_state)``: ``x`` is ``inputs`` itself when it already requires grad
    (so the caller's graph continues) and a detached leaf otherwise; ``rng_state`` (kept only
    for ``method="recompute"``) lets the replay draw the same Dropout masks.
    """
    check_inputs(inputs)
    if not callable(model):
        raise TypeError(f"`model` must be callable (an nn.Module), got {type(model).__name__}")
    x = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
    rng_state = _get_rng_state(x.device) if method == "recompute" else None
    with torch.enable_grad():
        logits = model(x)
    check_logits(logits, x.shape[0])
    return x, logits, rng_state


def apply_operand(logits: Tensor, operand: str, temperature: float) -> Tensor:
    """``softmax``/``log_softmax``/identity of ``logits / T`` in at least float32 ``(B, N)``."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if operand == "softmax":
        return z.softmax(dim=1)
    if operand == "log_softmax":
        return z.log_softmax(dim=1)
    return z


@dataclass
class _Job:
    """What ``recompute`` needs to replay the forward pass during backward."""

    model: Any
    operand: str
    temperature: float
    p: float
    columns: Tensor | None
    chunk_size: int | None
    rng_state: Any
    input_grad: bool


def norms_from_forward(x: Tensor, op: Tensor, job: _Job, method: str, create_graph: bool) -> Tensor:
    """Norms ``(B, K)`` of the operand columns ``job.columns`` (all N when None) of ``op``."""
    if method == "batched":
        return _norms_batched(op, x, job.columns, job.p, create_graph, job.chunk_size)
    if method == "loop" or not create_graph:
        return _norms_loop(op, x, job.columns, job.p, create_graph)
    norms = _norms_loop(op, x, job.columns, job.p, create_graph=False)
    named = [(n, q) for n, q in _unwrap(job.model).named_parameters() if q.requires_grad]
    out: Tensor = _RecomputeNorms.apply(
        norms, job, [n for n, _ in named], x, *(q for _, q in named)
    )
    return out


def _norm_rows(grad: Tensor, p: float) -> Tensor:
    return torch.linalg.vector_norm(grad.flatten(1), ord=p, dim=1)


def _selected(op: Tensor, columns: Tensor | None) -> Tensor:
    return op if columns is None else op.gather(1, columns)


def _input_grad(out: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    (grad,) = torch.autograd.grad(
        out,
        x,
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    return grad


def _norms_loop(
    op: Tensor, x: Tensor, columns: Tensor | None, p: float, create_graph: bool
) -> Tensor:
    sel = _selected(op, columns)
    rows = [
        _norm_rows(_input_grad(sel[:, k].sum(), x, create_graph), p) for k in range(sel.shape[1])
    ]
    return torch.stack(rows, dim=1) if rows else sel.new_zeros(sel.shape)


def _norms_batched(
    op: Tensor, x: Tensor, columns: Tensor | None, p: float, create_graph: bool, chunk: int | None
) -> Tensor:
    batch, num_classes = op.shape
    if columns is None:
        columns = torch.arange(num_classes, device=op.device).expand(batch, num_classes)
    width = columns.shape[1]
    parts = []
    for start in range(0, width, chunk or max(width, 1)):
        cols = columns[:, start : start + (chunk or width)]
        # One-hot cotangents (k, B, N): vmap runs the k backward passes as one batched pass.
        basis = op.new_zeros(cols.shape[1], batch, num_classes)
        basis.scatter_(2, cols.T.unsqueeze(-1), 1.0)
        (grad,) = torch.autograd.grad(
            op,
            x,
            basis,
            retain_graph=True,
            create_graph=create_graph,
            is_grads_batched=True,
            allow_unused=True,
        )
        if grad is None:  # the operand does not depend on the input
            grad = x.new_zeros(cols.shape[1], *x.shape)
        parts.append(torch.linalg.vector_norm(grad.flatten(2), ord=p, dim=2).T)
    return torch.cat(parts, dim=1) if parts else op.new_zeros(batch, 0)


def _unwrap(model: Any) -> Any:
    # Recomputing through a DistributedDataParallel wrapper would re-enter its reducer.
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _get_rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextmanager
def _replay(
    model: nn.Module, rng_state: tuple[Tensor, Tensor | None], device: torch.device
) -> Iterator[None]:
    """Same RNG draws as the original forward, against scratch copies of the buffers.

    The replayed forward must not update BatchNorm running statistics a second time, nor bump
    the version of buffers the original graph saved, so it runs on clones of every buffer.
    """
    originals = [
        (module, name, buf)
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None
    ]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(rng_state[0])
        if rng_state[1] is not None:
            torch.cuda.set_rng_state(rng_state[1], device)
        try:
            for module, name, buf in originals:
                module._buffers[name] = buf.clone()
            yield
        finally:
            for module, name, buf in originals:
                module._buffers[name] = buf


class _RecomputeNorms(torch.autograd.Function):
    """Identity on the norms whose backward recomputes the graph ``chunk_size`` classes at a time.

    Forward returns the graph-free norms of pass 1. Backward receives ``w = dL/dn`` and returns
    ``d/dtheta sum_ik w_ik n_ik`` for the parameters (inputs of this Function), so the GQ gradient
    reaches every parameter through the one ``backward()`` of the training step, together with the
    cross-entropy gradient (one gradient hook per parameter, which keeps DDP ranks in step).
    """

    @staticmethod
    def forward(
        ctx: Any, norms: Tensor, job: _Job, names: list[str], x: Tensor, *params: Tensor
    ) -> Tensor:
        ctx.job = job
        ctx.params = params
        ctx.names = names
        ctx.versions = [q._version for q in params]
        ctx.save_for_backward(x)
        return norms.clone()

    @staticmethod
    def backward(ctx: Any, grad_norms: Tensor) -> tuple[Tensor | None, ...]:
        job: _Job = ctx.job
        if torch.is_grad_enabled():
            # The replay's gradients are not differentiable again: refuse rather than drop terms.
            raise RuntimeError(
                "gq_loss: method='recompute' supports first-order gradients only, got a backward "
                "with create_graph=True; use method='loop' for higher-order gradients"
            )
        grad_norms = grad_norms.detach()
        (x,) = ctx.saved_tensors
        params: Sequence[Tensor] = ctx.params
        if any(q._version != v for q, v in zip(params, ctx.versions)):
            raise RuntimeError(
                "gq_loss: a parameter was modified in place between the loss and its backward(); "
                "method='recompute' replays the forward pass and needs the original parameters"
            )
        model = _unwrap(job.model)
        total_grads: list[Tensor | None] = [None] * (int(job.input_grad) + len(params))
        with torch.enable_grad(), _replay(model, job.rng_state, x.device):
            xr = x.detach().requires_grad_(True)
            # Replay with the very tensors this Function received (also under functional_call).
            logits = torch.func.functional_call(
                model, dict(zip(ctx.names, params)), (xr,), strict=False
            )
            sel = _selected(apply_operand(logits, job.operand, job.temperature), job.columns)
            targets = ([xr] if job.input_grad else []) + list(params)
            width = sel.shape[1]
            step = job.chunk_size or max(width, 1)
            for start in range(0, width, step):
                # Only this chunk's double-backward graph is alive; the forward graph is reused.
                terms = [
                    grad_norms[:, k] @ _norm_rows(_input_grad(sel[:, k].sum(), xr, True), job.p)
                    for k in range(start, min(start + step, width))
                ]
                grads = torch.autograd.grad(
                    torch.stack(terms).sum(), targets, retain_graph=True, allow_unused=True
                )
                total_grads = [
                    g if t is None else (t if g is None else t + g)
                    for t, g in zip(total_grads, grads)
                ]
        grad_x = total_grads.pop(0) if job.input_grad else None
        return (None, None, None, grad_x, *total_grads)
