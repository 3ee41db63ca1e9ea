"""Argument checks shared by the public functions: messages name the argument, the expectation
and the value received."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

NORM_ORDERS: tuple[float, ...] = (1, 2, math.inf)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    number = _check_real(name, value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"`{name}` must be finite and > 0, got {value!r}")
    return number


def check_nonnegative(name: str, value: Any) -> float:
    number = _check_real(name, value)
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"`{name}` must be finite and >= 0, got {value!r}")
    return number


def check_fraction(name: str, value: Any) -> float:
    """A share in ``(0, 1]`` (a target TPR)."""
    number = _check_real(name, value)
    if not 0.0 < number <= 1.0:  # also rejects NaN
        raise ValueError(f"`{name}` must be in (0, 1], got {value!r}")
    return number


def check_norm_order(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or p not in NORM_ORDERS:
        raise ValueError(f"`p` must be one of 1, 2 or math.inf, got {p!r}")
    return float(p)


def check_optional_int(name: str, value: Any, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int or None, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")
    return value


def check_inputs(inputs: Any) -> None:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"`inputs` must be a torch.Tensor, got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(
            f"`inputs` must be a floating-point tensor (its gradient is taken), got {inputs.dtype}"
        )
    if inputs.ndim < 2:
        raise ValueError(
            f"`inputs` must have shape (B, ...) with at least 2 dimensions, got {tuple(inputs.shape)}"
        )


def check_logits(
    logits: Any, batch_size: int | None = None, *, what: str = "the model's output"
) -> None:
    """Checks a logits tensor ``(B, N)`` with ``N >= 2`` classes; the one rule for every entry point.

    A model that returns a dict or tuple (HuggingFace style) gets a message showing the one-line
    wrapper that fixes it; one output (``N = 1``) is refused because a softmax over one class is
    identically 1, which makes GQ 0 and every ODIN/MSP score 1.
    """
    if not isinstance(logits, Tensor):
        if isinstance(logits, Mapping):
            keys = list(logits.keys())[:5]
            key = "logits" if "logits" in keys else (keys[0] if keys else "logits")
            fix = f"lambda x: model(x)[{key!r}]"
            got = f"{type(logits).__name__} with keys {keys}"
        elif isinstance(logits, (tuple, list)):
            fix, got = "lambda x: model(x)[0]", f"{type(logits).__name__} of length {len(logits)}"
        else:
            fix, got = "lambda x: <your logits>(model(x))", type(logits).__name__
        raise TypeError(
            f"{what} must be a tensor of logits (B, N), got {got}; pass a callable that returns "
            f"the logits instead of the model, e.g. `{fix}`"
        )
    batch = "B" if batch_size is None else f"B = {batch_size}"
    if (
        logits.ndim != 2
        or (batch_size is not None and logits.shape[0] != batch_size)
        or not logits.is_floating_point()
    ):
        raise ValueError(
            f"{what} must be floating-point logits of shape (B, N) with {batch}, "
            f"got shape {tuple(logits.shape)} and dtype {logits.dtype}"
        )
    if logits.shape[1] < 2:
        raise ValueError(
            f"{what} must have N >= 2 classes, got N = {logits.shape[1]} (shape "
            f"{tuple(logits.shape)}): a softmax over one class is identically 1, so GQ and every "
            "softmax-based OOD score would be constant"
        )


def model_dtype(model: Any) -> torch.dtype | None:
    """Floating dtype of the first floating parameter of an ``nn.Module``; None otherwise."""
    parameters = getattr(model, "parameters", None)
    if not callable(parameters):
        return None
    param = next((q for q in parameters() if q.is_floating_point()), None)
    return None if param is None else param.dtype


def call_model(model: Callable[[Tensor], Any], x: Tensor) -> Any:
    """``model(x)``; a failure on an unbatched-looking input says how to add the batch dim."""
    try:
        return model(x)
    except (RuntimeError, ValueError) as err:  # BatchNorm: ValueError "expected 4D input"
        if x.ndim == 3:
            raise ValueError(
                f"the model failed on inputs of shape {tuple(x.shape)}: inputs are batches "
                f"(B, ...); for a single (C, H, W) image pass `x.unsqueeze(0)` ({err})"
            ) from err
        raise


def check_class_indices(
    name: str, index: Any, batch_size: int, num_classes: int, ndim: int
) -> None:
    """Checks an int64 index tensor of shape (B,) (ndim=1) or (B, K) (ndim=2) with values in [0, N)."""
    if not isinstance(index, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of class indices, got {type(index).__name__}"
        )
    if index.dtype != torch.long:
        raise TypeError(f"`{name}` must hold int64 class indices, got dtype {index.dtype}")
    expected = "(B,)" if ndim == 1 else "(B, K)"
    if index.ndim != ndim or index.shape[0] != batch_size:
        raise ValueError(
            f"`{name}` must have shape {expected} with B = {batch_size}, got {tuple(index.shape)}"
        )
    if index.numel():
        low, high = (int(v) for v in torch.aminmax(index))
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"`{name}` must hold class indices in [0, {num_classes}) for a model with "
                f"{num_classes} outputs, got values in [{low}, {high}]"
            )
