"""Argument checks shared by the public functions: messages name the argument, the expectation
and the value received."""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

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


def integer_hint(x: Tensor) -> str:
    """The fix for integer images (uint8 pixels in 0-255), to append to a dtype error."""
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        return ""
    return (
        "; for images in 0-255 pass x.float() / 255 (pixels in [0, 1], the unit of ODIN's "
        "epsilon and of the paper)"
    )


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


def check_inputs(inputs: Any) -> None:
    if isinstance(inputs, Mapping) or (
        isinstance(inputs, (tuple, list)) and any(isinstance(t, Tensor) for t in inputs)
    ):
        what = (
            f"keys {list(inputs)[:8]}" if isinstance(inputs, Mapping) else f"{len(inputs)} entries"
        )
        raise TypeError(
            f"`inputs` must be a torch.Tensor, got a {type(inputs).__name__} with {what}: GQ "
            "differentiates one input tensor. Pass that tensor (a Hugging Face image batch: "
            "`inputs['pixel_values']`), and for a model that takes several inputs a module that "
            "takes it alone and holds the others, e.g. `class WithSecond(nn.Module): def "
            "forward(self, x1): return model(x1, self.x2)` with `self.x2` set before each call "
            "(docs/models.md, 'Models with several inputs')"
        )
    if not isinstance(inputs, Tensor):
        raise TypeError(f"`inputs` must be a torch.Tensor, got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(
            "`inputs` must be a floating-point tensor (its gradient is taken), got "
            f"{inputs.dtype}{integer_hint(inputs)}"
        )
    if inputs.ndim < 2:
        raise ValueError(
            f"`inputs` must have shape (B, ...) with at least 2 dimensions, got {tuple(inputs.shape)}"
        )


def check_logits(
    logits: Any, batch_size: int | None = None, *, what: str = "the model's output"
) -> None:
    """Checks a logits tensor ``(B, N)`` with ``N >= 2`` classes; the one rule for every entry point.

    A model output that is not a tensor (and that `select_output` could not read the logits from)
    gets a message showing the `output=` argument that names them; one output (``N = 1``) is
    refused because a softmax over one class is identically 1, which makes GQ 0 and every
    ODIN/MSP score 1.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"{what} must be a tensor of logits (B, N), got {_describe(logits)}; name the logits "
            f"with the `output` argument, e.g. {_suggest_output(logits)}"
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


def call_model(
    model: Callable[..., Any],
    inputs: Tensor,
    output: OutputSpec | None = None,
    *,
    module: Any = None,
) -> Any:
    """``select_output(model(inputs), output)``. The one model-call rule of GQ and every detector.

    When an image model (one with a `Conv2d` or `BatchNorm2d`) fails on 3-D inputs, which look
    like a single ``(C, H, W)`` image, the error gets a note saying how to add the batch dim; its
    type and message stay the model's own. A ``(B, L, D)`` batch of a text model gets no note.
    `module` is the module that `model` runs when `model` is a wrapper around it.
    """
    try:
        out = model(inputs)
    except Exception as err:
        if inputs.ndim == 3 and _takes_images(model if module is None else module):
            err.add_note(
                f"gq-loss: inputs are batches (B, ...), got shape {tuple(inputs.shape)}; for a "
                "single (C, H, W) image pass `x.unsqueeze(0)`"
            )
        raise
    return select_output(out, output)


def _takes_images(model: Any) -> bool:
    """Whether `model` is a module with a layer made for ``(B, C, H, W)`` batches."""
    return isinstance(model, nn.Module) and any(
        isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in model.modules()
    )


#: How `output=` names the logits in a model's output: a key (str; of a Mapping, otherwise an
#: attribute), an index (int; of a tuple or list) or a callable applied to the output.
OutputSpec = str | int | Callable[[Any], Tensor]


def check_output_spec(output: Any) -> OutputSpec | None:
    """Validates an `output=` argument: None, a str, an int or a callable."""
    if output is None or callable(output):
        return output
    if isinstance(output, bool) or not isinstance(output, (str, int)):
        raise TypeError(
            "`output` must be None, a key or attribute name (str), an index (int) or a callable "
            f"applied to the model's output, got {type(output).__name__} {output!r}"
        )
    return output


def select_output(out: Any, output: OutputSpec | None) -> Any:
    """The logits in a model's output `out`, as named by `output` (see `OutputSpec`).

    With `output=None` a tensor is returned as it is, and the Hugging Face convention is read
    without being named: a Mapping with the key ``"logits"`` or an object with a tensor attribute
    ``logits`` (``ModelOutput``) gives that; anything else is returned unchanged, for
    `check_logits` to refuse with a message that shows `output=`.

    Raises:
        ValueError: `output` names a key, attribute or index that `out` does not have.
        TypeError: `output` is not None, a str, an int or a callable.
    """
    check_output_spec(output)
    if output is None:
        if isinstance(out, Tensor):
            return out
        if isinstance(out, Mapping):
            return out["logits"] if "logits" in out else out
        logits = getattr(out, "logits", None)
        return logits if isinstance(logits, Tensor) else out
    if callable(output):
        return output(out)
    if isinstance(output, str):
        if isinstance(out, Mapping):
            if output in out:
                return out[output]
        elif not isinstance(out, Tensor) and hasattr(out, output):
            return getattr(out, output)
        raise ValueError(
            f"`output`={output!r} names no key or attribute of the model's output, which is "
            f"{_describe(out)}"
        )
    if isinstance(out, (tuple, list)) and -len(out) <= output < len(out):
        return out[output]
    raise ValueError(
        f"`output`={output!r} is an index into a tuple or list, but the model's output is "
        f"{_describe(out)}"
    )


def _describe(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        return f"{type(out).__name__} with keys {list(out.keys())[:8]}"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__} of length {len(out)}"
    return type(out).__name__


def _suggest_output(out: Any) -> str:
    if isinstance(out, Mapping):
        keys = [k for k, v in out.items() if isinstance(v, Tensor)] or list(out.keys())
        return f"`output={keys[0]!r}`" if keys else "`output='logits'`"
    if isinstance(out, (tuple, list)):
        return "`output=0`"
    names = (
        [k for k, v in vars(out).items() if isinstance(v, Tensor)]
        if hasattr(out, "__dict__")
        else []
    )
    if names:
        return f"`output={names[0]!r}`"
    return "`output=lambda out: <the logits in out>`"


def place_inputs(model: Any, inputs: Tensor) -> Tensor:
    """`inputs` on the device of the model's first floating parameter, in its dtype.

    The one placement rule of GQ and the detectors: for an `nn.Module` with a floating parameter,
    floating `inputs` are moved to that parameter's device and cast to its dtype (a differentiable
    no-op when both already match; other dtypes only move). Plain callables and modules without
    floating parameters get `inputs` unchanged.
    """
    param = _first_floating_parameter(model)
    if param is None:
        return inputs
    dtype = param.dtype if inputs.is_floating_point() else inputs.dtype
    return inputs.to(device=param.device, dtype=dtype)


def _first_floating_parameter(model: Any) -> Tensor | None:
    parameters = getattr(model, "parameters", None)
    if not isinstance(model, nn.Module) or not callable(parameters):
        return None
    return next((q for q in parameters() if q.is_floating_point()), None)


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
