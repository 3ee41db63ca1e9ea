"""One GQ call with validated settings: the work behind `gq_loss` and `GQLoss` (package-internal).

`compute_gq` runs the model once (`kernels.GradientPass`), forms Eq. 7 from the per-class norms
(`_sampled`) or the authors' batch ratio, reduces, and guards float16 and FSDP2 training; the
public functions in `loss.py` only build the settings and document the contract.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._autograd import hand_over, norm_rows, second_order_errors
from ._errors import GQLossError
from ._fsdp import full_parameters
from ._gq_settings import GQSettings
from ._sampled import draw_columns, quotient
from ._torch_internals import autocast_disabled
from ._validation import check_class_indices, check_input_range
from .kernels import GradientPass, autograd_enabled, probe_second_order


def compute_gq(
    settings: GQSettings,
    model: Callable[[Tensor], Any],
    inputs: Tensor,
    targets: Tensor,
    generator: torch.Generator | None,
    return_logits: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """What `gq_loss` computes, from validated `settings` (`gq_loss` builds them per call,
    `GQLoss` once); the arguments and the result are `gq_loss`'s."""
    _check_generator(generator, settings.estimator)
    reduction = settings.reduction
    with (
        autograd_enabled() as tracking,
        full_parameters(model) as fsdp,
        contextlib.nullcontext() if settings.autocast else autocast_disabled(),
    ):
        if fsdp is not None and tracking and reduction == "none":
            raise ValueError(
                "reduction='none' cannot be trained under FSDP2 (fully_shard): GQ hands FSDP its "
                "parameter gradient taken within the call, which needs a scalar loss; use "
                "reduction='mean' or 'sum' (or call it under torch.no_grad() for the values)"
            )
        if tracking and reduction == "none" and _float16(model, inputs):
            raise ValueError(
                "reduction='none' cannot be trained with float16 weights: GQ checks its float16 "
                "parameter gradient for overflow within the call, which needs a scalar loss; use "
                "reduction='mean' or 'sum' (or call it under torch.no_grad() for the values)"
            )
        num_sampled = settings.num_sampled
        run = GradientPass(
            model,
            inputs,
            settings.norms,
            create_graph=tracking,
            width=None if num_sampled is None else num_sampled + 1,
        )
        check_input_range(model, run.x, user="GQ")  # the first batch of each model only
        logits = run.logits
        batch, num_classes = logits.shape
        check_class_indices("targets", targets, batch, num_classes, ndim=1, model=model)
        targets = targets.to(logits.device)
        operand, eps = settings.norms.operand, settings.eps
        if settings.formulation == "reference":
            with second_order_errors(logits, run.x):
                value = _reference_ratio(run.op, run.x, targets, run.p, eps, tracking)
                if tracking:
                    probe_second_order(run, value)
        else:
            _check_class_count(num_classes, operand)
            columns, weights = draw_columns(
                logits,
                targets,
                run.temperature,
                operand,
                settings.estimator,
                num_sampled,
                generator,
            )
            value = quotient(run.norms(columns), targets, weights, eps)
        value = _reduce(value, reduction, logits)
        half = _float16(model, run.x)
        if half:
            _check_float16_value(value, logits)
        check = _check_float16_gradient if half else None
        x_grad = run.x if run.input_grad else None
        if fsdp is not None and tracking:
            value = fsdp.hand_over(value, logits, x_grad, check)
        elif half and tracking and isinstance(model, nn.Module):
            wrt = [] if x_grad is None else [x_grad]
            wrt += [q for q in model.parameters() if q.requires_grad]
            value = hand_over(value, logits, wrt, check)
    if not tracking:
        value, logits = value.detach(), logits.detach()
    return (value, logits) if return_logits else value


def _check_generator(generator: Any, estimator: str) -> None:
    """`generator` draws the sampled estimator's classes; the exact estimator draws nothing."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if estimator != "sampled":
        raise ValueError(
            "`generator` draws the classes of estimator='sampled' and would be ignored with "
            f"estimator={estimator!r} (which draws nothing); pass generator=None, or "
            "estimator='sampled' with num_sampled"
        )


def _check_class_count(num_classes: int, operand: str) -> None:
    """Eq. 7 on softmax with two classes: grad S_0 = -grad S_1, so GQ is identically 1."""
    if num_classes == 2 and operand == "softmax":
        raise ValueError(
            "formulation='paper' with operand='softmax' is identically 1 with zero gradient for a "
            "model with N = 2 outputs (S_0 + S_1 = 1, so both input gradients have the same "
            "norm); use operand='logits' (||grad f_y|| / ||grad f_other||). operand='log_softmax' "
            "reduces to S_other / S_y there, a confidence term without input gradients"
        )


def _reference_ratio(
    op: Tensor, x: Tensor, targets: Tensor, p: float, eps: float, create_graph: bool
) -> Tensor:
    """Authors' formulation: ||grad sum_i o_{y_i}|| / ||grad sum_i sum_{j != y_i} o_j|| (batch)."""
    target_sum = op.gather(1, targets[:, None]).sum()
    other_sum = op.sum() - target_sum
    numerator, denominator = (
        norm_rows(
            torch.autograd.grad(
                s, x, retain_graph=True, create_graph=create_graph, materialize_grads=True
            )[0],
            p,
            start_dim=0,
        )
        for s in (target_sum, other_sum)
    )
    return numerator / (denominator + eps)


def _float16(model: Any, x: Tensor) -> bool:
    """Whether GQ runs in float16: a module with float16 trainable parameters, or float16 inputs
    of a plain callable."""
    if isinstance(model, nn.Module):
        return any(q.dtype == torch.float16 for q in model.parameters() if q.requires_grad)
    return x.dtype == torch.float16


_FLOAT16_FIX = (
    "keep the weights in float32 (model.float()), optionally under torch.autocast(..., "
    "dtype=torch.bfloat16), whose range is float32's (float16 autocast overflowed the same way on "
    "the models measured, a Hugging Face ConvNext)"
)


def _check_float16_value(value: Tensor, logits: Tensor) -> None:
    """A float16 model's GQ value must be finite; the error names the pass that overflowed."""
    if bool(torch.isfinite(value).all()):
        return
    where = (
        "its forward pass (the logits are not finite)"
        if not bool(torch.isfinite(logits.detach()).all())
        else "its per-class input-gradient pass"
    )
    raise GQLossError(
        f"gq_loss: GQ's value is not finite for this float16 model: {where} overflowed float16; "
        + _FLOAT16_FIX
    )


def _check_float16_gradient(grads: Sequence[Tensor | None]) -> None:
    """A float16 model's GQ gradient, taken within the call, must be finite before any of it
    reaches `.grad` (`_autograd.hand_over`); the error says which pass overflowed."""
    present = [g for g in grads if g is not None]
    if not present:
        return
    bad = int(torch.stack([(~torch.isfinite(g)).sum() for g in present]).sum())
    if bad:
        total = sum(g.numel() for g in present)
        raise GQLossError(
            "gq_loss: GQ's parameter gradient overflowed float16 in its second backward pass "
            f"(through the model's input gradients): {bad} of {total} entries are not finite, "
            "and nothing was written to .grad. GQ's double backward needs more range than "
            "float16 has; " + _FLOAT16_FIX
        )


def _reduce(value: Tensor, reduction: str, logits: Tensor) -> Tensor:
    if value.ndim == 0 or reduction == "none":
        return value
    if value.numel() == 0:
        # Empty batch: 0, still connected to the parameters so backward() works.
        return logits.sum() * 0.0
    return value.mean() if reduction == "mean" else value.sum()
