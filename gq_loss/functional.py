r"""ODIN on one batch (Liang, Li & Srikant, ICLR 2018), computed exactly: `odin_perturb` and
`odin_score`. [`ODINDetector`][gq_loss.ODINDetector] holds their settings and runs them over data.

With logits ``f(x)`` of shape ``(B, N)``, ``S_j(x; T) = softmax(f(x) / T)_j`` and the clean
prediction ``ŷ = argmax_j f_j(x)``, ODIN takes one signed-gradient step that raises the
temperature-scaled log-probability of ``ŷ`` and scores the result:

$$ \tilde x = x - \varepsilon \cdot
     \operatorname{sign}\big(-\nabla_x \log S_{\hat y}(x; T)\big) / \sigma_c, $$

$$ \mathrm{score}(x) = \max_j S_j(\tilde x; T), $$

higher meaning more in-distribution.

``-log S_ŷ(x; T)`` is the cross-entropy of ``f(x)/T`` against ``ŷ``: the step descends it, as the
original ODIN code does (the *Learning ODIN* paper's Eq. 2 prints the opposite sign).

Choices made explicit here:

* **Unit of ε.** ε is in the units of the tensor the model receives (``σ_c = 1``). For
  ``[0, 1]`` images, including a model that normalises its input *inside* its forward, that is
  already the paper's unit: pixels of the ``[0, 1]`` range; leave ``input_std`` unset.
  ``input_std=σ`` (per channel, dim 1) is **only for inputs fed already normalised**,
  ``(pixel - mean) / σ``: the step of channel ``c`` becomes ``ε / σ_c`` in those units, which is
  ε in pixel units again (the original code's convention). Passing it to a model fed ``[0, 1]``
  pixels divides the step by σ (about 4x the paper's ε for CIFAR's σ ≈ 0.25).
* **Sign of a zero gradient** (``sign_of_zero``). The original code binarises the gradient of the
  cross-entropy as ``(g >= 0) * 2 - 1``, so a coordinate whose gradient is exactly zero is still
  *decreased* by ``ε / σ_c`` (``sign_of_zero=1``). The default ``0`` is the mathematical sign
  (``torch.sign``, no step there): a zero gradient says nothing about which way raises ``S_ŷ``,
  and where zeros occur systematically (inputs the model ignores, dead ReLUs, an underflowed
  gradient) the original rule applies a data-independent shift. For networks whose input
  gradient is almost never exactly zero the two agree; use ``1`` to reproduce the original code.
* **Precision.** Both ODIN passes run with autocast disabled: at ``T = 1000`` a float16 input
  gradient underflows to zero, and the spacing of float16 (bfloat16) numbers near 1.0 is
  ``2**-10`` (``2**-7``), about ε or larger, so in half precision the step would round away and
  ODIN would silently turn into plain max-softmax. For the same reason a step (``ε > 0``) on
  inputs that reach the model in float16 or bfloat16 (a module whose first floating parameter
  is half precision, ``model.to(torch.bfloat16)``; or half-precision inputs to a plain
  callable) is refused with a ``ValueError`` that names the dtype's resolution: keep the
  weights in float32 and use ``torch.autocast`` for speed elsewhere (ODIN then runs in
  float32), or pass float32 inputs to a callable. The gradient is taken of ``T · log S_ŷ`` (same
  sign, no ``1/T`` factor) in the model's precision, half-precision logits promoted to float32.
  The final softmax is computed in **float64** from the logits, so scores are float64: a
  float32 max-softmax at ``T = 1000`` lies on a grid of ~7.5e-9 while scores spread over ~3e-5,
  and would tie.
* **Model.** An ``nn.Module`` runs in eval mode (each submodule's flag restored) and inputs are
  moved to the device and cast to the floating dtype of its first floating parameter (the
  package's one placement rule, shared with GQ). A plain callable is called as it is, on the
  inputs as they are. ``output=`` names the logits in a model output that is not a tensor (a
  dict key, an attribute, a tuple index or a callable), so a Hugging Face model or one that
  returns a tuple is passed as the module itself and keeps eval mode and placement; a
  ``logits`` key or tensor attribute is read without being named.
  A ``DistributedDataParallel`` wrapper runs through its ``.module`` (its forward runs
  collectives, which hang when one rank scores alone). No ``.grad`` is left anywhere, and both
  functions work under ``torch.no_grad()`` and ``torch.inference_mode()``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._runtime import (
    Model,
    OutputSpec,
    check_batch,
    check_model,
    check_output_spec,
    eval_mode,
    float64,
    grad_pass,
    input_device,
    logits_of,
    place_inputs,
)
from ._validation import check_input_range, check_nonnegative, check_positive

__all__ = ["odin_perturb", "odin_score"]

PerChannel = float | Sequence[float] | Tensor
Clamp = tuple[Tensor, Tensor]
SIGNS_OF_ZERO: tuple[int, ...] = (0, 1)


# --------------------------------------------------------------------------- options


def per_channel(name: str, value: PerChannel, *, positive: bool) -> Tensor:
    """A float or per-channel values as a 1-D float64 CPU tensor (length 1 broadcasts)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = [float(value)]
    try:
        t = torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"`{name}` must be a float or a 1-D sequence of floats, got {value!r}"
        ) from err
    if (
        t.numel() == 0
        or not bool(torch.isfinite(t).all())
        or (positive and not bool((t > 0).all()))
    ):
        need = "positive finite" if positive else "finite"
        raise ValueError(f"`{name}` must hold one or more {need} values, got {t.tolist()!r}")
    return t


def check_clamp(clamp: Any) -> Clamp | None:
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise TypeError(f"`clamp` must be a pair (lo, hi) or None, got {clamp!r}")
    lo = per_channel("clamp", clamp[0], positive=False)
    hi = per_channel("clamp", clamp[1], positive=False)
    if lo.numel() != hi.numel() and 1 not in (lo.numel(), hi.numel()):
        raise ValueError(f"`clamp` bounds must have matching lengths, got {clamp!r}")
    if not bool((lo < hi).all()):
        raise ValueError(f"`clamp` must satisfy lo < hi, got {clamp!r}")
    return lo, hi


def check_sign_of_zero(value: Any) -> int:
    if isinstance(value, bool) or value not in SIGNS_OF_ZERO:
        raise ValueError(f"`sign_of_zero` must be one of {SIGNS_OF_ZERO}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- one batch


def _logits(model: Model, x: Tensor, output: OutputSpec | None) -> Tensor:
    """The logits of ``x``, already placed by `_leaf`; half precision promoted to float32."""
    out = logits_of(model, x, output, placed=True)
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


def _check_step_precision(x: Tensor, model: Model, epsilon: float) -> None:
    """Refuse a step ``ε > 0`` on inputs the model receives in half precision: it would round
    away (bfloat16 numbers are ``2**-8`` apart in ``[0.5, 1)``, float16 ones ``2**-11``)."""
    if epsilon <= 0 or x.dtype not in (torch.float16, torch.bfloat16):
        return
    spacing = torch.finfo(x.dtype).eps
    dtype = str(x.dtype).removeprefix("torch.")
    if isinstance(model, torch.nn.Module):
        why = "inputs are cast to the dtype of the model's first floating parameter"
        fix = (
            "keep the model's weights in float32 (`model.float()`) and, for speed elsewhere, run "
            f"it under `torch.autocast(device_type, dtype=torch.{dtype})`: ODIN's passes disable "
            "autocast and run in float32"
        )
    else:
        why = "as passed: a plain callable gets its inputs as they are"
        fix = "pass float32 inputs (and a callable that takes them)"
    raise ValueError(
        f"ODIN cannot take its step of epsilon={epsilon:g} on {dtype} inputs ({why}): {dtype} "
        f"numbers are {spacing:.3g} apart in [1, 2) and {spacing / 2:.3g} in [0.5, 1), so the "
        "step would be rounded away or distorted and ODIN would silently become max-softmax; "
        f"{fix}; or pass epsilon=0 for temperature-scaled max-softmax"
    )


def _channel_view(t: Tensor, x: Tensor, name: str) -> Tensor:
    """``t`` shaped to broadcast along dim 1 of ``x``."""
    if t.numel() != 1 and (x.ndim < 2 or x.shape[1] != t.numel()):
        raise ValueError(
            f"`{name}` has {t.numel()} values but the input has shape {tuple(x.shape)}; "
            "expected 1 value or one per channel (dim 1)"
        )
    shape = [1] * x.ndim
    shape[min(1, x.ndim - 1)] = t.numel()
    return t.to(device=x.device, dtype=x.dtype).reshape(shape)


def _sign(
    x: Tensor, logits: Tensor, pred: Tensor, temperature: float, sign_of_zero: int, retain: bool
) -> Tensor:
    """``sign(∇_x CE(f(x)/T, ŷ)) = sign(-∇_x log S_ŷ)``, zeros mapped to ``sign_of_zero``."""
    logp = torch.log_softmax(logits / temperature, dim=1).gather(1, pred[:, None])
    target = logp.sum() * temperature  # same sign, without the 1/T of d log S / d logits
    if not target.requires_grad:
        raise ValueError(
            "`model` output does not require grad w.r.t. its input: ODIN needs the input "
            "gradient (is the forward detached or wrapped in torch.no_grad()?)"
        )
    (grad,) = torch.autograd.grad(target, x, retain_graph=retain, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(x)
    sign = torch.sign(grad).neg_()
    if sign_of_zero:
        sign.masked_fill_(grad == 0, 1.0)
    return sign


def _step(
    x: Tensor, sign: Tensor | None, epsilon: float, std: Tensor | None, clamp: Clamp | None
) -> Tensor:
    """``x̃ = clamp(x - ε · sign / σ)``."""
    if sign is not None and epsilon > 0:
        if std is None:
            x = torch.add(x, sign, alpha=-epsilon)
        else:
            x = torch.addcmul(x, sign, epsilon / _channel_view(std, x, "input_std"), value=-1)
    if clamp is not None:
        lo, hi = (_channel_view(b, x, "clamp") for b in clamp)
        x = torch.minimum(torch.maximum(x, lo), hi)
    return x


def odin_grid(
    model: Model,
    inputs: Tensor,
    temperatures: Sequence[float],
    epsilons: Sequence[float],
    *,
    std: Tensor | None,
    clamp: Clamp | None,
    sign_of_zero: int,
    output: OutputSpec | None,
) -> tuple[Tensor, Tensor, int]:
    """Scores ``(len(temperatures), len(epsilons), B)`` float64, clean argmax ``(B,)`` and the
    number of classes, on the model's device, for validated settings; one forward and backward
    per temperature."""
    need_grad = any(e > 0 for e in epsilons)
    if std is None:  # input_std= says the inputs are normalised on purpose
        check_input_range(model, inputs, user="ODIN")
    with eval_mode(model), grad_pass(input_device(model, inputs)):
        x = _leaf(model, inputs).requires_grad_(need_grad)
        _check_step_precision(x, model, max(epsilons, default=0.0))
        logits = _logits(model, x, output)
        pred = logits.argmax(dim=1)
        out = torch.empty(len(temperatures), len(epsilons), x.shape[0], dtype=torch.float64)
        out = out.to(float64(logits[:0]).device)
        for ti, temperature in enumerate(temperatures):
            retain = ti + 1 < len(temperatures)
            sign = _sign(x, logits, pred, temperature, sign_of_zero, retain) if need_grad else None
            with torch.no_grad():
                for ei, epsilon in enumerate(epsilons):
                    if epsilon > 0 or clamp is not None:
                        x_tilde = _step(x.detach(), sign, epsilon, std, clamp)
                        stepped = _logits(model, x_tilde, output)
                    else:  # x̃ = x: reuse the clean logits
                        stepped = logits
                    z = float64(stepped.detach()) / temperature
                    out[ti, ei] = torch.softmax(z, dim=1).amax(dim=1)
    return out, pred, logits.shape[1]


# --------------------------------------------------------------------------- public API


def _leaf(model: Model, inputs: Tensor) -> Tensor:
    """A fresh copy of ``inputs``, placed by `place_inputs` (the one placement of an ODIN
    call), for the input gradient; call it inside `grad_pass`."""
    x = place_inputs(model, inputs.detach())
    # Made under the caller's inference_mode: autograd needs a normal tensor.
    return x.clone() if x.is_inference() else x


def _check(
    model: Any,
    inputs: Any,
    temperature: float,
    epsilon: float,
    input_std: PerChannel | None,
    clamp: Any,
    sign_of_zero: Any,
    output: Any,
) -> tuple[float, float, Tensor | None, Clamp | None, int, OutputSpec | None]:
    """Validated ``(temperature, epsilon, std, clamp, sign_of_zero, output)`` of one call."""
    check_model("model", model)
    check_batch(inputs, "inputs")
    std = None if input_std is None else per_channel("input_std", input_std, positive=True)
    return (
        check_positive("temperature", temperature),
        check_nonnegative("epsilon", epsilon),
        std,
        check_clamp(clamp),
        check_sign_of_zero(sign_of_zero),
        check_output_spec(output),
    )


def odin_perturb(
    model: Model,
    inputs: Tensor,
    *,
    temperature: float = 1000.0,
    epsilon: float = 0.001,
    input_std: PerChannel | None = None,
    sign_of_zero: int = 0,
    clamp: tuple[PerChannel, PerChannel] | None = None,
    output: OutputSpec | None = None,
) -> Tensor:
    r"""The ODIN input ``x̃ = clamp(x - ε · sign(-∇_x log S_ŷ(x; T)) / σ)`` of one batch.

    Args:
        model: An ``nn.Module`` or a callable mapping ``inputs`` to logits ``(B, N)``,
            ``N >= 2`` (or to an output holding them, see ``output``); samples must be
            independent (see the module docstring for mode, device and dtype).
        inputs: Input batch ``(B, ...)``, floating point; never modified.
        temperature: ``T > 0`` of the gradient. Default: ``1000.0`` (paper).
        epsilon: Step ``ε >= 0`` in the units of the tensor the model receives: for ``[0, 1]``
            images (also when the model normalises them inside) that is pixel units, the
            paper's. Default: ``0.001`` (paper, CIFAR-10).
        input_std: Only for inputs fed **already normalised** as ``(pixel - mean) / σ``: ``σ``,
            a positive float or one value per channel (dim 1); the step of channel ``c`` is then
            ``ε / σ_c``, i.e. ε in pixel units. Default: ``None`` (``σ = 1``).
        sign_of_zero: Sign of an exactly-zero cross-entropy gradient: ``0`` (``torch.sign``, no
            step) or ``1`` (the original code: a step of ``-ε / σ_c``). Default: ``0``.
        clamp: Optional ``(lo, hi)`` (floats or per-channel values, model-input units).
        output: Names the logits in the model's output when it is not a tensor: a key (str; of
            a Mapping, else an attribute), an index (int) or a callable applied to the output.
            Default: ``None`` (a tensor; a ``"logits"`` key or tensor attribute is read unnamed).

    Returns:
        ``x̃`` of the shape of ``inputs``, a new tensor on their device in the model's dtype.

    Raises:
        TypeError: ``model`` is not callable, ``inputs`` is not a floating tensor, or the model
            does not return logits (the message shows the ``output=`` that names them).
        ValueError: Invalid settings, logits not ``(B, N >= 2)``, no input gradient, or a
            step ``epsilon > 0`` on inputs the model receives in float16 or bfloat16 (it would
            round away; see the module docs).

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x = torch.zeros(2, 3, 2, 2)
        >>> x_tilde = odin_perturb(model, x, temperature=1000.0, epsilon=0.01)
        >>> x_tilde.shape, x_tilde.abs().unique().tolist()  # one step of ±ε per element
        (torch.Size([2, 3, 2, 2]), [0.009999999776482582])
    """
    temperature, epsilon, std, bounds, zero_sign, output = _check(
        model, inputs, temperature, epsilon, input_std, clamp, sign_of_zero, output
    )
    if std is None:  # input_std= says the inputs are normalised on purpose
        check_input_range(model, inputs, user="ODIN")
    with eval_mode(model), grad_pass(input_device(model, inputs)):
        leaf = _leaf(model, inputs)
        _check_step_precision(leaf, model, epsilon)
        sign = None
        if epsilon > 0:
            logits = _logits(model, leaf.requires_grad_(), output)
            sign = _sign(leaf, logits, logits.argmax(dim=1), temperature, zero_sign, False)
        # copy=True: with ε = 0 and no clamp the result would alias the caller's tensor
        return _step(leaf.detach(), sign, epsilon, std, bounds).to(inputs.device, copy=True)


def odin_score(
    model: Model,
    inputs: Tensor,
    *,
    temperature: float = 1000.0,
    epsilon: float = 0.001,
    input_std: PerChannel | None = None,
    sign_of_zero: int = 0,
    clamp: tuple[PerChannel, PerChannel] | None = None,
    output: OutputSpec | None = None,
) -> Tensor:
    r"""ODIN scores ``max_j S_j(x̃; T)`` of one batch, higher = more in-distribution.

    Arguments as for [`odin_perturb`][gq_loss.odin_perturb]; the final softmax uses the same
    ``T``. ``epsilon=0`` (and no ``clamp``) gives temperature-scaled max-softmax.

    Returns:
        Scores ``(B,)`` in ``[1/N, 1]``, **float64** (the softmax is computed in float64 from
            the logits), detached, on the device of ``inputs``. An input the model maps to NaN
            scores NaN.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> scores = odin_score(model, torch.randn(4, 3, 2, 2), temperature=1000.0, epsilon=0.001)
        >>> scores.shape, scores.dtype, bool((scores >= 1 / 3).all())
        (torch.Size([4]), torch.float64, True)
    """
    temperature, epsilon, std, bounds, zero_sign, output = _check(
        model, inputs, temperature, epsilon, input_std, clamp, sign_of_zero, output
    )
    scores, _, _ = odin_grid(
        model,
        inputs,
        (temperature,),
        (epsilon,),
        std=std,
        clamp=bounds,
        sign_of_zero=zero_sign,
        output=output,
    )
    return scores[0, 0].to(inputs.device)
