"""Argument checks shared by the public functions: messages name the argument, the expectation
and the value received."""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._torch_internals import user_stacklevel

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


class InputRangeWarning(UserWarning):
    """Inputs far outside the documented range: pixels in ``[0, 1]``, or images normalised as
    ``(pixel - mean) / std`` (within about ±3). Raised for floats in 0-255, where ODIN's ε would
    be 255 times too small. Silence it where such inputs are meant::

        warnings.filterwarnings("ignore", category=gq_loss.InputRangeWarning)
    """


#: Largest ``|x|`` accepted without a warning: [0, 1] pixels and normalised images stay far
#: below it (ImageNet's statistics map [0, 1] into [-2.2, 2.7]); images in 0-255 exceed it.
INPUT_RANGE_LIMIT = 20.0

# Models whose inputs were checked, per check: once per model, so a training loop pays one
# reduction (and on an accelerator one device sync) on its first step, not on every step.
_RANGE_CHECKED: dict[str, weakref.WeakSet[Any]] = {
    "GQ": weakref.WeakSet(),
    "ODIN": weakref.WeakSet(),
}


def check_input_range(model: Any, inputs: Tensor, *, user: str) -> None:
    """Warn (:class:`InputRangeWarning`) when the first batch ``model`` gets from ``user``
    (``"GQ"`` or ``"ODIN"``) reaches ``|x| > INPUT_RANGE_LIMIT``.

    Checked once per model and user (a model that cannot be weakly referenced: every call), on
    the first batch only: one ``amax`` and one host read, so no device sync per training step.
    """
    seen = _RANGE_CHECKED[user]
    try:
        if model in seen:
            return
        seen.add(model)
    except TypeError:  # not weakly referenceable: check every call
        pass
    if inputs.numel() == 0 or not inputs.is_floating_point():
        return
    peak = float(inputs.detach().abs().amax())
    if not peak > INPUT_RANGE_LIMIT:  # NaN inputs are another check's business
        return
    effect = (
        "ODIN's epsilon is in the units of its input, so on 0-255 images it is 255 times "
        "smaller than meant; if the inputs are normalised or scaled on purpose, say so with "
        "input_std= (input_std=1/255 for 0-255 pixels keeps epsilon in [0, 1] pixel units)"
        if user == "ODIN"
        else "GQ's value does not depend on the input scale, but ODIN's epsilon on a model "
        "trained on these inputs will be in their units (255 times too small for 0-255 pixels)"
    )
    warnings.warn(
        f"{user} inputs reach |x| = {peak:.4g}, far outside the documented range (pixels in "
        f"[0, 1], or normalised images within about ±3): images in 0-255? Pass x / 255. {effect}. "
        "Checked on each model's first batch; where such inputs are meant, silence it with "
        "warnings.filterwarnings('ignore', category=gq_loss.InputRangeWarning).",
        InputRangeWarning,
        stacklevel=user_stacklevel(),
    )


#: Device types whose index kernels refuse an out-of-range index themselves (CUDA's device-side
#: assertion in `gather`/`scatter`): there the value range of a label tensor is read on the first
#: batch of each model only, since reading it is a device sync.
INDEX_ASSERTING_DEVICES: tuple[str, ...] = ("cuda",)
# Models whose labels were range-checked on such a device, per argument name.
_INDICES_CHECKED: dict[str, weakref.WeakSet[Any]] = {
    "targets": weakref.WeakSet(),
    "classes": weakref.WeakSet(),
}


def check_class_indices(
    name: str, index: Any, batch_size: int, num_classes: int, ndim: int, *, model: Any = None
) -> None:
    """Checks an int64 index tensor of shape (B,) (ndim=1) or (B, K) (ndim=2) with values in [0, N).

    Type, dtype and shape are checked on every call, and so are the values of labels on the
    CPU (no device sync) or on a device other than CUDA (whose index kernels may not refuse a
    bad index). On CUDA, where reading them is a device sync, the values are checked until a
    batch of `model`'s passes, then no more (a model that cannot be weakly referenced: every
    call): a later out-of-range label there still fails, in the device-side assertion of the
    index op that reads it (GQ gathers or scatters every label), not silently.
    """
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
    if not index.numel() or _range_checked(name, index, model):
        return
    low, high = (int(v) for v in torch.aminmax(index))
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"`{name}` must hold class indices in [0, {num_classes}) for a model with "
            f"{num_classes} outputs, got values in [{low}, {high}]"
        )
    if index.device.type in INDEX_ASSERTING_DEVICES and model is not None:
        with contextlib.suppress(TypeError):  # not weakly referenceable: check every call
            _INDICES_CHECKED[name].add(model)


def _range_checked(name: str, index: Tensor, model: Any) -> bool:
    """Whether `index` is on an index-asserting device and a batch of `model`'s labels there
    already passed the range check."""
    if index.device.type not in INDEX_ASSERTING_DEVICES or model is None:
        return False
    try:
        return model in _INDICES_CHECKED[name]
    except TypeError:  # not weakly referenceable
        return False
