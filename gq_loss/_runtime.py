"""How the package runs a model: the one seam between GQ, the detectors and the user's model.

Both the loss side (`kernels`, `loss`, `_auto`, `_recompute`) and the detector side
(`functional`, the detectors) call models only through this module, and neither imports the
other's internals. It owns:

* **inputs**: the one input rule (`check_input`: a tensor, floating point, with a batch
  dimension, checked in that order) and their placement (`place_inputs`: on the device and in
  the floating dtype of the model's first floating parameter);
* **the call**: `call_model` (with a note for a single image passed without its batch
  dimension), the output selector (`OutputSpec`, `select_output`, `check_logits`) and
  `logits_of`, which strings them together for a scored batch;
* **wrappers**: a ``DistributedDataParallel`` model runs through its ``.module`` (`unwrap_ddp`);
  FSDP2 has its own seam, `_fsdp`;
* **modes**: eval mode safe across threads (`eval_mode`, which also guards ``torch.export``
  modules) and the input-gradient pass (`grad_pass`: gradients on, autocast off);
* **the float64 rule**: where float64 work on a device's tensors runs (`float64_device`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn

#: A classifier: an ``nn.Module`` or any callable mapping inputs ``(B, ...)`` to logits.
Model = Callable[[Tensor], Any]

# --------------------------------------------------------------------------- inputs


def integer_hint(x: Tensor) -> str:
    """The fix for integer images (uint8 pixels in 0-255), to append to a dtype error."""
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        return ""
    return (
        "; for images in 0-255 pass x.float() / 255 (pixels in [0, 1], the unit of ODIN's "
        "epsilon and of the paper)"
    )


def check_input(
    x: Any, name: str = "inputs", *, min_ndim: int = 1, gradient: bool = False
) -> Tensor:
    """The one input rule of GQ (``gradient=True``, ``min_ndim=2``) and of the detectors
    (``min_ndim=1``): a tensor, then floating point, then at least ``min_ndim`` dimensions (the
    first one the batch), checked in that order, so a 0-d tensor gets the same `ValueError`
    from both. The type messages say what each side does with the input."""
    if gradient:
        _check_gradient_input(x)
    elif not isinstance(x, Tensor):
        raise TypeError(f"`{name}` batches must be tensors, got {type(x).__name__}")
    elif not x.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating tensor (B, ...), got {x.dtype} of shape "
            f"{tuple(x.shape)}{integer_hint(x)}"
        )
    if x.ndim < min_ndim:
        dims = "dimension" if min_ndim == 1 else "dimensions"
        raise ValueError(
            f"`{name}` must have shape (B, ...) with at least {min_ndim} {dims}, got {tuple(x.shape)}"
        )
    return x


def check_inputs(inputs: Any) -> None:
    """GQ's inputs ``(B, ...)``: one floating tensor with at least 2 dimensions (`check_input`)."""
    check_input(inputs, min_ndim=2, gradient=True)


def check_batch(x: Any, name: str) -> Tensor:
    """A detector's batch ``(B, ...)``: a floating tensor (`check_input`)."""
    return check_input(x, name)


def _check_gradient_input(inputs: Any) -> None:
    """GQ's type checks: one floating tensor (several inputs or a dict batch get the fix)."""
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


def check_model(name: str, model: Any) -> Model:
    """A model: an ``nn.Module`` or another callable."""
    if not callable(model):
        raise TypeError(
            f"`{name}` must be a torch.nn.Module or a callable mapping inputs (B, ...) to logits "
            f"(B, N), got {type(model).__name__}"
        )
    return model


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


def input_device(model: Any, inputs: Tensor) -> torch.device:
    """The device `place_inputs` puts ``inputs`` on, without placing them."""
    param = _first_floating_parameter(model)
    return inputs.device if param is None else param.device


# --------------------------------------------------------------------------- the call


def unwrap_ddp(model: Any) -> Any:
    """The module a ``DistributedDataParallel`` wrapper holds, else ``model``: the wrapper's
    forward runs collectives (which hang when one rank scores alone) and recomputing through it
    would re-enter its reducer."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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


def logits_of(
    model: Model, inputs: Tensor, output: OutputSpec | None, *, placed: bool = False
) -> Tensor:
    """The logits ``(B, N)`` of one batch by the package's rules: inputs placed by
    `place_inputs` (unless ``placed``: already placed), the output named by ``output``
    (`call_model`), checked by `check_logits`.

    A `DistributedDataParallel` wrapper is scored through its ``.module`` (`unwrap_ddp`)."""
    x = inputs if placed else place_inputs(model, inputs)
    logits = call_model(unwrap_ddp(model), x, output)
    check_logits(logits, inputs.shape[0])
    return logits


# --------------------------------------------------------------------------- modes


@contextlib.contextmanager
def grad_pass(device: torch.device) -> Iterator[None]:
    """Gradients on, even under ``no_grad`` or ``inference_mode`` (Lightning's predict loop),
    with autocast disabled for ``device``; an input copy to differentiate must be made inside."""
    available = getattr(torch.amp, "is_autocast_available", None)
    use_autocast = available(device.type) if available else device.type in ("cpu", "cuda")
    autocast = torch.autocast(device.type, enabled=False) if use_autocast else None
    with torch.inference_mode(False), torch.enable_grad(), autocast or contextlib.nullcontext():
        yield


# --------------------------------------------------------------------------- mechanics


#: Modules in eval mode for a detector: ``id -> (module, holders, its mode before the first)``.
_EVAL_HOLDS: dict[int, tuple[nn.Module, int, bool]] = {}
_EVAL_LOCK = threading.Lock()


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Eval mode for the duration (an ``nn.Module`` only); each submodule's flag is restored.

    Safe across threads: the modes are counted per submodule, so the first caller saves a
    module's mode and the last one to leave restores it, and no thread's scoring runs in a mode
    that another thread restored meanwhile. Nested uses (ODIN inside a detector) count the same.

    A module from ``torch.export`` (``ExportedProgram.module()``, also as a submodule) refuses
    ``eval()``: its mode was fixed when it was exported. One exported in eval mode is scored as
    it is (the flags of the modules around it are still set and restored); one exported in
    train mode is refused (`check_exported`).
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modules = list(model.modules())
    exported = [module for module in modules if is_exported(module)]
    for graph_module in exported:
        check_exported(graph_module, model)
    with _EVAL_LOCK:
        for m in modules:
            _, holders, training = _EVAL_HOLDS.get(id(m), (m, 0, m.training))
            _EVAL_HOLDS[id(m)] = (m, holders + 1, training)
        if exported:  # eval() would reach their refusing train(False): set the flags only
            for m in modules:
                m.training = False
        else:
            model.eval()
    try:
        yield
    finally:
        with _EVAL_LOCK:
            for m in modules:
                _, holders, training = _EVAL_HOLDS[id(m)]
                if holders == 1:
                    del _EVAL_HOLDS[id(m)]
                    m.training = training
                else:
                    _EVAL_HOLDS[id(m)] = (m, holders - 1, training)


def is_exported(module: nn.Module) -> TypeGuard[torch.fx.GraphModule]:
    """Whether ``module`` comes from ``torch.export`` (``ExportedProgram.module()``): a
    ``GraphModule`` whose ``train`` and ``eval`` torch replaced on the instance, to refuse."""
    return isinstance(module, torch.fx.GraphModule) and "eval" in vars(module)


def check_exported(module: torch.fx.GraphModule, model: nn.Module) -> None:
    """Refuse a ``torch.export`` module that was exported in train mode: its graph runs an op
    with ``train``/``training`` set (batch norm on batch statistics that also moves its running
    statistics, dropout), and its mode cannot be changed after export."""
    for node in module.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None:
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.name not in ("train", "training"):
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if value is True:
                where = "`model`" if module is model else "a submodule of `model`"
                raise ValueError(
                    f"{where} is a torch.export module exported in train mode (its graph runs "
                    f"{schema.name} with {arg.name}=True), and an exported module's mode cannot "
                    "be changed (torch refuses its eval()): it would score with batch statistics, "
                    "update its running statistics or apply dropout. Export it in eval mode: "
                    "`torch.export.export(model.eval(), args).module()`"
                )


# --------------------------------------------------------------------------- float64


def lacks_float64(device: torch.device) -> bool:
    """Whether ``device`` has no float64 (Apple's MPS): float64 work then runs on the CPU."""
    return device.type == "mps"


def float64_device(device: torch.device) -> torch.device:
    """Where float64 work on tensors of ``device`` runs: ``device`` itself, or the CPU where it
    has no float64 (`lacks_float64`). The one rule of every score."""
    return torch.device("cpu") if lacks_float64(device) else device


def float64(t: Tensor, *, copy: bool = False) -> Tensor:
    """``t`` in float64 on `float64_device` (a new tensor with ``copy=True``).

    At ``T = 1000`` a float32 max-softmax sits on a grid of about 7.5e-9 while scores spread over
    ~3e-5, so many scores tie; from float64 the ties are gone at negligible cost.
    """
    return t.to(device=float64_device(t.device), dtype=torch.float64, copy=copy)
