"""Small autograd helpers shared by the kernels' backends (package-internal)."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import torch
from torch import Tensor, nn

from ._errors import GQLossError
from ._runtime import unwrap_ddp
from ._torch_internals import (
    ONCE_DIFFERENTIABLE_MESSAGE,
    dynamo_loaded,
    forward_class,
    is_once_differentiable,
    torch_says,
)


def operand_of(logits: Tensor, operand: str, temperature: float) -> Tensor:
    """`softmax`/`log_softmax`/identity of `logits / T` in at least float32 `(B, N)`."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if operand == "softmax":
        return z.softmax(dim=1)
    if operand == "log_softmax":
        return z.log_softmax(dim=1)
    return z


def norm_rows(grad: Tensor, p: float, start_dim: int = 1) -> Tensor:
    """p-norms over the dims from `start_dim` on, accumulated in at least float32 (a bf16 or fp16
    model's input gradient gives float32 norms)."""
    flat = grad.flatten(start_dim)
    dtype = torch.float32 if flat.dtype in _LOW_PRECISION else None
    return torch.linalg.vector_norm(flat, ord=p, dim=start_dim, dtype=dtype)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def selected(op: Tensor, columns: Tensor | None) -> Tensor:
    return op if columns is None else op.gather(1, columns)


def input_grad(out: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    (grad,) = torch.autograd.grad(
        out,
        x,
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    return grad


_P = ParamSpec("_P")
_R = TypeVar("_R")
_EAGER: dict[Callable[..., Any], Callable[..., Any]] = {}
_GRAPH_BREAK = (
    "GQ runs its own forward and backward passes eagerly (a compiled graph has no double "
    "backward), so a call to it is a graph break: under torch.compile(fullgraph=True) compile the "
    "model instead (torch.compile(model), which GQ runs eagerly and the rest of the step "
    "compiled), drop fullgraph=True, or call GQ outside the compiled function"
)


def eager_under_compile(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """`fn`, run eagerly when `torch.compile` meets it: a clean graph break.

    GQ's passes differentiate the model twice, which compiled graphs cannot; inside `fn`,
    `differentiable_forward` also runs compiled submodules eagerly. Under `fullgraph=True`
    dynamo refuses the break with `_GRAPH_BREAK` as its reason. `torch.compiler.disable` is
    applied only once dynamo is loaded (`_torch_internals.dynamo_loaded`: nothing can be
    compiled before; importing it costs about a second), so a program that never compiles
    never imports it.
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not dynamo_loaded():
            return fn(*args, **kwargs)
        eager = _EAGER.get(fn)
        if eager is None:
            eager = _EAGER[fn] = torch.compiler.disable(fn, reason=_GRAPH_BREAK)
        result: _R = eager(*args, **kwargs)
        return result

    return wrapper


@contextmanager
def second_order_errors(graph: Tensor | None = None, x: Tensor | None = None) -> Iterator[None]:
    """Re-raises the model's refusals of GQ's (double) backward with what to do instead.

    `graph` (the logits) is searched, on error only, for custom `autograd.Function`s marked
    `@once_differentiable` between it and the inputs `x`, whose names PyTorch's own message
    leaves out.
    """
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, GQLossError):  # already translated
            raise
        text = str(err)
        if torch_says(text, "reentrant checkpoint"):
            raise GQLossError(
                "gq_loss: the model uses torch.utils.checkpoint with use_reentrant=True, which "
                "cannot give the input gradients GQ takes with torch.autograd.grad; use "
                f"torch.utils.checkpoint.checkpoint(..., use_reentrant=False) ({text})"
            ) from err
        if torch_says(text, "non-leaf requires_grad"):
            raise GQLossError(
                "gq_loss: the model sets requires_grad on a tensor computed from its inputs, which "
                "PyTorch refuses once the inputs require grad, as GQ's must. Hugging Face's audio "
                "models (Wav2Vec2, HuBERT, WavLM and others) do so in their feature encoder in "
                "train mode: call model.freeze_feature_encoder() before training with GQ (the "
                f"usual fine-tuning set-up; it stops training the convolutional encoder) ({text})"
            ) from err
        if torch_says(text, "no batching rule"):  # only `batched` vmaps outside torch.func
            raise GQLossError(
                "gq_loss: method='batched' runs the per-class backward passes under vmap, which "
                f"has no batching rule for an operation of this model ({text}); use method='loop' "
                "(or 'recompute'), which run them one class at a time"
            ) from err
        if torch_says(text, "no second order"):
            names = once_differentiable_functions(graph, x)
            which = (
                f"; custom autograd.Functions marked @once_differentiable: {names}" if names else ""
            )
            raise GQLossError(
                "gq_loss: GQ differentiates the model's input gradients w.r.t. its parameters, so "
                "it needs second derivatives through the model, and an operation in this model "
                f"has none ({text}{which}). GQ already runs PyTorch's attention on its math "
                "backend and compiled code eagerly; replace that operation by differentiable "
                "torch operations inside GQ's pass (a custom autograd.Function needs a backward "
                "made of differentiable torch ops, not marked @once_differentiable; a fused or "
                "custom kernel needs a plain-PyTorch fallback), or leave it out of the model GQ "
                "differentiates"
            ) from err
        raise


def graph_nodes(graph: Tensor | None) -> list[Any]:
    """Every node of `graph`'s autograd graph once, depth-first from its `grad_fn` (the root
    first)."""
    nodes: list[Any] = []
    if graph is None or graph.grad_fn is None:
        return nodes
    seen: set[Any] = set()
    stack: list[Any] = [graph.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return nodes


def graph_leaves(graph: Tensor) -> set[int]:
    """Ids of the leaf tensors (parameters, inputs) that `graph`'s autograd graph reaches."""
    leaves = (getattr(node, "variable", None) for node in graph_nodes(graph))  # AccumulateGrad
    return {id(leaf) for leaf in leaves if leaf is not None}


def once_differentiable_functions(graph: Tensor | None, x: Tensor | None) -> list[str]:
    """Names of the custom `autograd.Function`s marked `@once_differentiable` that GQ would
    differentiate twice: those in `graph`'s graph that lie on a path to the inputs `x`.

    GQ's input gradient runs the backward of every node between the logits and `x`, and its
    parameter gradient differentiates those backwards again. A node with no path to `x` (a
    straight-through estimator on the weights, say) is reached by the parameter gradient only,
    once, as in any training step. Without `x` every marked Function in the graph is named.
    """
    nodes = graph_nodes(graph)
    marked = [node for node in nodes if is_once_differentiable(node)]
    if marked and x is not None:
        reaches = _nodes_reaching(nodes, x)
        marked = [node for node in marked if node in reaches]
    return list(dict.fromkeys(getattr(forward_class(node), "__name__", "?") for node in marked))


def _nodes_reaching(nodes: list[Any], x: Tensor) -> set[Any]:
    """The nodes among `nodes` (a whole graph) from which the backward pass reaches `x`: its
    `grad_fn`, or the node that accumulates its gradient when it is a leaf."""

    def is_input(node: Any) -> bool:
        return node is x.grad_fn if x.grad_fn is not None else getattr(node, "variable", None) is x

    reaches: set[Any] = set()
    pending = [(nodes[0], False)] if nodes else []
    done: set[Any] = set()
    while pending:  # iterative post-order: a node is decided after all of its children
        node, children_done = pending.pop()
        if node in done:
            continue
        if is_input(node):
            reaches.add(node)  # GQ's input gradient stops here: nothing beyond is twice
            done.add(node)
            continue
        if not children_done:
            pending.append((node, True))
            pending.extend(
                (child, False)
                for child, _ in node.next_functions
                if child is not None and child not in done
            )
            continue
        done.add(node)
        if any(child in reaches for child, _ in node.next_functions):
            reaches.add(node)
    return reaches


def torchscript_nodes(graph: Tensor | None) -> list[str]:
    """Names of the TorchScript executor's nodes in `graph`'s autograd graph.

    A `@torch.jit.script` or `torch.jit.trace` function (or module) called by the forward pass
    runs its optimised graph from its second call on, recorded as one
    `DifferentiableGraphBackward` node: `vmap` and `torch.func` cannot see into it, so the
    vmapped methods would come back with a wrong parameter gradient or none.
    """
    names = (node.name() for node in graph_nodes(graph))
    return list(dict.fromkeys(name for name in names if torch_says(name, "torchscript node")))


# Models (by identity) whose second derivative `check_second_order` has taken, with weak
# references to their modules at that time: a model whose modules changed is probed again.
_PROBED: weakref.WeakKeyDictionary[Any, tuple[weakref.ref[Any], ...]] = weakref.WeakKeyDictionary()


def check_second_order(
    model: Any, logits: Tensor, value: Tensor, x: Tensor, *, probe: bool = True
) -> None:
    """Raises now what GQ's parameter gradient through `value` would raise later, or drop.

    Two kinds of operation have no second derivative. Custom Functions marked
    `@once_differentiable` fail only in a full `backward()`, or not at all under `vmap` (their
    terms would be dropped), so the forward graph of `logits` is searched for them on every
    call, between the logits and the inputs `x` (only there does GQ differentiate twice): it is
    this call's graph, whatever changed in the model. Those whose double backward is missing
    (fused kernels, `torch.cdist`) fail when it runs: with `probe`, one second derivative of
    `value` w.r.t. `x` is taken (every double backward between the inputs and the logits; for
    one class, about 1/N of a GQ backward), once per model and again after its modules change
    (a swapped submodule). Call inside `second_order_errors`.
    """
    if once_differentiable_functions(logits, x):
        raise RuntimeError(ONCE_DIFFERENTIABLE_MESSAGE)
    if not probe or not value.requires_grad:
        return
    key = unwrap_ddp(model)
    modules = tuple(weakref.ref(m) for m in key.modules()) if isinstance(key, nn.Module) else ()
    try:
        if _PROBED.get(key) == modules:
            return
    except TypeError:  # not weak-referenceable: probe every time
        key = None
    torch.autograd.grad(value.sum(), x, retain_graph=True, allow_unused=True)
    if key is not None:
        _PROBED[key] = modules


def hand_over(
    value: Tensor,
    logits: Tensor,
    targets: Sequence[Tensor],
    check: Callable[[Sequence[Tensor | None]], None] | None = None,
) -> Tensor:
    """`value` (a scalar with GQ's graph) with its gradient w.r.t. `targets` taken now.

    Returns a node, equal to `value`, whose backward hands `grad * d value / d target` to every
    target; `check` (when given) sees those gradients first and may raise. `logits` is an input
    of the node only so that the forward graph (and FSDP's gradient hooks in it) runs after it.
    Used under FSDP2 (`_fsdp`) and for float16 models, whose GQ gradient is checked for
    overflow before it can reach `.grad` (`loss.py`).
    """
    if not value.requires_grad:  # nothing to train
        return value
    grads = torch.autograd.grad(value, list(targets), retain_graph=True, allow_unused=True)
    if check is not None:
        check(grads)
    out: Tensor = _HandOver.apply(value.detach(), grads, logits, *targets)
    return out


class _HandOver(torch.autograd.Function):
    """Identity on GQ's value; backward returns `grad * d value/d target` for every target.

    `logits` is an input only so that the forward graph runs after this node; it gets no
    gradient from here.
    """

    @staticmethod
    def forward(
        ctx: Any,
        value: Tensor,
        grads: Sequence[Tensor | None],
        logits: Tensor,
        *targets: Tensor,
    ) -> Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise GQLossError(
                "gq_loss: GQ's gradient was taken within the call (FSDP2 or a float16 model) and "
                "is first-order only, got a backward with create_graph=True; call backward() "
                "without it"
            )
        grad = grad.detach()
        return (None, None, None, *(None if g is None else grad * g for g in ctx.grads))
