"""The `recompute` backend's replay: the norms' gradient recomputed during `backward()`.

Package-internal; `gq_loss.kernels` builds a `Replay` job and applies `RecomputeNorms`. Like
`torch.utils.checkpoint`, the replay re-enters the RNG state and the autocast state of the
original forward pass (so a bf16 forward is replayed in bf16); the model's forward hooks run
again during the replay.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._autograd import (
    check_second_order,
    eager_under_compile,
    input_grad,
    norm_rows,
    operand_of,
    second_order_errors,
    selected,
)
from ._errors import GQLossError
from ._runtime import OutputSpec, select_output, unwrap_ddp
from ._torch_internals import (
    AutocastState,
    BufferSwap,
    autocast_as,
    differentiable_forward,
    version,
)


@dataclass(frozen=True)
class Replay:
    """What `recompute` needs to replay the forward pass during backward (not the graph)."""

    model: Any
    operand: str
    temperature: float
    p: float
    columns: Tensor | None
    chunk_size: int | None
    rng_state: Any
    input_grad: bool
    autocast: tuple[AutocastState, bool]
    output: OutputSpec | None
    before: PreForwardBuffers


class PreForwardBuffers:
    """Every buffer of the model as it was before the original forward pass (a copy of each).

    Built just before that forward. The replay starts from these copies, whatever the buffers'
    version counters say: a forward can change a buffer without bumping its version (an update
    through `.data`, the EMA idiom; fused ops such as `torch.ao`'s fake-quant observers), and a
    buffer it did not change equals its copy anyway.
    """

    def __init__(self, model: nn.Module) -> None:
        swap = BufferSwap(model)
        self.copies: dict[tuple[nn.Module, str], Tensor] = {
            key: buf.clone() for key, buf in zip(swap.keys(), swap.originals(), strict=True)
        }


def get_rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextmanager
def replay(
    model: nn.Module,
    rng_state: tuple[Tensor, Tensor | None],
    device: torch.device,
    before: PreForwardBuffers,
) -> Iterator[None]:
    """Same RNG draws as the original forward, from the same buffers, on scratch copies.

    The replay must compute the function the original forward computed, so every buffer starts
    from its state before that forward (`before`). It must not update the
    model's buffers a second time (BatchNorm statistics, spectral_norm's vectors), nor bump the
    version of buffers the original graph saved, so it runs on clones of every buffer.
    """
    swap = BufferSwap(model)
    scratch = [
        before.copies.get(key, buf).clone()
        for key, buf in zip(swap.keys(), swap.originals(), strict=True)
    ]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(rng_state[0])
        if rng_state[1] is not None:
            torch.cuda.set_rng_state(rng_state[1], device)
        with swap.swapped(scratch):
            yield


class RecomputeNorms(torch.autograd.Function):
    """Identity on the norms whose backward recomputes the graph `chunk_size` classes at a time.

    Forward returns the graph-free norms of pass 1. Backward receives `w = dL/dn` and returns
    `d/dtheta sum_ik w_ik n_ik` for the parameters (inputs of this Function), so the GQ gradient
    reaches every parameter through the one `backward()` of the training step, together with the
    cross-entropy gradient (one gradient hook per parameter, which keeps DDP ranks in step).
    """

    @staticmethod
    def forward(
        ctx: Any, norms: Tensor, job: Replay, names: list[str], x: Tensor, *params: Tensor
    ) -> Tensor:
        ctx.job = job
        ctx.params = params
        ctx.names = names
        ctx.versions = [version(q) for q in params]
        ctx.save_for_backward(x)
        return norms.clone()

    @staticmethod
    @eager_under_compile  # a backward() inside a compiled step runs this under dynamo's frame
    def backward(ctx: Any, grad_norms: Tensor) -> tuple[Tensor | None, ...]:
        job: Replay = ctx.job
        if torch.is_grad_enabled():
            # The replay's gradients are not differentiable again: refuse rather than drop terms.
            raise GQLossError(
                "gq_loss: method='recompute' supports first-order gradients only, got a backward "
                "with create_graph=True; use method='loop' for higher-order gradients"
            )
        grad_norms = grad_norms.detach()
        (x,) = ctx.saved_tensors
        params: Sequence[Tensor] = ctx.params
        if any(version(q) != v for q, v in zip(params, ctx.versions, strict=True)):
            raise GQLossError(
                "gq_loss: a parameter was modified in place between the loss and its backward(); "
                "method='recompute' replays the forward pass and needs the original parameters"
            )
        model = unwrap_ddp(job.model)
        total_grads: list[Tensor | None] = [None] * (int(job.input_grad) + len(params))
        with torch.enable_grad(), replay(model, job.rng_state, x.device, job.before):
            xr = x.detach().requires_grad_(True)
            with (
                autocast_as(job.autocast),
                differentiable_forward(model, xr),
                second_order_errors(),
            ):
                # Replay with the very tensors this Function received (also under functional_call).
                logits = torch.func.functional_call(
                    model, dict(zip(ctx.names, params, strict=True)), (xr,), strict=False
                )
                logits = select_output(logits, job.output)
                sel = selected(operand_of(logits, job.operand, job.temperature), job.columns)
            with second_order_errors(logits, xr):
                targets = ([xr] if job.input_grad else []) + list(params)
                width = sel.shape[1]
                step = job.chunk_size or max(width, 1)
                for start in range(0, width, step):
                    # Only this chunk's double-backward graph is alive; the forward graph is reused.
                    terms = [
                        grad_norms[:, k] @ norm_rows(input_grad(sel[:, k].sum(), xr, True), job.p)
                        for k in range(start, min(start + step, width))
                    ]
                    if start == 0:  # a missing second derivative would be dropped, not raised
                        check_second_order(job.model, logits, terms[0], xr, probe=False)
                    grads = torch.autograd.grad(
                        torch.stack(terms).sum(), targets, retain_graph=True, allow_unused=True
                    )
                    total_grads = [
                        g if t is None else (t if g is None else t + g)
                        for t, g in zip(total_grads, grads, strict=True)
                    ]
        grad_x = total_grads.pop(0) if job.input_grad else None
        return (None, None, None, grad_x, *total_grads)
