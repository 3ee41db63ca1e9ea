"""The backends of `class_gradient_norms`: how each method runs the forward pass and turns it
into per-class input-gradient norms (package-internal; `gq_loss.kernels` documents the methods).

`BACKENDS` is the table the code dispatches on; `GRADIENT_METHODS` (`"auto"` and its keys) is
derived from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ._autograd import graph_leaves, input_grad, norm_rows, selected, torchscript_nodes
from ._errors import GQLossError
from ._recompute import PreForwardBuffers, RecomputeNorms, Replay, get_rng_state
from ._runtime import call_model, check_logits, unwrap_ddp
from ._torch_internals import (
    autocast_state,
    function_of,
    is_reentrant_checkpoint,
    torch_says,
    version,
    write_back,
)

if TYPE_CHECKING:
    from .kernels import GradientPass


# --------------------------------------------------------------------------- forward passes


def plain_forward(run: GradientPass) -> tuple[Tensor, Tensor]:
    before = None
    if run.method == "recompute":  # lets the replay draw the same Dropout masks, under autocast
        if run.create_graph:  # and start from the same buffers (only a training call replays)
            before = PreForwardBuffers(unwrap_ddp(run.model))
        run.state = get_rng_state(run.x.device), autocast_state(run.x.device), before
    logits = call_model(run.model, run.x, run.output)
    check_logits(logits, run.x.shape[0])
    return logits, run.operand_of(logits)


def _func_forward(run: GradientPass) -> tuple[Tensor, Tensor]:
    """The one forward pass inside `torch.func.vjp`; keeps the pullback in `run.state`.

    Registered buffers are swapped for copies made inside the transformed function (a mutation of
    a captured tensor is an error under `torch.func`); the copies that the forward changed are
    written back, so the buffers move once, as with `loop` (`_torch_internals.write_back`).
    """
    model = run.model
    named = (
        [(n, b) for n, b in model.named_buffers() if b is not None]
        if isinstance(model, nn.Module)
        else []
    )

    versions: dict[str, int] = {}  # of the scratch copies as made (aux outputs are tensors)

    def forward(x: Tensor) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        scratch = {name: buf.clone() for name, buf in named}
        versions.update((name, version(buf)) for name, buf in scratch.items())
        if scratch and isinstance(model, nn.Module):
            logits = call_model(
                lambda t: torch.func.functional_call(model, scratch, (t,), strict=False),
                x,
                run.output,
                module=model,
            )
        else:
            logits = call_model(model, x, run.output)
        check_logits(logits, x.shape[0])
        if names := torchscript_nodes(logits):  # before the buffers are written back
            raise TorchScriptInside(names)
        return run.operand_of(logits), (logits, scratch)

    with _func_errors("the forward pass"):
        op, pullback, (logits, scratch) = torch.func.vjp(  # type: ignore[misc]
            forward, run.x, has_aux=True
        )
    write_back(named, scratch, versions)
    run.state = pullback
    return logits, op


class TorchScriptInside(Exception):
    """`jacrev`'s forward found TorchScript nodes (`names`) in its graph."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.names = names


# --------------------------------------------------------------------------- backends


def _all_columns(op: Tensor, columns: Tensor | None) -> Tensor:
    batch, num_classes = op.shape
    if columns is None:
        return torch.arange(num_classes, device=op.device).expand(batch, num_classes)
    return columns


def _one_hot_cotangents(op: Tensor, cols: Tensor) -> Tensor:
    """`(k, B, N)`: cotangent `c` selects column `cols[i, c]` of row `i`."""
    basis = op.new_zeros(cols.shape[1], *op.shape)
    return basis.scatter_(2, cols.T.unsqueeze(-1), 1.0)


def _loop(run: GradientPass, columns: Tensor | None, create_graph: bool) -> Tensor:
    sel = selected(run.op, columns)
    rows = [
        norm_rows(input_grad(sel[:, k].sum(), run.x, create_graph), run.p)
        for k in range(sel.shape[1])
    ]
    return torch.stack(rows, dim=1) if rows else sel.new_zeros(sel.shape)


def _norms_loop(run: GradientPass, columns: Tensor | None) -> Tensor:
    return _loop(run, columns, run.create_graph)


def _norms_recompute(run: GradientPass, columns: Tensor | None) -> Tensor:
    norms = _loop(run, columns, create_graph=False)
    if not run.create_graph:
        return norms
    rng_state, autocast, before = run.state
    job = Replay(
        run.model, run.operand, run.temperature, run.p, columns, run.chunk_size, rng_state,
        run.input_grad, autocast, run.output, before,
    )  # fmt: skip
    # Only the parameters the forward pass used: the norms depend on no other, and handing an
    # unused one to the Function would give it a gradient event that DistributedDataParallel
    # (find_unused_parameters=True) already counted as unused ("marked ready twice").
    used = graph_leaves(run.logits)
    named = [
        (n, q)
        for n, q in unwrap_ddp(run.model).named_parameters()
        if q.requires_grad and id(q) in used
    ]
    out: Tensor = RecomputeNorms.apply(
        norms, job, [n for n, _ in named], run.x, *(q for _, q in named)
    )
    return out


def _norms_batched(run: GradientPass, columns: Tensor | None) -> Tensor:
    """The k backward passes as one batched pass, by either of PyTorch's two vmaps.

    In torch 2.13 each breaks some double backward: the older one of `is_grads_batched`
    GroupNorm's (a size mismatch, any dtype); `torch.func.vmap` BatchNorm's and LayerNorm's under
    CPU bf16 autocast (mixed dtypes). The one that works on the common case runs first (the older
    under autocast, `torch.func`'s otherwise) and the other one when it fails; both compute the
    same gradients. When both fail differently, the error names `loop`; the same error from both
    is the model's own and is raised as it is.
    """
    cols = _all_columns(run.op, columns)
    if cols.shape[1] == 0:
        return run.op.new_zeros(run.op.shape[0], 0)
    basis = _one_hot_cotangents(run.op, cols)
    ways = [_batched_by_func, _batched_by_autograd]
    if torch.is_autocast_enabled(run.x.device.type):
        ways.reverse()
    try:
        return ways[0](run, basis)
    except RuntimeError as err:
        try:
            return ways[1](run, basis)
        except RuntimeError as other:
            if str(other) == str(err):  # the model's own error, not a vmap's
                raise err from None
        raise GQLossError(
            f"gq_loss: method='batched' could not batch the backward passes of this model ({err}); "
            "use method='loop' (or 'recompute')"
        ) from err


def _batched_by_autograd(run: GradientPass, basis: Tensor) -> Tensor:
    parts = []
    step = run.chunk_size or basis.shape[0]
    for start in range(0, basis.shape[0], step):
        (grad,) = torch.autograd.grad(
            run.op,
            run.x,
            basis[start : start + step],
            retain_graph=True,
            create_graph=run.create_graph,
            is_grads_batched=True,
            allow_unused=True,
            materialize_grads=True,
        )
        parts.append(norm_rows(grad, run.p, start_dim=2).T)
    return torch.cat(parts, dim=1)


def _batched_by_func(run: GradientPass, basis: Tensor) -> Tensor:
    def row_norms(cotangent: Tensor) -> Tensor:
        (grad,) = torch.autograd.grad(
            run.op,
            run.x,
            cotangent,
            retain_graph=True,
            create_graph=run.create_graph,
            allow_unused=True,
            materialize_grads=True,
        )
        return norm_rows(grad, run.p)

    norms: Tensor = torch.func.vmap(row_norms, chunk_size=run.chunk_size)(basis).T
    return norms


def _norms_jacrev(run: GradientPass, columns: Tensor | None) -> Tensor:
    cols = _all_columns(run.op, columns)
    if cols.shape[1] == 0:
        return run.op.new_zeros(run.op.shape[0], 0)
    basis = _one_hot_cotangents(run.op, cols)
    pullback = run.state

    def row_norms(cotangent: Tensor) -> Tensor:
        (grad,) = pullback(cotangent)
        return norm_rows(grad, run.p)

    # The pullback runs under the autocast state of the forward pass (the caller's), as `loop`'s
    # backward passes do. Without create_graph the outer autograd records nothing (the
    # pullback's own level still differentiates: torch.func ignores an outer no_grad).
    device = run.x.device.type
    mixed = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    outer = contextlib.nullcontext() if run.create_graph else torch.no_grad()
    with _func_errors("the per-class backward passes", any_error=True), outer:
        try:
            norms = torch.func.vmap(row_norms, chunk_size=run.chunk_size)(basis).T
        except RuntimeError as err:
            # Under autocast, torch 2.13's batching rule of the BatchNorm backward multiplies
            # the half-precision gradient by the float32 weight and hands the float32 product
            # to a kernel that wants the input's dtype. The same pullback, one class at a time,
            # runs the unbatched kernel, which takes mixed dtypes.
            if not (mixed and torch_says(err, "mixed dtypes")):
                raise
            norms = torch.stack([row_norms(c) for c in basis], dim=1)
    return norms if run.create_graph else norms.detach()


@contextmanager
def _func_errors(stage: str, any_error: bool = False) -> Iterator[None]:
    """Re-raises `torch.func`'s refusals with their cause and what to do instead.

    In the forward pass only errors that name a transform are translated (a model's own error
    stays as it is); in the vmapped backward every error is, since autograd ran that forward.
    """
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if not any_error and not torch_says(text, "torch.func transform"):
            raise
        prefix = f"gq_loss: method='jacrev' could not run {stage} of this model under torch.func"
        function = function_of(err) if torch_says(text, "no setup_context") else None
        if is_reentrant_checkpoint(function):
            raise GQLossError(
                f"{prefix}: the model uses torch.utils.checkpoint with use_reentrant=True "
                f"({text}); use use_reentrant=False with method='loop', 'recompute' or 'batched' "
                "(torch.func takes no checkpointing)"
            ) from err
        if torch_says(text, "no setup_context"):
            which = "in this model" if function is None else function.__name__
            raise GQLossError(
                f"{prefix}: the custom autograd.Function {which} has no setup_context "
                f"staticmethod, which torch.func needs ({text}); use method='loop', 'recompute' "
                "or 'batched', which run it as it is, or give it a setup_context (PyTorch's "
                "'Extending torch.func with autograd.Function')"
            ) from err
        if torch_says(text, "saved tensor hooks"):
            raise GQLossError(
                f"{prefix}: the model uses torch.utils.checkpoint with use_reentrant=False, which "
                "runs on saved tensor hooks that torch.func does not take (Hugging Face's "
                f"activation_checkpointing_enable() is such checkpointing) ({text}); use "
                "method='loop', 'recompute' or 'batched', which run checkpointed models"
            ) from err
        raise GQLossError(
            f"{prefix} ({text}); use method='loop' (or 'recompute'), which run any model "
            "autograd can differentiate"
        ) from err


@dataclass(frozen=True)
class _Backend:
    """How one method runs the forward pass and turns it into norms `(B, K)`."""

    forward: Callable[[GradientPass], tuple[Tensor, Tensor]]
    norms: Callable[[GradientPass, Tensor | None], Tensor]


BACKENDS: dict[str, _Backend] = {
    "loop": _Backend(plain_forward, _norms_loop),
    "recompute": _Backend(plain_forward, _norms_recompute),
    "batched": _Backend(plain_forward, _norms_batched),
    "jacrev": _Backend(_func_forward, _norms_jacrev),
}
#: The values of `method`: `"auto"` and every backend.
GRADIENT_METHODS: tuple[str, ...] = ("auto", *BACKENDS)
