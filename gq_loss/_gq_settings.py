"""GQ's settings, declared once and validated once (package-internal).

`GQSettings` is the frozen, validated form of the keyword arguments of `gq_loss` and `GQLoss`:
`gq_loss()` builds one per call, `GQLoss` once at construction (and again on the next call
after a setting is assigned), so a call of a built `GQLoss` validates nothing twice.
`NormSettings` is the part that `class_gradient_norms` takes (`norm_settings` validates it).
The allowed values are the constants the code dispatches on (`OPERANDS`, the backend table's
`GRADIENT_METHODS`, `FORMULATIONS`, `REDUCTIONS`, `ESTIMATORS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ._backends import GRADIENT_METHODS
from ._runtime import OutputSpec, check_output_spec
from ._validation import (
    check_choice,
    check_nonnegative,
    check_norm_order,
    check_optional_int,
    check_positive,
)

Operand = Literal["softmax", "log_softmax", "logits"]
Method = Literal["auto", "loop", "recompute", "batched", "jacrev"]
Formulation = Literal["paper", "reference"]
Reduction = Literal["none", "mean", "sum"]
Estimator = Literal["exact", "sampled"]
OPERANDS: tuple[str, ...] = ("softmax", "log_softmax", "logits")
FORMULATIONS: tuple[str, ...] = ("paper", "reference")
REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")
ESTIMATORS: tuple[str, ...] = ("exact", "sampled")


@dataclass(frozen=True)
class NormSettings:
    """The validated settings of one pass of per-class input-gradient norms.

    `method` is as given (`auto` asks `_auto.auto_method` to record its choice), `resolved` is
    `check_method`'s (`auto` with `chunk_size` is `recompute`; `auto` without it is resolved per
    call by `_auto.auto_method`); `temperature` and `p` are floats.
    """

    operand: str
    temperature: float
    p: float
    method: str
    resolved: str
    chunk_size: int | None
    output: OutputSpec | None


def check_method(method: Any, chunk_size: Any) -> str:
    """Validates `method`/`chunk_size`; `auto` with `chunk_size` is `recompute`, without it
    stays `auto`. The model's part of the choice is `_plan.plan_method`."""
    check_choice("method", method, GRADIENT_METHODS)
    check_optional_int("chunk_size", chunk_size)
    if method == "auto" and chunk_size is not None:
        method = "recompute"
    if method == "loop" and chunk_size is not None:
        raise ValueError(
            "`chunk_size` has no effect with method='loop' (every class's graph is kept); "
            "use method='recompute' to bound memory"
        )
    return str(method)


def norm_settings(
    *,
    operand: Any,
    temperature: Any,
    p: Any,
    method: Any,
    chunk_size: Any,
    output: Any,
) -> NormSettings:
    """`NormSettings` from the arguments of `class_gradient_norms`, each validated once."""
    check_choice("operand", operand, OPERANDS)
    output = check_output_spec(output)
    return NormSettings(
        operand=str(operand),
        temperature=check_positive("temperature", temperature),
        p=check_norm_order(p),
        method=str(method),
        resolved=check_method(method, chunk_size),
        chunk_size=chunk_size,
        output=output,
    )


@dataclass(frozen=True)
class GQSettings:
    """The settings of `gq_loss`/`GQLoss`, validated when built (the arguments are documented on
    `gq_loss`); `norms` is the pass they ask of `class_gradient_norms`' machinery, with the
    operand resolved from the formulation and the method from `chunk_size`.

    Raises:
        ValueError: A bad value; the message names the argument and what it takes.
        TypeError: A setting of the wrong type.
    """

    temperature: float = 1.0
    p: float = 1
    operand: str | None = None
    formulation: str = "paper"
    reduction: str = "mean"
    estimator: str = "exact"
    num_sampled: int | None = None
    method: str = "auto"
    chunk_size: int | None = None
    eps: float = 1e-12
    output: OutputSpec | None = None
    autocast: bool = True
    norms: NormSettings = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        temperature = check_positive("temperature", self.temperature)
        output = check_output_spec(self.output)
        p = check_norm_order(self.p)
        check_choice("formulation", self.formulation, FORMULATIONS)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_nonnegative("eps", self.eps)
        operand = self.operand
        if operand is None:
            operand = "softmax" if self.formulation == "paper" else "logits"
        check_choice("operand", operand, OPERANDS)
        check_optional_int("num_sampled", self.num_sampled)
        if (self.estimator == "sampled") != (self.num_sampled is not None):
            raise ValueError(
                "`num_sampled` must be given exactly when estimator='sampled', got "
                f"estimator={self.estimator!r}, num_sampled={self.num_sampled!r}"
            )
        if self.formulation == "reference":
            self._check_reference(operand)
        method = check_method(self.method, self.chunk_size)
        if not isinstance(self.autocast, bool):
            raise TypeError(f"`autocast` must be True or False, got {self.autocast!r}")
        norms = NormSettings(
            operand=str(operand),
            temperature=temperature,
            p=p,
            # The reference formulation takes its two gradients itself, from a plain forward.
            method="loop" if self.formulation == "reference" else str(self.method),
            resolved="loop" if self.formulation == "reference" else method,
            chunk_size=self.chunk_size,
            output=output,
        )
        object.__setattr__(self, "norms", norms)

    def _check_reference(self, operand: str) -> None:
        if operand == "softmax":
            raise ValueError(
                "formulation='reference' with operand='softmax' is identically 1 with zero gradient "
                "(the non-target softmax scores sum to 1 - S_y); use operand='logits' (the "
                "authors' published models) or formulation='paper'"
            )
        if (
            self.reduction != "mean"
            or self.estimator != "exact"
            or self.method != "auto"
            or self.chunk_size is not None
        ):
            raise ValueError(
                "formulation='reference' is one ratio per batch from two backward passes (no "
                "per-sample values to sum or to return): it takes reduction='mean', "
                "estimator='exact', method='auto' and no chunk_size, got "
                f"reduction={self.reduction!r}, estimator={self.estimator!r}, "
                f"method={self.method!r}, chunk_size={self.chunk_size!r}"
            )


#: The names of the settings, in the order of `gq_loss`'s signature (and `GQLoss`'s repr).
SETTINGS: tuple[str, ...] = (
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
