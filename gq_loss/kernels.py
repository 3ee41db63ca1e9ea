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
| `batched` | `torch.func.vmap` of one `autograd.grad` over the one-hot class cotangents, or `autograd.grad(is_grads_batched=True)` (vmap over the backward; see `_backends._norms_batched`), `chunk_size` classes at a time | grows with N; the vmapped backward holds its classes at once (1.6-4.3x `loop`'s peak, measured on CPU at N = 10 and 100) |
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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ._auto import AutoChoice, auto_choice, auto_method, refuse
from ._autograd import (
    check_second_order,
    eager_under_compile,
    operand_of,
    second_order_errors,
    torchscript_nodes,
)
from ._backends import BACKENDS, GRADIENT_METHODS, TorchScriptInside, plain_forward
from ._fsdp import full_parameters, gather_parameters
from ._gq_settings import OPERANDS, Method, NormSettings, Operand, norm_settings
from ._plan import plan_method
from ._runtime import OutputSpec, check_inputs, place_inputs
from ._torch_internals import differentiable_forward
from ._validation import check_class_indices

__all__ = ["GRADIENT_METHODS", "OPERANDS", "AutoChoice", "auto_choice", "class_gradient_norms"]


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
        GQLossError: (a `RuntimeError`) `method="jacrev"` on a model `torch.func` cannot
            transform; a model with an operation that has no second derivative (with
            `create_graph=True`), or with reentrant checkpointing (the messages say what to use
            instead).

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
        settings = norm_settings(
            operand=operand,
            temperature=temperature,
            p=p,
            method=method,
            chunk_size=chunk_size,
            output=output,
        )
        run = GradientPass(
            model,
            inputs,
            settings,
            create_graph=create_graph and tracking,
            width=classes.shape[1] if isinstance(classes, Tensor) and classes.ndim == 2 else None,
        )
        if classes is not None:
            batch, num_classes = run.logits.shape
            check_class_indices("classes", classes, batch, num_classes, ndim=2, model=model)
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
    `autograd_enabled()`): takes the validated `settings`, plans the method for the model
    (`_plan.plan_method`; `auto` is resolved by `_auto.auto_method`), runs the model once and
    keeps `x` (the tracked inputs `(B, *)`), `logits` `(B, N)` and `op` (the operand `(B, N)`
    in float32 or wider). `norms(columns)` then asks the method's backend for the norms.

    The forward pass runs under `differentiable_forward()` (math attention, compiled code run
    eagerly: both have a double backward; CPU convolutions in the default layout), and the
    model's refusals of GQ's backward passes come back as errors that say what to do.
    """

    def __init__(
        self,
        model: Callable[[Tensor], Any],
        inputs: Tensor,
        settings: NormSettings,
        *,
        create_graph: bool,
        width: int | None = None,
    ) -> None:
        self.settings = settings
        self.output = settings.output
        self.operand = settings.operand
        self.temperature = settings.temperature
        self.p = settings.p
        self.method = plan_method(settings.resolved, model)
        self.chunk_size = settings.chunk_size
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
        self.auto = settings.method == "auto"
        if self.auto:
            self.method = auto_method(self, settings.chunk_size, width)
        self.backend = BACKENDS[self.method]
        self.state: Any = None  # what the backend's forward keeps for its norms
        with second_order_errors(), differentiable_forward(model, self.x):
            try:
                self.logits, self.op = self.backend.forward(self)
            except TorchScriptInside as found:  # jacrev's forward, stopped before any effect
                self._leave_for_loop(found.names)
                self.logits, self.op = plain_forward(self)
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
        self.backend = BACKENDS["loop"]

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
