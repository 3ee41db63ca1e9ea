r"""The Gradient Quotient loss (Jevnisek & Avidan, *Learning ODIN*, BMVC 2022, Eq. 7).

Per sample $i$ with label $y_i$ and $S_j = \mathrm{softmax}(f(x)/T)_j$:

$$ \mathrm{GQ}_i = \frac{\lVert \nabla_x S_{y_i}(x_i) \rVert_1}
                       {\sum_{j \ne y_i} \lVert \nabla_x S_j(x_i) \rVert_1 + \epsilon} $$

`formulation="reference"` computes what the authors' public code computes instead: one ratio per
batch of the L1 norms of the gradients of the *summed* target and non-target logits (two backward
passes). On softmax that ratio is identically 1 ($\sum_{j \ne y} S_j = 1 - S_y$), so it is
refused there. With $N = 2$ classes Eq. 7 on softmax is identically 1 as well
($\nabla S_0 = -\nabla S_1$), so it is refused there too. `docs/math.md` explains both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from ._autograd import (
    autocast_disabled,
    eager_under_compile,
    hand_over,
    norm_rows,
    second_order_errors,
)
from ._fsdp import full_parameters
from ._runtime import OutputSpec, check_output_spec, float64
from ._validation import (
    check_choice,
    check_class_indices,
    check_input_range,
    check_nonnegative,
    check_norm_order,
    check_optional_int,
    check_positive,
)
from .kernels import (
    OPERANDS,
    GradientPass,
    Method,
    Operand,
    autograd_enabled,
    probe_second_order,
    resolve_method,
)

__all__ = ["ESTIMATORS", "FORMULATIONS", "REDUCTIONS", "GQLoss", "gq_loss"]

Formulation = Literal["paper", "reference"]
Reduction = Literal["none", "mean", "sum"]
Estimator = Literal["exact", "sampled"]
FORMULATIONS: tuple[str, ...] = ("paper", "reference")
REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")
ESTIMATORS: tuple[str, ...] = ("exact", "sampled")


@overload
def gq_loss(
    model: Callable[[Tensor], Any],
    inputs: Tensor,
    targets: Tensor,
    *,
    temperature: float = ...,
    p: float = ...,
    operand: Operand | None = ...,
    formulation: Formulation = ...,
    reduction: Reduction = ...,
    estimator: Estimator = ...,
    num_sampled: int | None = ...,
    method: Method = ...,
    chunk_size: int | None = ...,
    eps: float = ...,
    generator: torch.Generator | None = ...,
    return_logits: Literal[False] = ...,
    output: OutputSpec | None = ...,
    autocast: bool = ...,
) -> Tensor: ...


@overload
def gq_loss(
    model: Callable[[Tensor], Any],
    inputs: Tensor,
    targets: Tensor,
    *,
    temperature: float = ...,
    p: float = ...,
    operand: Operand | None = ...,
    formulation: Formulation = ...,
    reduction: Reduction = ...,
    estimator: Estimator = ...,
    num_sampled: int | None = ...,
    method: Method = ...,
    chunk_size: int | None = ...,
    eps: float = ...,
    generator: torch.Generator | None = ...,
    return_logits: Literal[True],
    output: OutputSpec | None = ...,
    autocast: bool = ...,
) -> tuple[Tensor, Tensor]: ...


@overload
def gq_loss(
    model: Callable[[Tensor], Any],
    inputs: Tensor,
    targets: Tensor,
    *,
    temperature: float = ...,
    p: float = ...,
    operand: Operand | None = ...,
    formulation: Formulation = ...,
    reduction: Reduction = ...,
    estimator: Estimator = ...,
    num_sampled: int | None = ...,
    method: Method = ...,
    chunk_size: int | None = ...,
    eps: float = ...,
    generator: torch.Generator | None = ...,
    return_logits: bool,
    output: OutputSpec | None = ...,
    autocast: bool = ...,
) -> Tensor | tuple[Tensor, Tensor]: ...


@eager_under_compile
def gq_loss(
    model: Callable[[Tensor], Any],
    inputs: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    p: float = 1,
    operand: Operand | None = None,
    formulation: Formulation = "paper",
    reduction: Reduction = "mean",
    estimator: Estimator = "exact",
    num_sampled: int | None = None,
    method: Method = "auto",
    chunk_size: int | None = None,
    eps: float = 1e-12,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
    output: OutputSpec | None = None,
    autocast: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Gradient Quotient of a batch, differentiable w.r.t. the model's parameters.

    Choosing λ in `cross_entropy + λ · gq_loss(...)`: measured on CIFAR-10 (small CNN,
    fine-tuning from the same CE weights, seed-paired; `docs/reproduction.md`), the paper's
    λ = 1e-6 (and anything up to 1e-3) changed nothing in an earlier tiny-CNN study (its JSON is
    not committed, so this is not reproducible from the repository), λ = 1 raised ODIN's AUROC
    by about half a point after 20 steps at unchanged accuracy and not measurably after 80 or
    320 steps, λ = 10 cost about 13 points of accuracy, and λ < 0 made detection worse. Plain CE
    with ODIN was the better buy there (CE trained for the same compute gave more accuracy and
    an ODIN FPR95 6.5 ± 3.7 points lower); if you train with GQ, use λ = 1 with
    `estimator="sampled", num_sampled=1`, and expect little. Never train on GQ alone: without
    cross-entropy, one epoch (Eq. 7, sampled with K = 1) took the accuracy from 72 % to 5 %
    (Eq. 7 is smallest when the true class gets little probability). Training from scratch with
    λ = 1 (5 epochs, five seeds) cost 2.5 points of accuracy for no detection gain (ODIN AUROC
    +0.2 ± 1.8 points, not distinguishable from zero). An exact step costs 9-25 cross-entropy
    steps at N = 10 classes on the CPU models measured, whatever λ is (`docs/benchmarks.md`,
    "Cost in CE steps"); `estimator="sampled", num_sampled=1` costs about a quarter of that (6.3
    against 24.5 CE steps, measured side by side), with an effect on ODIN's AUROC the study
    could not tell apart from exact GQ's (three seeds).

    Under `torch.no_grad()` or `torch.inference_mode()` (validation loops) the *value* is
    computed: gradients are switched on locally for the input gradient, no double-backward graph
    is built, and the result (and the logits with `return_logits=True`) comes back detached; no
    parameter `.grad` is written.

    Any differentiable model works, attention models and `torch.compile`d modules included:
    GQ's own forward passes run PyTorch's attention on its math backend and compiled code
    eagerly, since the fused attention kernels and compiled graphs have no second derivative
    (on CUDA this makes GQ's passes slower and larger than a flash-attention forward; the
    caller's forward passes before and after the call are not affected, but the switch is
    process-wide while the call runs: other threads' attention runs on the math backend too,
    docs/models.md "Known limits"). `docs/math.md` has the details. In a
    `torch.compile`d training step, `gq_loss` (and `GQLoss`) is a graph break that runs eagerly;
    under `fullgraph=True` the error says what to do (`docs/examples.md`).

    Args:
        model: Maps `inputs` `(B, *)` to logits `(B, N)` (or to an output holding them, see
            `output`); used in its current mode. Under DistributedDataParallel pass the wrapped
            model; under FSDP2 (`fully_shard`) the sharded one, with `reduction` `"mean"` or
            `"sum"` (`docs/models.md`).
        inputs: Batch `(B, *)`, floating point; moved to the device and cast to the dtype of the
            model's first floating parameter when those differ (plain callables: unchanged).
            Not modified.
        targets: True labels `(B,)`, int64 in `[0, N)`; moved to the logits' device.
        temperature: $T > 0$ of the softmax scores.
        p: Norm order of the input gradients: `1` (paper), `2` or `math.inf`.
        operand: `"softmax"` (default for `paper`, Eq. 7), `"log_softmax"` or `"logits"`
            (default for `reference`). With `N = 2` the paper formulation refuses `"softmax"`
            (identically 1); use `"logits"` there.
        formulation: `"paper"` (Eq. 7 per sample) or `"reference"` (authors' code: one
            batch-level ratio, so it takes only `reduction="mean"`).
        reduction: `"none"` -> `(B,)`; `"mean"` | `"sum"` -> scalar `()`.
        estimator: `"exact"` (all N classes) or `"sampled"`, for large N: the target and
            `num_sampled` other classes, weighted so that the denominator is unbiased. On
            softmax the `num_sampled // 2` most probable other classes are exact and the rest
            are drawn from the remaining tail with $q_j \propto S_j$, weighted $1/(m q_j)$; on
            `"log_softmax"` and `"logits"` (whose gradient norms do not shrink with $S_j$)
            `num_sampled` classes are drawn uniformly without replacement, weighted
            $(N-1)/K$. `docs/math.md` has the measured spread.
        num_sampled: $K$ classes besides the target for `estimator="sampled"`.
        method: How the per-class gradients are computed: one of
            `gq_loss.kernels.GRADIENT_METHODS` (see `gq_loss.kernels`). `"auto"` times `loop`,
            `batched` and `jacrev` on the first call for a model and set-up and uses the fastest
            exact one that runs there ([`auto_choice`][gq_loss.kernels.auto_choice] reads it
            back); with `chunk_size` it is `recompute`.
        chunk_size: Classes differentiated at once; bounds peak memory with `"recompute"`.
        eps: Added to the denominator so that a zero denominator gives a finite value.
        generator: Random generator of the sampled estimator (refused with
            `estimator="exact"`, which draws nothing). The draws run in float64 on the logits'
            device, or on the CPU for a device without float64 (MPS), as the detectors' scores
            do; the generator must be on that device.
        return_logits: Also return the logits `(B, N)` of the one forward pass, with their
            graph, so the training step can add cross-entropy without a second forward.
        output: Names the logits in the model's output: a key (`str`, of a Mapping; otherwise
            an attribute), an index (`int`, of a tuple or list) or a callable applied to the
            output, e.g. `output="logits"`, `output=0`. `None` takes a tensor as it is, and the
            Hugging Face convention unnamed: the `"logits"` key of a Mapping, or the tensor
            attribute `logits` (`ModelOutput`). The model stays a module, so its mode, device
            placement and `method="recompute"` keep working.
        autocast: `True` (default): GQ's own forward and backward passes run under the
            caller's `torch.autocast`, if any (fast; under bf16 the GQ *gradient* is some 10-40 %
            off float64, the value within about 1 %: `docs/benchmarks.md`, "Precision under
            autocast"). `False`: they run with autocast disabled, in the model's own dtype
            (float32 for float32 weights), while the rest of the step stays under autocast;
            the logits of `return_logits` are then that float32 forward's.

    Returns:
        `(B,)` or `()`, float32 or wider (float32 for a bf16 or fp16 model); `(loss, logits)`
            with logits `(B, N)` in the model's dtype when `return_logits`.

    Raises:
        ValueError: A bad option (the message names it), a model output that is not logits
            `(B, N)` with `N >= 2`, `N = 2` with the paper formulation on softmax,
            `reduction="none"` in training under FSDP2 or with float16 weights, or a
            DistributedDataParallel model built with `static_graph=True`.
        TypeError: Bad `inputs`/`targets`/`output`/`autocast` types, a model output with no
            logits found (the message shows `output=`), a Lightning Fabric-wrapped model (the
            message gives the pattern that works), or `method` `"recompute"`/`"jacrev"` with
            `nn.DataParallel`.
        RuntimeError: A model with an operation that has no second derivative, with
            reentrant checkpointing, or one that sets `requires_grad` on a tensor computed from
            its inputs (Hugging Face audio models in train mode); a float16 model whose GQ value
            or parameter gradient overflowed (checked within the call, before anything reaches
            `.grad`; the message names the pass); the message says what to use instead.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        >>> gq, logits = gq_loss(model, x, y, return_logits=True)
        >>> loss = torch.nn.functional.cross_entropy(logits, y) + 1e-1 * gq
        >>> loss.backward()
        >>> bool(0 <= gq <= 1)
        True
        >>> with torch.no_grad():  # validation: the value, detached
        ...     gq_loss(model, x, y).requires_grad
        False
    """
    operand_name = _check_options(
        temperature,
        p,
        operand,
        formulation,
        reduction,
        estimator,
        num_sampled,
        method,
        chunk_size,
        eps,
        output,
    )
    _check_generator(generator, estimator)
    if not isinstance(autocast, bool):
        raise TypeError(f"`autocast` must be True or False, got {autocast!r}")
    with (
        autograd_enabled() as tracking,
        full_parameters(model) as fsdp,
        contextlib.nullcontext() if autocast else autocast_disabled(),
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
        run = GradientPass(
            model,
            inputs,
            operand=operand_name,
            temperature=temperature,
            p=p,
            # The reference formulation takes its two gradients itself, from a plain forward.
            method="loop" if formulation == "reference" else method,
            chunk_size=chunk_size,
            create_graph=tracking,
            output=output,
            width=None if num_sampled is None else num_sampled + 1,
        )
        check_input_range(model, run.x, user="GQ")  # the first batch of each model only
        logits = run.logits
        batch, num_classes = logits.shape
        check_class_indices("targets", targets, batch, num_classes, ndim=1)
        targets = targets.to(logits.device)
        if formulation == "reference":
            with second_order_errors(logits, run.x):
                value = _reference_ratio(run.op, run.x, targets, run.p, eps, tracking)
                if tracking:
                    probe_second_order(run, value)
        else:
            _check_class_count(num_classes, operand_name)
            columns, weights = _columns(
                logits, targets, temperature, operand_name, estimator, num_sampled, generator
            )
            value = _quotient(run.norms(columns), targets, weights, eps)
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


class GQLoss(nn.Module):
    r"""Module twin of [`gq_loss`][gq_loss.gq_loss]: holds the settings, takes the model per call.

    The model is a call argument, never a submodule, so it does not appear in this module's
    `state_dict`. The settings are plain attributes (`criterion.temperature`, ...), validated
    when the module is built and again on every call. `GQLoss()` computes the exact Eq. 7, the
    quantity it names; the study's advice for training with GQ is
    `GQLoss(estimator="sampled", num_sampled=1)` with λ = 1, not the paper's 1e-6 (a no-op in an
    earlier study whose JSON is not committed), and on its baseline plain CE with ODIN was the
    better buy: see "Choosing λ" in [`gq_loss`][gq_loss.gq_loss].

    Args:
        temperature: $T > 0$ of the softmax scores.
        p: Norm order of the input gradients: `1` (paper), `2` or `math.inf`.
        operand: `"softmax"`, `"log_softmax"`, `"logits"`, or `None` for the formulation's
            default (`"softmax"` for `paper`, `"logits"` for `reference`).
        formulation: `"paper"` (Eq. 7) or `"reference"` (the authors' code: one ratio per
            batch, `reduction="mean"` only).
        reduction: `"none"` -> `(B,)`; `"mean"` | `"sum"` -> scalar `()`.
        estimator: `"exact"` or `"sampled"` (with `num_sampled`).
        num_sampled: $K$ classes besides the target for `estimator="sampled"`.
        method: One of `gq_loss.kernels.GRADIENT_METHODS`; `"auto"` takes the fastest exact
            method per model and set-up (see [`gq_loss`][gq_loss.gq_loss]).
        chunk_size: Classes differentiated at once (the memory knob).
        eps: Added to the denominator.
        output: Names the logits in the model's output (a key, an attribute, an index or a
            callable; see [`gq_loss`][gq_loss.gq_loss]); `None` reads the Hugging Face
            `logits` field unnamed.
        autocast: `False` runs GQ's own passes with autocast disabled (float32 for float32
            weights) inside the caller's autocast region (see [`gq_loss`][gq_loss.gq_loss]).

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> criterion = GQLoss(temperature=2.0)
        >>> criterion.temperature
        2.0
        >>> criterion(model, torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])).shape
        torch.Size([])
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        p: float = 1,
        operand: Operand | None = None,
        formulation: Formulation = "paper",
        reduction: Reduction = "mean",
        estimator: Estimator = "exact",
        num_sampled: int | None = None,
        method: Method = "auto",
        chunk_size: int | None = None,
        eps: float = 1e-12,
        output: OutputSpec | None = None,
        autocast: bool = True,
    ) -> None:
        """Validates and stores the settings (see the class docstring for each argument).

        Raises:
            ValueError: A bad value; the message names the argument and what it takes.
            TypeError: A setting of the wrong type.
        """
        super().__init__()
        _check_options(
            temperature,
            p,
            operand,
            formulation,
            reduction,
            estimator,
            num_sampled,
            method,
            chunk_size,
            eps,
            output,
        )
        resolve_method(method, chunk_size, nn.Identity())
        if not isinstance(autocast, bool):
            raise TypeError(f"`autocast` must be True or False, got {autocast!r}")
        self.temperature = temperature
        self.p = p
        self.operand = operand
        self.formulation = formulation
        self.reduction = reduction
        self.estimator = estimator
        self.num_sampled = num_sampled
        self.method = method
        self.chunk_size = chunk_size
        self.eps = eps
        self.output = output
        self.autocast = autocast

    @overload
    def forward(
        self,
        model: Callable[[Tensor], Any],
        inputs: Tensor,
        targets: Tensor,
        *,
        generator: torch.Generator | None = ...,
        return_logits: Literal[False] = ...,
    ) -> Tensor: ...

    @overload
    def forward(
        self,
        model: Callable[[Tensor], Any],
        inputs: Tensor,
        targets: Tensor,
        *,
        generator: torch.Generator | None = ...,
        return_logits: Literal[True],
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def forward(
        self,
        model: Callable[[Tensor], Any],
        inputs: Tensor,
        targets: Tensor,
        *,
        generator: torch.Generator | None = ...,
        return_logits: bool,
    ) -> Tensor | tuple[Tensor, Tensor]: ...

    def forward(
        self,
        model: Callable[[Tensor], Any],
        inputs: Tensor,
        targets: Tensor,
        *,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""GQ of one batch with the stored settings, computed by [`gq_loss`][gq_loss.gq_loss].

        Args:
            model: Maps `inputs` `(B, *)` to logits `(B, N)`; used in its current mode.
            inputs: Batch `(B, *)`, floating point.
            targets: True labels `(B,)`, int64 in `[0, N)`.
            generator: Random generator of the sampled estimator (refused with
                `estimator="exact"`).
            return_logits: Also return the logits `(B, N)` of the one forward pass (with their
                graph), for the cross-entropy term of the same step.

        Returns:
            `(B,)` or `()` by `reduction`; `(loss, logits)` when `return_logits`. Detached under
                `torch.no_grad()`/`torch.inference_mode()`.

        Examples:
            >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
            >>> x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
            >>> gq, logits = GQLoss()(model, x, y, return_logits=True)
            >>> logits.shape
            torch.Size([4, 3])
        """
        return gq_loss(
            model,
            inputs,
            targets,
            temperature=self.temperature,
            p=self.p,
            operand=self.operand,
            formulation=self.formulation,
            reduction=self.reduction,
            estimator=self.estimator,
            num_sampled=self.num_sampled,
            method=self.method,
            chunk_size=self.chunk_size,
            eps=self.eps,
            generator=generator,
            return_logits=return_logits,
            output=self.output,
            autocast=self.autocast,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in _SETTINGS)


_SETTINGS = (
    "temperature",
    "p",
    "operand",
    "formulation",
    "reduction",
    "estimator",
    "num_sampled",
    "method",
    "chunk_size",
    "eps",
    "output",
    "autocast",
)


def _check_options(
    temperature: Any,
    p: Any,
    operand: Any,
    formulation: Any,
    reduction: Any,
    estimator: Any,
    num_sampled: Any,
    method: Any,
    chunk_size: Any,
    eps: Any,
    output: Any,
) -> str:
    """Validates every setting; returns the operand to use."""
    check_positive("temperature", temperature)
    check_output_spec(output)
    check_norm_order(p)
    check_choice("formulation", formulation, FORMULATIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("estimator", estimator, ESTIMATORS)
    check_nonnegative("eps", eps)
    if operand is None:
        operand = "softmax" if formulation == "paper" else "logits"
    check_choice("operand", operand, OPERANDS)
    check_optional_int("num_sampled", num_sampled)
    if (estimator == "sampled") != (num_sampled is not None):
        raise ValueError(
            "`num_sampled` must be given exactly when estimator='sampled', got "
            f"estimator={estimator!r}, num_sampled={num_sampled!r}"
        )
    if formulation == "reference":
        if operand == "softmax":
            raise ValueError(
                "formulation='reference' with operand='softmax' is identically 1 with zero gradient "
                "(the non-target softmax scores sum to 1 - S_y); use operand='logits' (the "
                "authors' published models) or formulation='paper'"
            )
        if (
            reduction != "mean"
            or estimator != "exact"
            or method != "auto"
            or chunk_size is not None
        ):
            raise ValueError(
                "formulation='reference' is one ratio per batch from two backward passes (no "
                "per-sample values to sum or to return): it takes reduction='mean', "
                "estimator='exact', method='auto' and no chunk_size, got "
                f"reduction={reduction!r}, estimator={estimator!r}, method={method!r}, "
                f"chunk_size={chunk_size!r}"
            )
    return str(operand)


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


def _columns(
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
            others, weights = _softmax_draws(z, targets, num_sampled, generator)
        else:
            others, weights = _uniform_draws(z, targets, num_sampled, generator)
        columns = torch.cat([targets, others], dim=1).to(logits.device)
    return columns, weights


def _softmax_draws(
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


def _uniform_draws(
    z: Tensor, targets: Tensor, num_sampled: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Logits and log-softmax operands, whose norms do not scale with S_j: K of the N - 1 other
    classes drawn uniformly without replacement, each weighted (N - 1) / K."""
    keys = torch.rand(z.shape, dtype=z.dtype, device=z.device, generator=generator)
    others = keys.scatter(1, targets, -1.0).topk(num_sampled, dim=1).indices
    return others, z.new_full(others.shape, (z.shape[1] - 1) / num_sampled)


def _quotient(norms: Tensor, targets: Tensor, weights: Tensor | None, eps: float) -> Tensor:
    """Eq. 7 from all N norms (`weights` None) or from the sampled columns (target first)."""
    if weights is None:
        numerator = norms.gather(1, targets[:, None]).squeeze(1)
        denominator = norms.sum(dim=1) - numerator
    else:
        numerator = norms[:, 0]
        denominator = (norms[:, 1:] * weights.to(norms.dtype).to(norms.device)).sum(dim=1)
    return numerator / (denominator + eps)


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
    raise RuntimeError(
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
        raise RuntimeError(
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
