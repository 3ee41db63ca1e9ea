r"""Per-class input-gradient norms, the cost centre of the Gradient Quotient.

For a classifier $f$, an operand $o$ (softmax, log-softmax or logits, all at temperature $T$),
every sample $i$ and class $j$:

$$ n_{ij} = \Big\lVert \Big[\nabla_{x} \textstyle\sum_{k} o_j(x_k)\Big]_i \Big\rVert_p . $$

Every method differentiates the *batch sum* of class $j$. For models whose samples are
independent (eval-mode BatchNorm, no batch coupling) row $i$ of that gradient is exactly
$\nabla_{x_i} o_j(x_i)$. With train-mode BatchNorm the samples are coupled through the batch
statistics and row $i$ also holds $\nabla_{x_i} o_j(x_k)$ for $k \ne i$; that batch-sum
definition is what this package computes (and what the authors' code differentiated).

Methods (all exact, same result; every one runs the model forward once per call, so Dropout
masks and BatchNorm running statistics are those of one ordinary forward pass; `recompute`
replays that forward during `backward()` with the same RNG state, on scratch copies of the
buffers as they were before it, so a forward that updates buffers (spectral_norm's power
iteration in train mode) is replayed as the same function):

| method | how | peak memory when training through the norms |
|---|---|---|
| `loop` | one `autograd.grad` per class | grows with N: every class's double-backward graph lives until `backward()` |
| `recompute` | pass 1: the norms without a graph; during `backward()` the forward is replayed once and differentiated `chunk_size` classes at a time | forward + `chunk_size` classes |
| `batched` | `torch.func.vmap` of one `autograd.grad` over the one-hot class cotangents, or `autograd.grad(is_grads_batched=True)` (vmap over the backward; see `_norms_batched`), `chunk_size` classes at a time | grows with N; the vmapped backward holds its classes at once (1.6-4.3x `loop`'s peak, measured on CPU at N = 10 and 100) |
| `jacrev` | `torch.func.vjp` of the forward, `vmap` of its pullback over the one-hot class cotangents (`chunk_size` = vmap's `chunk_size`) | grows with N; 1.6-4.7x `loop`'s peak (measured on CPU at N = 10 and 100) |

`method="auto"` (the default) takes the fastest of `loop`, `batched` and `jacrev` for the model,
as `torch.backends.cudnn.benchmark` does for convolutions: the first call for a model and
set-up (the same model object, input shape, dtype, device, which modules train and which
Dropout layers draw, autocast state, training or value only, operand, `p` and classes per
sample) times them on that call's batch (a warm-up, then at least 3 rounds: forward pass, norms
and, when training, their parameter gradient) and keeps the fastest; later calls look it up.
Every run in the probe starts from the same buffers and random state, and a method whose norms
or parameter gradient disagree with `loop`'s beyond the square root of the machine epsilon is
left out (it cannot differentiate this model exactly). A new input shape of a set-up is timed
in the fewest rounds while the set-up's probes took less than `SHAPES_SECONDS` (1 s) in all;
later shapes take the nearest probed shape's choice. Each probe is logged at INFO level on the
`"gq_loss"` logger (the choice and the time it took); an explicit `method` skips it.
[`auto_choice`][gq_loss.kernels.auto_choice] reads the choice back, with the times and why a
method was left out. The one-time probe costs about 15-20 GQ steps, and about half a second on
models whose step takes milliseconds. It leaves no trace: it works on
the batch detached from the caller's graph, on scratch copies of the buffers (BatchNorm
statistics move once, in the real call), with the global RNG and every `torch.Generator` the
forward draws from restored (the caller's next random numbers do not change) and with
`torch.autograd.grad` (no `.grad`); the model's hooks do run in it. Where it could not leave
no trace it does not time, runs `loop` and says why in `auto_choice`: lazy modules not yet
initialised (timed on the next call) and parameters computed from the caller's graph
(MAML-style fast weights). A method that fails or is refused in the probe is left out, and the
user sees nothing of it.
`auto` never times:

- with `chunk_size`: it is `recompute`, the method that bounds memory;
- under `torch.use_deterministic_algorithms(True)`: it is `loop` (the methods add the same terms
  in different orders, so a choice by timing would make the run irreproducible);
- for a DistributedDataParallel model, in a multi-process run (every process must choose alike,
  and timing would run the model's collectives) and for a plain callable: it is `loop`;
- above 32 classes per sample (all N, or `1 + num_sampled`, or `classes`): it is `loop`
  (`batched` and `jacrev` hold all classes at once; measured on CPU at N = 100, `jacrev` was
  1.3x faster than `loop` on the zoo ViT and 3.7x on BERT: choose it yourself if memory allows).

It leaves out `jacrev` when the forward pass draws random numbers (Dropout in train mode:
`torch.func` may draw them in another order than eager mode, so the result would depend on the
timing) and, on CUDA, a method whose warm-up needed more memory beyond `loop`'s than was left
free on the device. Measured on CPU (`docs/models.md`), `auto` was within 1.1x of the fastest
exact method on the eleven Hugging Face models of the test zoo (it took `jacrev` or `batched`,
up to 2.6x faster than `loop`) and on the example CNNs (`loop`; `jacrev` on ResNet-18).

Every method runs under `torch.autocast` (bf16 and fp16, CPU and CUDA): the forward passes in
the autocast dtype, the backward passes under the same autocast state, the norms accumulated in
float32. Where torch 2.13's vmapped BatchNorm backward rejects autocast's mixed dtypes,
`jacrev` runs its pullback one class at a time and `batched` takes the other vmap.

`jacrev` needs a model that `torch.func` can transform: no in-place updates of tensors other than
the model's registered buffers, and `autograd.Function`s with `setup_context`. Where it cannot
run the model it raises a `RuntimeError` that names `method='loop'`; it never falls back silently.
It does not take a DistributedDataParallel-wrapped model. Its forward runs on copies of the
buffers; those the forward changed are written back as the eager forward changes them (a buffer
it left alone is not touched, so a graph of the caller's own forward that saved it, such as a
cross-entropy term on `model(x)`, stays valid).

TorchScript modules (`torch.jit.script`, `torch.jit.trace`) run with `loop` only; a model with
TorchScript submodules, or one that calls a scripted or traced *function*, also runs with
`recompute`. The other methods raise a `TypeError` that names `loop` (they would return GQ with
a wrong gradient or none, silently); a function is found by the TorchScript executor's node in
the forward's autograd graph, on every call, and where `auto` had chosen such a method the call
runs `loop` instead (for this model from then on, said in `auto_choice`).

Every method's forward pass (and `recompute`'s replay) runs PyTorch's attention on its math
backend and compiled code eagerly, since fused attention kernels and compiled graphs have no
double backward; on CUDA that replaces flash/memory-efficient attention inside these passes
(more memory and time for long sequences), and nothing changes outside them in this thread
(PyTorch's attention flags are process-wide: other threads' attention runs on the math backend
while a GQ pass runs; `docs/models.md`, "Known limits"). An operation that
cannot be switched (a custom kernel, an `autograd.Function` marked `@once_differentiable`) is
found at the training call, before `backward()`, and named in a `RuntimeError`. `recompute`
replays under the RNG and autocast state of the original forward, like
`torch.utils.checkpoint`, so the model's forward hooks run twice per step. `docs/math.md`
("Which models GQ can differentiate") has the details.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointFunction

from ._auto import AutoChoice, auto_choice, auto_method, refuse
from ._autograd import (
    check_second_order,
    differentiable_forward,
    eager_under_compile,
    graph_leaves,
    input_grad,
    norm_rows,
    operand_of,
    second_order_errors,
    selected,
    torchscript_nodes,
)
from ._fsdp import fsdp_modules, full_parameters, gather_parameters
from ._recompute import (
    PreForwardBuffers,
    RecomputeNorms,
    Replay,
    get_autocast_state,
    get_rng_state,
)
from ._runtime import (
    OutputSpec,
    call_model,
    check_inputs,
    check_logits,
    check_output_spec,
    place_inputs,
    unwrap_ddp,
)
from ._validation import (
    check_choice,
    check_class_indices,
    check_norm_order,
    check_optional_int,
    check_positive,
)

__all__ = ["GRADIENT_METHODS", "OPERANDS", "AutoChoice", "auto_choice", "class_gradient_norms"]

Operand = Literal["softmax", "log_softmax", "logits"]
Method = Literal["auto", "loop", "recompute", "batched", "jacrev"]
OPERANDS: tuple[str, ...] = ("softmax", "log_softmax", "logits")


@eager_under_compile
def class_gradient_norms(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    *,
    operand: Operand = "softmax",
    temperature: float = 1.0,
    p: float = 1,
    classes: Tensor | None = None,
    create_graph: bool = False,
    method: Method = "auto",
    chunk_size: int | None = None,
    output: OutputSpec | None = None,
) -> Tensor:
    r"""Input-gradient norm of every class's operand, per sample.

    $$ n_{ij} = \lVert \nabla_{x_i} o_j(x_i) \rVert_p, \qquad
       o = \mathrm{softmax}(f(x)/T),\ \log\mathrm{softmax}(f(x)/T)\ \text{or}\ f(x)/T $$

    Under `torch.no_grad()` or `torch.inference_mode()` the norms are still computed (gradients
    are switched on locally for the input gradient), no graph is kept and the result is detached,
    whatever `create_graph` says.

    Args:
        model: Maps `inputs` `(B, *)` to logits `(B, N)` with `N >= 2` (or to an output that
            holds them, see `output`). An `nn.Module` is needed for `method="recompute"`. Its
            train/eval mode is used as it is.
        inputs: Batch `(B, *)`, floating point; moved to the device and cast to the dtype of the
            model's first floating parameter when those differ (plain callables: unchanged).
            Not modified; its `.grad` is not touched.
        operand: `"softmax"`, `"log_softmax"` or `"logits"`, all at `temperature`.
        temperature: $T > 0$.
        p: Norm order over all input elements of a sample: `1`, `2` or `math.inf`.
        classes: Optional int64 `(B, K)`: compute only column `classes[i, k]` for sample `i`.
        create_graph: Keep the graph so the norms can be differentiated w.r.t. the parameters
            (double backprop). Needed to train through the norms.
        method: One of `gq_loss.kernels.GRADIENT_METHODS` (module docstring). `"auto"` times
            `loop`, `batched` and `jacrev` on the first call for a model and set-up and uses the
            fastest ([`auto_choice`][gq_loss.kernels.auto_choice] reads it back); with
            `chunk_size` it is `recompute`.
        chunk_size: Classes differentiated at once by `recompute`/`batched`/`jacrev`; the
            memory knob.
        output: Names the logits in the model's output: a key (`str`, of a Mapping; otherwise
            an attribute), an index (`int`, of a tuple or list) or a callable applied to the
            output. `None` takes a tensor as it is, and the Hugging Face convention unnamed: the
            `"logits"` key of a Mapping or the tensor attribute `logits` (`ModelOutput`).

    Returns:
        `(B, N)`, or `(B, K)` when `classes` is given; dtype `float32` or wider (the norms of a
            bf16 or fp16 model's input gradients are accumulated in float32).

    Raises:
        ValueError: A bad option, a model output that is not logits `(B, N)`, `N >= 2`,
            `create_graph=True` under FSDP2 (train with `gq_loss` there), or a
            DistributedDataParallel model built with `static_graph=True`.
        TypeError: A model output with no logits found (the message shows `output=`), inputs
            that are not a floating tensor, a plain function with `method="recompute"`, or
            `method="jacrev"` with DistributedDataParallel or FSDP2.
        RuntimeError: `method="jacrev"` on a model `torch.func` cannot transform; a model with
            an operation that has no second derivative (with `create_graph=True`), or with
            reentrant checkpointing (the messages say what to use instead).

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> norms = class_gradient_norms(model, torch.randn(4, 3, 2, 2), operand="logits")
        >>> norms.shape
        torch.Size([4, 3])
        >>> torch.allclose(norms[0], model[1].weight.abs().sum(dim=1))  # linear: weight rows
        True
    """
    with autograd_enabled() as tracking, full_parameters(model) as fsdp:
        if fsdp is not None and create_graph and tracking:
            raise ValueError(
                "create_graph=True cannot be used under FSDP2 (fully_shard): FSDP reduces "
                "gradients only in the backward pass of a forward it saw, so GQ hands it a "
                "gradient taken within gq_loss; train with gq_loss (reduction 'mean' or 'sum')"
            )
        run = GradientPass(
            model,
            inputs,
            operand=operand,
            temperature=temperature,
            p=p,
            method=method,
            chunk_size=chunk_size,
            create_graph=create_graph and tracking,
            output=output,
            width=classes.shape[1] if isinstance(classes, Tensor) and classes.ndim == 2 else None,
        )
        if classes is not None:
            batch, num_classes = run.logits.shape
            check_class_indices("classes", classes, batch, num_classes, ndim=2)
        norms = run.norms(classes)
    return norms if tracking else norms.detach()


@contextmanager
def autograd_enabled() -> Iterator[bool]:
    """Gradients on, also under `no_grad`/`inference_mode`; yields the caller's grad mode.

    Package-internal. Under inference mode, tensors made inside are normal tensors, so inputs
    made under the caller's inference mode are copied inside (see `GradientPass`).
    """
    tracking = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.enable_grad():
        yield tracking


class GradientPass:
    """One forward pass of the model, ready to give per-class input-gradient norms.

    Package-internal entry point shared by `class_gradient_norms` and `gq_loss` (call it inside
    `autograd_enabled()`): validates the options, resolves the method, runs the model once and
    keeps `x` (the tracked inputs `(B, *)`), `logits` `(B, N)` and `op` (the operand `(B, N)`
    in float32 or wider). `norms(columns)` then asks the method's backend for the norms.

    The forward pass runs under `differentiable_forward()` (math attention, compiled code run
    eagerly: both have a double backward), and the model's refusals of GQ's backward passes
    come back as errors that say what to do.
    """

    def __init__(
        self,
        model: Callable[[Tensor], Any],
        inputs: Tensor,
        *,
        operand: str,
        temperature: float,
        p: float,
        method: str,
        chunk_size: int | None,
        create_graph: bool,
        output: OutputSpec | None = None,
        width: int | None = None,
    ) -> None:
        check_choice("operand", operand, OPERANDS)
        self.output = check_output_spec(output)
        self.operand = operand
        self.temperature = check_positive("temperature", temperature)
        self.p = check_norm_order(p)
        self.method = resolve_method(method, chunk_size, model)
        _check_torchscript(self.method, model)
        _check_static_graph(model)
        check_fabric(model)
        self.chunk_size = chunk_size
        self.create_graph = create_graph
        self.model = model
        check_inputs(inputs)
        if not callable(model):
            raise TypeError(f"`model` must be callable (an nn.Module), got {type(model).__name__}")
        inputs = place_inputs(model, inputs)  # differentiable: a caller's input graph continues
        if inputs.is_inference():  # made under the caller's inference_mode: autograd needs a copy
            inputs = inputs.clone()
        self.input_grad = inputs.requires_grad
        self.x = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
        self.auto = method == "auto"
        if self.auto:
            self.method = auto_method(self, chunk_size, width)
        self.backend = _BACKENDS[self.method]
        self.state: Any = None  # what the backend's forward keeps for its norms
        with second_order_errors(), differentiable_forward():
            try:
                self.logits, self.op = self.backend.forward(self)
            except _TorchScriptInside as found:  # jacrev's forward, stopped before any effect
                self._leave_for_loop(found.names)
                self.logits, self.op = _plain_forward(self)
        if self.method == "batched" and (names := torchscript_nodes(self.logits)):
            self._leave_for_loop(names)
        # FSDP2: every parameter gathered for GQ's passes, also where its input gradient never goes
        gather_parameters(model)

    def _leave_for_loop(self, names: list[str]) -> None:
        """A vmapped method found TorchScript code in the forward's graph (`names`): refused,
        or, when `auto` chose it, replaced by `loop` for this call and the model's next ones."""
        reason = (
            f"the forward pass runs TorchScript code (a @torch.jit.script or torch.jit.trace "
            f"function: {', '.join(n.rpartition('::')[2] for n in names)} in its autograd "
            "graph), which vmap and torch.func cannot see into, so GQ's parameter gradient "
            "would be wrong or missing"
        )
        if not self.auto:
            raise TypeError(
                f"method={self.method!r} cannot run this model: {reason}; use method='loop' "
                "(or 'recompute'), which differentiate it exactly, or call the Python function "
                "instead of its scripted version"
            )
        refuse(self.model, self.method, reason)
        self.method = "loop"
        self.backend = _BACKENDS["loop"]

    def operand_of(self, logits: Tensor) -> Tensor:
        """The operand of `logits` `(B, N)` at this pass's temperature."""
        return operand_of(logits, self.operand, self.temperature)

    def norms(self, columns: Tensor | None = None) -> Tensor:
        """Norms `(B, K)` of the operand columns `columns` `(B, K)` (all N when None)."""
        with second_order_errors(self.logits, self.x):
            norms = self.backend.norms(self, columns)
            if self.create_graph and self.method != "recompute":
                probe_second_order(self, norms)
        return norms


def probe_second_order(run: GradientPass, norms: Tensor) -> None:
    """Checks that GQ's parameter gradient can be taken (`check_second_order`), so that an
    operation without a second derivative fails here rather than in `backward()`, or is dropped."""
    if norms.numel():
        one = norms[:, 0] if norms.ndim == 2 else norms
        check_second_order(run.model, run.logits, one, run.x)


def resolve_method(method: Any, chunk_size: Any, model: Any) -> str:
    """Validates `method`/`chunk_size`; `auto` with `chunk_size` is `recompute`, without it
    stays `auto` (`GradientPass` asks `auto_method` which method that is)."""
    check_choice("method", method, GRADIENT_METHODS)
    check_optional_int("chunk_size", chunk_size)
    if method == "auto" and chunk_size is not None:
        method = "recompute"
    if method == "loop" and chunk_size is not None:
        raise ValueError(
            "`chunk_size` has no effect with method='loop' (every class's graph is kept); "
            "use method='recompute' to bound memory"
        )
    if method == "recompute" and not isinstance(model, nn.Module):
        raise TypeError(f"method='recompute' needs an nn.Module model, got {type(model).__name__}")
    if method in ("recompute", "jacrev") and isinstance(model, nn.DataParallel):
        raise TypeError(
            f"method={method!r} cannot run an nn.DataParallel-wrapped model: it calls the model "
            "through torch.func.functional_call, which DataParallel refuses; use method='loop' "
            "(or 'batched') with DataParallel, or DistributedDataParallel, which PyTorch "
            "recommends instead and with which 'recompute' runs"
        )
    if method == "jacrev" and isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "method='jacrev' cannot run a DistributedDataParallel-wrapped model (its forward "
            "would bypass DDP's gradient synchronisation); use method='loop' or 'recompute'"
        )
    if method == "jacrev" and fsdp_modules(model):
        raise TypeError(
            "method='jacrev' cannot run a model with FSDP2 (fully_shard) modules (its forward "
            "under torch.func is not covered by FSDP's gradient hooks); use method='loop', "
            "'recompute' or 'batched'"
        )
    return str(method)


def check_fabric(model: Any) -> None:
    """Refuses a Lightning Fabric-wrapped model (`fabric.setup(model)`), whose outputs refuse
    every backward pass but `fabric.backward(loss)`, with the pattern that works."""
    cls = type(model)
    if cls.__name__ == "_FabricModule" and cls.__module__.startswith("lightning"):
        raise TypeError(
            "GQ cannot take its input gradients through a Lightning Fabric-wrapped model "
            "(fabric.setup(model)): Fabric lets its outputs be differentiated only by "
            "fabric.backward(loss). Pass the wrapped model's `.module` inside `fabric.autocast()` "
            "(Fabric's precision): `with fabric.autocast(): gq, logits = gq_loss(model.module, x, "
            "y, return_logits=True)`, then `fabric.backward(F.cross_entropy(logits, y) + lam * "
            "gq)` (docs/examples.md, 'Lightning Fabric')"
        )


def _check_torchscript(method: str, model: Any) -> None:
    """Refuses the methods that cannot differentiate TorchScript (`torch.jit.script`/`trace`)
    modules; `loop` runs them (checked against a float64 per-class loop). `auto` times only the
    methods that run, so it is not refused."""
    if method in ("loop", "auto") or not isinstance(model, nn.Module):
        return
    model = unwrap_ddp(model)
    whole = isinstance(model, torch.jit.ScriptModule)
    if method == "recompute" and whole:
        reason = (
            "its replay swaps the module's parameters (torch.func.functional_call), which "
            "TorchScript forbids"
        )
    elif method != "recompute" and (
        whole or any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())
    ):
        reason = (
            "torch.func's graph does not reach through TorchScript, so GQ would come back without "
            "a gradient"
            if method == "jacrev"
            else "vmap has no batching rules inside the TorchScript interpreter"
        )
    else:
        return
    what = "is a TorchScript module" if whole else "has TorchScript submodules"
    raise TypeError(
        f"method={method!r} cannot run this model, which {what} (torch.jit.script or "
        f"torch.jit.trace): {reason}; use method='loop' (no chunk_size), which runs it, or pass "
        "the eager module"
    )


def _check_static_graph(model: Any) -> None:
    """Refuses a model that runs DistributedDataParallel with `static_graph=True`.

    On its first iteration such a DDP queues its one-time graph bookkeeping (and the
    gradients' all-reduce) from the first backward pass through its output; GQ's own backward
    passes inside the call are that pass, before any gradient exists, and the processes'
    gradients were then never all-reduced (measured: ranks 2.2 apart after one step). A DDP
    that runs inside the model's forward (Lightning's Trainer, which hands GQ the
    LightningModule's network) is not in `model.modules()` and not affected.
    """
    if not isinstance(model, nn.Module):
        return
    static = [
        m
        for m in model.modules()
        if isinstance(m, nn.parallel.DistributedDataParallel) and getattr(m, "static_graph", False)
    ]
    if static:
        raise ValueError(
            "gq_loss cannot run a DistributedDataParallel model built with static_graph=True: "
            "GQ's own backward passes inside the call would trigger DDP's one-time static-graph "
            "bookkeeping before any gradient exists, and the processes' gradients would never be "
            "all-reduced; build it with static_graph=False (the default; Fabric: "
            "DDPStrategy(static_graph=False)). For GQ's value alone, under torch.no_grad(), pass "
            "the wrapped module (model.module)"
        )


# --------------------------------------------------------------------------- forward passes


def _plain_forward(run: GradientPass) -> tuple[Tensor, Tensor]:
    before = None
    if run.method == "recompute":  # lets the replay draw the same Dropout masks, under autocast
        if run.create_graph:  # and start from the same buffers (only a training call replays)
            before = PreForwardBuffers(unwrap_ddp(run.model))
        run.state = get_rng_state(run.x.device), get_autocast_state(run.x.device), before
    logits = call_model(run.model, run.x, run.output)
    check_logits(logits, run.x.shape[0])
    return logits, run.operand_of(logits)


def _func_forward(run: GradientPass) -> tuple[Tensor, Tensor]:
    """The one forward pass inside `torch.func.vjp`; keeps the pullback in `run.state`.

    Registered buffers are swapped for copies made inside the transformed function (a mutation of
    a captured tensor is an error under `torch.func`); the copies that the forward changed are
    written back, so the buffers move once, as with `loop` (`_write_back`).
    """
    model = run.model
    named = (
        [(n, b) for n, b in model.named_buffers() if b is not None]
        if isinstance(model, nn.Module)
        else []
    )

    versions: dict[str, int] = {}  # of the scratch copies as made (aux outputs are tensors)

    def forward(x: Tensor) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        scratch = {name: buf.clone() for name, buf in named}
        versions.update((name, buf._version) for name, buf in scratch.items())
        if scratch and isinstance(model, nn.Module):
            logits = call_model(
                lambda t: torch.func.functional_call(model, scratch, (t,), strict=False),
                x,
                run.output,
                module=model,
            )
        else:
            logits = call_model(model, x, run.output)
        check_logits(logits, x.shape[0])
        if names := torchscript_nodes(logits):  # before the buffers are written back
            raise _TorchScriptInside(names)
        return run.operand_of(logits), (logits, scratch)

    with _func_errors("the forward pass"):
        op, pullback, (logits, scratch) = torch.func.vjp(  # type: ignore[misc]
            forward, run.x, has_aux=True
        )
    _write_back(named, scratch, versions)
    run.state = pullback
    return logits, op


class _TorchScriptInside(Exception):
    """`jacrev`'s forward found TorchScript nodes (`names`) in its graph."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.names = names


def _write_back(
    named: list[tuple[str, Tensor]], scratch: dict[str, Tensor], versions: dict[str, int]
) -> None:
    """Writes the scratch buffers that `jacrev`'s forward changed into the model's buffers.

    The write must do to each buffer what the same forward run eagerly (`loop`) does, since
    graphs of the caller's own forward passes (a cross-entropy term on `model(x)`) may have saved
    it: a buffer the forward left alone (a constant scale, Hugging Face's `position_ids`, a
    buffer of an eval-mode module) is not touched; one it updated by an in-place op that bumps
    the version counter (`num_batches_tracked += 1`) is copied back, bumping it once as that op
    would; one a fused kernel updated without bumping it (BatchNorm's running statistics) is
    copied back without bumping it, as that kernel does. One device sync per call finds the
    latter by value.
    """
    if not named:
        return
    bumped = [
        (buf, scratch[name]) for name, buf in named if scratch[name]._version != versions[name]
    ]
    unbumped = [
        (buf, scratch[name])
        for name, buf in named
        if scratch[name]._version == versions[name] and buf.numel()
    ]
    with torch.no_grad():
        for buf, new in bumped:
            buf.copy_(new)
        if unbumped:
            differs = torch.stack([(buf != new).any().cpu() for buf, new in unbumped]).tolist()
            for (buf, new), changed in zip(unbumped, differs, strict=True):
                if changed:
                    buf.data.copy_(new)  # `.data`: a fresh version counter, the buffer's unmoved


# --------------------------------------------------------------------------- backends


def _all_columns(op: Tensor, columns: Tensor | None) -> Tensor:
    batch, num_classes = op.shape
    if columns is None:
        return torch.arange(num_classes, device=op.device).expand(batch, num_classes)
    return columns


def _one_hot_cotangents(op: Tensor, cols: Tensor) -> Tensor:
    """`(k, B, N)`: cotangent `c` selects column `cols[i, c]` of row `i`."""
    basis = op.new_zeros(cols.shape[1], *op.shape)
    return basis.scatter_(2, cols.T.unsqueeze(-1), 1.0)


def _loop(run: GradientPass, columns: Tensor | None, create_graph: bool) -> Tensor:
    sel = selected(run.op, columns)
    rows = [
        norm_rows(input_grad(sel[:, k].sum(), run.x, create_graph), run.p)
        for k in range(sel.shape[1])
    ]
    return torch.stack(rows, dim=1) if rows else sel.new_zeros(sel.shape)


def _norms_loop(run: GradientPass, columns: Tensor | None) -> Tensor:
    return _loop(run, columns, run.create_graph)


def _norms_recompute(run: GradientPass, columns: Tensor | None) -> Tensor:
    norms = _loop(run, columns, create_graph=False)
    if not run.create_graph:
        return norms
    rng_state, autocast, before = run.state
    job = Replay(
        run.model, run.operand, run.temperature, run.p, columns, run.chunk_size, rng_state,
        run.input_grad, autocast, run.output, before,
    )  # fmt: skip
    # Only the parameters the forward pass used: the norms depend on no other, and handing an
    # unused one to the Function would give it a gradient event that DistributedDataParallel
    # (find_unused_parameters=True) already counted as unused ("marked ready twice").
    used = graph_leaves(run.logits)
    named = [
        (n, q)
        for n, q in unwrap_ddp(run.model).named_parameters()
        if q.requires_grad and id(q) in used
    ]
    out: Tensor = RecomputeNorms.apply(
        norms, job, [n for n, _ in named], run.x, *(q for _, q in named)
    )
    return out


def _norms_batched(run: GradientPass, columns: Tensor | None) -> Tensor:
    """The k backward passes as one batched pass, by either of PyTorch's two vmaps.

    In torch 2.13 each breaks some double backward: the older one of `is_grads_batched`
    GroupNorm's (a size mismatch, any dtype); `torch.func.vmap` BatchNorm's and LayerNorm's under
    CPU bf16 autocast (mixed dtypes). The one that works on the common case runs first (the older
    under autocast, `torch.func`'s otherwise) and the other one when it fails; both compute the
    same gradients. When both fail differently, the error names `loop`; the same error from both
    is the model's own and is raised as it is.
    """
    cols = _all_columns(run.op, columns)
    if cols.shape[1] == 0:
        return run.op.new_zeros(run.op.shape[0], 0)
    basis = _one_hot_cotangents(run.op, cols)
    ways = [_batched_by_func, _batched_by_autograd]
    if torch.is_autocast_enabled(run.x.device.type):
        ways.reverse()
    try:
        return ways[0](run, basis)
    except RuntimeError as err:
        try:
            return ways[1](run, basis)
        except RuntimeError as other:
            if str(other) == str(err):  # the model's own error, not a vmap's
                raise err from None
        raise RuntimeError(
            f"gq_loss: method='batched' could not batch the backward passes of this model ({err}); "
            "use method='loop' (or 'recompute')"
        ) from err


def _batched_by_autograd(run: GradientPass, basis: Tensor) -> Tensor:
    parts = []
    step = run.chunk_size or basis.shape[0]
    for start in range(0, basis.shape[0], step):
        (grad,) = torch.autograd.grad(
            run.op,
            run.x,
            basis[start : start + step],
            retain_graph=True,
            create_graph=run.create_graph,
            is_grads_batched=True,
            allow_unused=True,
            materialize_grads=True,
        )
        parts.append(norm_rows(grad, run.p, start_dim=2).T)
    return torch.cat(parts, dim=1)


def _batched_by_func(run: GradientPass, basis: Tensor) -> Tensor:
    def row_norms(cotangent: Tensor) -> Tensor:
        (grad,) = torch.autograd.grad(
            run.op,
            run.x,
            cotangent,
            retain_graph=True,
            create_graph=run.create_graph,
            allow_unused=True,
            materialize_grads=True,
        )
        return norm_rows(grad, run.p)

    norms: Tensor = torch.func.vmap(row_norms, chunk_size=run.chunk_size)(basis).T
    return norms


def _norms_jacrev(run: GradientPass, columns: Tensor | None) -> Tensor:
    cols = _all_columns(run.op, columns)
    if cols.shape[1] == 0:
        return run.op.new_zeros(run.op.shape[0], 0)
    basis = _one_hot_cotangents(run.op, cols)
    pullback = run.state

    def row_norms(cotangent: Tensor) -> Tensor:
        (grad,) = pullback(cotangent)
        return norm_rows(grad, run.p)

    # The pullback runs under the autocast state of the forward pass (the caller's), as `loop`'s
    # backward passes do. Without create_graph the outer autograd records nothing (the
    # pullback's own level still differentiates: torch.func ignores an outer no_grad).
    device = run.x.device.type
    mixed = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    outer = contextlib.nullcontext() if run.create_graph else torch.no_grad()
    with _func_errors("the per-class backward passes", any_error=True), outer:
        try:
            norms = torch.func.vmap(row_norms, chunk_size=run.chunk_size)(basis).T
        except RuntimeError as err:
            # Under autocast, torch 2.13's batching rule of the BatchNorm backward multiplies
            # the half-precision gradient by the float32 weight and hands the float32 product
            # to a kernel that wants the input's dtype. The same pullback, one class at a time,
            # runs the unbatched kernel, which takes mixed dtypes.
            if not (mixed and _MIXED_DTYPES in str(err)):
                raise
            norms = torch.stack([row_norms(c) for c in basis], dim=1)
    return norms if run.create_graph else norms.detach()


_MIXED_DTYPES = "expected scalar type"


@contextmanager
def _func_errors(stage: str, any_error: bool = False) -> Iterator[None]:
    """Re-raises `torch.func`'s refusals with their cause and what to do instead.

    In the forward pass only errors that name a transform are translated (a model's own error
    stays as it is); in the vmapped backward every error is, since autograd ran that forward.
    """
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        markers = (
            "transform",
            "vmap",
            "functorch",
            "captured",
            "Batching rule",
            "setup_context",
            "saved tensor hooks",
        )
        if not any_error and not any(m in text for m in markers):
            raise
        prefix = f"gq_loss: method='jacrev' could not run {stage} of this model under torch.func"
        function = _function_of(err) if "setup_context" in text else None
        if function is CheckpointFunction:
            raise RuntimeError(
                f"{prefix}: the model uses torch.utils.checkpoint with use_reentrant=True "
                f"({text}); use use_reentrant=False with method='loop', 'recompute' or 'batched' "
                "(torch.func takes no checkpointing)"
            ) from err
        if "setup_context" in text:
            which = "in this model" if function is None else function.__name__
            raise RuntimeError(
                f"{prefix}: the custom autograd.Function {which} has no setup_context "
                f"staticmethod, which torch.func needs ({text}); use method='loop', 'recompute' "
                "or 'batched', which run it as it is, or give it a setup_context (PyTorch's "
                "'Extending torch.func with autograd.Function')"
            ) from err
        if "saved tensor hooks" in text:
            raise RuntimeError(
                f"{prefix}: the model uses torch.utils.checkpoint with use_reentrant=False, which "
                "runs on saved tensor hooks that torch.func does not take (Hugging Face's "
                f"activation_checkpointing_enable() is such checkpointing) ({text}); use "
                "method='loop', 'recompute' or 'batched', which run checkpointed models"
            ) from err
        raise RuntimeError(
            f"{prefix} ({text}); use method='loop' (or 'recompute'), which run any model "
            "autograd can differentiate"
        ) from err


def _function_of(err: BaseException) -> type | None:
    """The `autograd.Function` whose `apply` raised `err` (from the traceback), if any."""
    tb = err.__traceback__
    found = None
    while tb is not None:
        cls = tb.tb_frame.f_locals.get("cls") if tb.tb_frame.f_code.co_name == "apply" else None
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
            found = cls
        tb = tb.tb_next
    return found


@dataclass(frozen=True)
class _Backend:
    """How one method runs the forward pass and turns it into norms `(B, K)`."""

    forward: Callable[[GradientPass], tuple[Tensor, Tensor]]
    norms: Callable[[GradientPass, Tensor | None], Tensor]


_BACKENDS: dict[str, _Backend] = {
    "loop": _Backend(_plain_forward, _norms_loop),
    "recompute": _Backend(_plain_forward, _norms_recompute),
    "batched": _Backend(_plain_forward, _norms_batched),
    "jacrev": _Backend(_func_forward, _norms_jacrev),
}
#: The values of `method`: `"auto"` and every backend.
GRADIENT_METHODS: tuple[str, ...] = ("auto", *_BACKENDS)
