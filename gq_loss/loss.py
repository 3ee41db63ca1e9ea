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

from collections.abc import Callable
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from ._autograd import eager_under_compile
from ._compute import compute_gq
from ._gq_settings import (
    ESTIMATORS,
    FORMULATIONS,
    REDUCTIONS,
    SETTINGS,
    Estimator,
    Formulation,
    GQSettings,
    Method,
    Operand,
    Reduction,
)
from ._runtime import OutputSpec

__all__ = ["ESTIMATORS", "FORMULATIONS", "REDUCTIONS", "GQLoss", "gq_loss"]


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

    Train with `cross_entropy + λ · gq_loss(...)`, never with GQ alone. The study (README,
    "Choosing λ"; its numbers, seeds and intervals in `docs/reproduction.md`) found plain
    cross-entropy with ODIN the better buy on both networks measured; λ = 1 cost accuracy on
    the stronger one, λ = 0.1 with `estimator="sampled", num_sampled=1` was harmless on both. An
    exact step costs several cross-entropy steps (`docs/benchmarks.md`, "Cost in CE steps").

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
        GQLossError: (a `RuntimeError`) A model with an operation that has no second
            derivative, with reentrant checkpointing, or one that sets `requires_grad` on a
            tensor computed from its inputs (Hugging Face audio models in train mode); a float16
            model whose GQ value or parameter gradient overflowed (checked within the call,
            before anything reaches `.grad`; the message names the pass); the message says what
            to use instead.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        >>> gq, logits = gq_loss(model, x, y, return_logits=True)
        >>> loss = torch.nn.functional.cross_entropy(logits, y) + 0.1 * gq  # λ = 0.1
        >>> loss.backward()
        >>> bool(0 <= gq <= 1)
        True
        >>> with torch.no_grad():  # validation: the value, detached
        ...     gq_loss(model, x, y).requires_grad
        False
    """
    settings = GQSettings(
        temperature=temperature,
        p=p,
        operand=operand,
        formulation=formulation,
        reduction=reduction,
        estimator=estimator,
        num_sampled=num_sampled,
        method=method,
        chunk_size=chunk_size,
        eps=eps,
        output=output,
        autocast=autocast,
    )
    return compute_gq(settings, model, inputs, targets, generator, return_logits)


class GQLoss(nn.Module):
    r"""Module twin of [`gq_loss`][gq_loss.gq_loss]: stores its settings, takes the model per call.

    The keyword arguments are `gq_loss`'s settings, with the same names, defaults and meaning
    (see [`gq_loss`][gq_loss.gq_loss]); `generator` and `return_logits` are per call. They are
    kept as plain attributes (`criterion.temperature`, ..., shown by `repr`), validated once
    when the module is built and again on the next call after one is assigned, so a training
    loop's calls validate nothing. The model is a call argument, never a submodule, so it is
    not in this module's `state_dict`.

    `GQLoss()` is the exact Eq. 7, the quantity its name promises. To experiment with GQ (README,
    "Choosing λ"; the numbers are in `docs/reproduction.md`), start from
    `GQLoss(estimator="sampled", num_sampled=1)` at λ = 0.1 next to cross-entropy, as below, and
    check accuracy before raising λ: λ = 1 (K = 1) cost 4.6 points of it on the stronger network
    studied.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
        >>> x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 4])
        >>> criterion = GQLoss(estimator="sampled", num_sampled=1)
        >>> gq, logits = criterion(model, x, y, return_logits=True)
        >>> loss = torch.nn.functional.cross_entropy(logits, y) + 0.1 * gq  # λ = 0.1
        >>> loss.backward()
        >>> criterion.num_sampled, gq.shape
        (1, torch.Size([]))
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
        """Validates and stores the settings (those of [`gq_loss`][gq_loss.gq_loss]).

        Raises:
            ValueError: A bad value; the message names the argument and what it takes.
            TypeError: A setting of the wrong type.
        """
        super().__init__()
        settings = GQSettings(
            temperature=temperature,
            p=p,
            operand=operand,
            formulation=formulation,
            reduction=reduction,
            estimator=estimator,
            num_sampled=num_sampled,
            method=method,
            chunk_size=chunk_size,
            eps=eps,
            output=output,
            autocast=autocast,
        )
        for name in SETTINGS:
            setattr(self, name, getattr(settings, name))
        self.__dict__["_settings"] = settings

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in SETTINGS:  # validated on the next call
            self.__dict__["_settings"] = None

    def _current_settings(self) -> GQSettings:
        """The settings, validated once per assignment (`GQSettings`)."""
        settings: GQSettings | None = self.__dict__.get("_settings")
        if settings is None:
            settings = GQSettings(**{name: getattr(self, name) for name in SETTINGS})
            self.__dict__["_settings"] = settings
        return settings

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

    @eager_under_compile  # a graph break, as `gq_loss` (it does not go through it)
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
        return compute_gq(
            self._current_settings(), model, inputs, targets, generator, return_logits
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in SETTINGS)
