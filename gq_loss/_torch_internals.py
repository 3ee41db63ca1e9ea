"""Every private PyTorch name gq-loss touches, and every PyTorch message it matches as text.

Package-internal, after einops' `_torch_specific.py`: a torch upgrade means reading this module
(and `_fsdp.py`, the FSDP2 seam, which names its own). Everything here was read from torch
2.13.0; each entry says why the public API does not suffice.

Private names and process-wide switches:

| touch | where in torch | why |
|---|---|---|
| `torch.utils.checkpoint._checkpoint_without_reentrant_generator`, replaced while a GQ pass runs (`differentiable_forward`) | `torch/utils/checkpoint.py`; `checkpoint()` looks it up at each call | a non-reentrant checkpointed region recomputes in the caller's `backward()`, outside GQ's scope, so its fused attention would save other tensors than GQ's math-backend forward did; the wrapper recomputes inside the scope |
| `"torch._dynamo" in sys.modules` (`dynamo_loaded`) | `torch/_dynamo` | `torch.compiler.disable` and `set_stance` import dynamo (about a second); nothing can be compiled before it is loaded, so a program that never compiles never pays |
| `sdpa_kernel(SDPBackend.MATH)` (`differentiable_forward`) | `torch/nn/attention/__init__.py`; a process-wide flag | the fused attention kernels have no double backward; documented in `docs/models.md`, "Known limits" |
| `node._forward_cls` (`forward_class`) | the backward node of a custom `autograd.Function` | the only link from a graph node to its Function, whose name PyTorch's message leaves out |
| `once_differentiable(...).__code__` identity (`is_once_differentiable`) | `torch/autograd/function.py`: every `@once_differentiable` backward is the same inner `wrapper` code | no flag marks such a Function; its backward's code object does |
| traceback frame locals `cls` of `apply` (`function_of`) | `torch/autograd/function.py`, `Function.apply(cls, ...)` | torch.func's `setup_context` refusal does not name the Function |
| `torch.utils.checkpoint.CheckpointFunction` (`is_reentrant_checkpoint`) | the Function of `checkpoint(use_reentrant=True)` | tells reentrant checkpointing apart from other Functions without `setup_context` |
| `sys._getframe` walk (`user_stacklevel`) | CPython | a warning names the user's line, however deep inside gq_loss and torch it is raised |
| `Module._buffers`, read and assigned (`BufferSwap`) | `torch/nn/modules/module.py` | swaps every registered buffer (non-persistent ones and ones shared between modules included) for a scratch copy and puts the very same tensor back; `named_buffers()` deduplicates and `register_buffer` refuses a name once set |
| `Tensor._version` (`version`, `write_back`) | the version counter of a tensor | tells an in-place update that bumps it (`num_batches_tracked += 1`) from a fused kernel's that does not (BatchNorm's running statistics), and a parameter modified in place before `backward()` |
| `DistributedDataParallel.static_graph` (`ddp_static_graph`) | `torch/nn/parallel/distributed.py`, set in `__init__` | not a documented attribute; GQ's own backward passes would run DDP's one-time static-graph bookkeeping |
| `nn.modules.dropout._DropoutNd` (`DropoutNd`) | the base of every Dropout layer | which layers draw random numbers (`auto`'s cache key) |
| `_ContiguousConvolutions`, a `TorchFunctionMode` over GQ's CPU passes of channels_last models (`differentiable_forward(model, x)`) | public API; works around `aten::sum` over dim 0 of channels_last CPU tensors in BatchNorm's double backward | 10-40x slower than contiguous in torch 2.13 (`benchmarks/bench_amp.py --sum-check`); re-measure with `benchmarks/bench_layout.py` after an upgrade and drop it when the two layouts cost the same |
| autocast state (`autocast_state`, `autocast_as`, `autocast_disabled`) | `torch.is_autocast_enabled(device_type)`, `get_autocast_dtype`, `is_autocast_cache_enabled` | public, but per device type and kept here with the device types GQ knows |

PyTorch raises plain `RuntimeError`s for the refusals GQ translates, so their text is matched:
`TORCH_MESSAGES` holds every fragment (read from torch 2.13.0's messages), `torch_says` matches
one kind. `ONCE_DIFFERENTIABLE_MESSAGE` is the text of torch's own error for a Function marked
`@once_differentiable`, raised early by `_autograd.check_second_order` (torch raises it only in
a full `backward()`, or not at all under `vmap`).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parameter import is_lazy
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import CheckpointFunction

# --------------------------------------------------------------------------- matched messages

TorchMessage = Literal[
    "reentrant checkpoint",
    "non-leaf requires_grad",
    "no batching rule",
    "no second order",
    "mixed dtypes",
    "torch.func transform",
    "no setup_context",
    "saved tensor hooks",
    "torchscript node",
]

#: Fragments of torch 2.13.0's messages (and, for `"torchscript node"`, of its autograd node
#: names) that gq-loss recognises, by kind.
TORCH_MESSAGES: dict[TorchMessage, tuple[str, ...]] = {
    # checkpoint(use_reentrant=True) under torch.autograd.grad.
    "reentrant checkpoint": ("use_reentrant=True", "Checkpointing is not compatible with .grad()"),
    # Setting requires_grad on a non-leaf tensor (Hugging Face's audio feature encoders).
    "non-leaf requires_grad": ("you can only change requires_grad flags of leaf variables",),
    # `autograd.grad(is_grads_batched=True)` on an op with no batching rule.
    "no batching rule": ("Batching rule not implemented",),
    # An op with no double backward (a fused kernel, `torch.cdist`, a @once_differentiable one).
    "no second order": ("derivative for", "once_differentiable", "double backward"),
    # torch.func's batched BatchNorm backward under autocast.
    "mixed dtypes": ("expected scalar type",),
    # torch.func refusing a model in its forward pass.
    "torch.func transform": (
        "transform",
        "vmap",
        "functorch",
        "captured",
        "Batching rule",
        "setup_context",
        "saved tensor hooks",
    ),
    # A custom autograd.Function without the setup_context staticmethod, under torch.func.
    "no setup_context": ("setup_context",),
    # Non-reentrant checkpointing (saved tensor hooks) under torch.func.
    "saved tensor hooks": ("saved tensor hooks",),
    # The TorchScript executor's nodes (`DifferentiableGraphBackward`, `torch::jit::...`).
    "torchscript node": ("torch::jit::",),
}

#: torch's message for differentiating a `@once_differentiable` backward twice.
ONCE_DIFFERENTIABLE_MESSAGE = (
    "trying to differentiate twice a function that was marked with @once_differentiable"
)


def torch_says(text: str | BaseException, kind: TorchMessage) -> bool:
    """Whether `text` (a message, or an error's) holds one of the fragments of `kind`."""
    message = text if isinstance(text, str) else str(text)
    return any(fragment in message for fragment in TORCH_MESSAGES[kind])


# --------------------------------------------------------------------------- compile, attention


def dynamo_loaded() -> bool:
    """Whether `torch._dynamo` is imported (nothing can have been compiled before)."""
    return "torch._dynamo" in sys.modules


@contextmanager
def differentiable_forward(model: Any = None, x: Tensor | None = None) -> Iterator[None]:
    """The context of GQ's differentiated forward passes (ordinary pass, `jacrev`, the replay).

    PyTorch's fused attention kernels (flash and memory-efficient on CUDA, the flash kernel on
    CPU) have no double backward; its math backend is built from ordinary differentiable ops and
    computes the same attention. `torch.compile`'s graphs have no double backward either: with
    `torch._dynamo` loaded (nothing can be compiled without it, and importing it costs seconds),
    compiled code runs eagerly here, on the same parameters. Only code inside this context is
    affected; the caller's other forward passes keep their kernels. Both switches are
    process-wide (PyTorch keeps them so): other threads' forward passes are affected while the
    context is open (documented in `docs/models.md`, "Known limits"). Non-reentrant checkpointed
    regions entered here are recomputed in this context too, even in the caller's `backward()`.
    Given the pass's `model` and inputs `x`, where `channels_last_on_cpu(model, x)`, its
    convolutions run on contiguous copies of their channels_last operands
    (`_ContiguousConvolutions`).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if dynamo_loaded():
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        stack.enter_context(_checkpoints_recompute_inside())
        if x is not None and channels_last_on_cpu(model, x):
            stack.enter_context(_ContiguousConvolutions())
        yield


_CONVOLUTIONS = frozenset(
    (torch.conv2d, torch.conv3d, torch.conv_transpose2d, torch.conv_transpose3d)
)


def channels_last_on_cpu(model: Any, x: Tensor) -> bool:
    """Whether a GQ pass of `model` on `x` would run CPU convolutions in channels_last: `x` on
    the CPU, and `x` or a 4-D/5-D parameter of `model` not in the default (contiguous) layout."""
    if x.device.type != "cpu":
        return False
    params = model.parameters() if isinstance(model, nn.Module) else ()
    return any(
        not is_lazy(t) and t.dim() in (4, 5) and not t.is_contiguous()
        for t in itertools.chain((x,), params)
    )


class _ContiguousConvolutions(TorchFunctionMode):
    """Convolutions of a GQ pass on contiguous copies of their 4-D/5-D CPU operands.

    A convolution's output follows its operands' layout, so the whole pass, and every backward
    pass through it, then runs in the default layout. BatchNorm's train-mode double backward
    sums over the batch dimension one dimension at a time, and torch 2.13's CPU reduction over
    dim 0 of a channels_last tensor is 10-40x slower than of a contiguous one: exact GQ on a
    channels_last CNN ran 1.13-2.29x faster this way, and on ResNet-18 its float32 gradient was
    1.9e-6 off float64 instead of 1.5e-2 (`benchmarks/bench_layout.py`). The copies are
    differentiable, so gradients reach the parameters in their own layout.
    """

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _CONVOLUTIONS:
            args = [_contiguous(a) for a in args]
            kwargs = {k: _contiguous(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _contiguous(value: Any) -> Any:
    if isinstance(value, Tensor) and value.dim() in (4, 5) and value.device.type == "cpu":
        return value.contiguous()
    return value


# torch.utils.checkpoint's non-reentrant implementation; `checkpoint()` looks it up at each call.
_CHECKPOINT_GENERATOR = "_checkpoint_without_reentrant_generator"
_checkpoint_lock = threading.Lock()
_checkpoint_users = 0
_checkpoint_original: Any = None


@contextmanager
def _checkpoints_recompute_inside() -> Iterator[None]:
    """Non-reentrant `torch.utils.checkpoint` regions entered here also recompute in this scope.

    `checkpoint()` runs a region again when a backward pass reaches it, restoring the RNG and
    autocast state of its forward but not the attention backend: in the caller's `backward()`,
    outside GQ's scope, SDPA would recompute on its fused kernel, save other tensors than the
    forward's math backend did, and fail. So, while a GQ pass runs, `checkpoint()` is handed a
    recomputation function wrapped into `differentiable_forward` (its forward runs the region
    itself, already inside it); regions entered in the caller's own forward passes are left as
    they are. Nested and concurrent scopes share one patch, removed when the last one exits.
    """
    global _checkpoint_users, _checkpoint_original
    module = torch.utils.checkpoint
    with _checkpoint_lock:
        if _checkpoint_users == 0:
            original = getattr(module, _CHECKPOINT_GENERATOR, None)
            if original is not None:
                _checkpoint_original = original
                setattr(module, _CHECKPOINT_GENERATOR, _recomputing_inside(original))
        _checkpoint_users += 1
    try:
        yield
    finally:
        with _checkpoint_lock:
            _checkpoint_users -= 1
            if _checkpoint_users == 0 and _checkpoint_original is not None:
                setattr(module, _CHECKPOINT_GENERATOR, _checkpoint_original)
                _checkpoint_original = None


def _recomputing_inside(generator: Any) -> Any:
    """`generator` whose first argument, the function it recomputes in backward, runs in our
    scope (`checkpoint()` runs the forward itself, already inside it)."""

    def wrapped(fn: Any, *args: Any, **kwargs: Any) -> Any:
        def recompute(*fn_args: Any, **fn_kwargs: Any) -> Any:
            with differentiable_forward():
                return fn(*fn_args, **fn_kwargs)

        return generator(recompute, *args, **kwargs)

    return wrapped


# --------------------------------------------------------------------------- autograd Functions

_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx: None).__code__


def forward_class(node: Any) -> type | None:
    """The custom `autograd.Function` whose backward `node` (a graph node) runs, or `None`."""
    cls = getattr(node, "_forward_cls", None)
    return cls if isinstance(cls, type) else None


def is_once_differentiable(node: Any) -> bool:
    """Whether `node` runs the backward of a Function marked `@once_differentiable`."""
    backward = getattr(forward_class(node), "backward", None)
    return getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE


def function_of(err: BaseException) -> type | None:
    """The `autograd.Function` whose `apply` raised `err` (from the traceback), if any."""
    tb = err.__traceback__
    found = None
    while tb is not None:
        cls = tb.tb_frame.f_locals.get("cls") if tb.tb_frame.f_code.co_name == "apply" else None
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
            found = cls
        tb = tb.tb_next
    return found


def is_reentrant_checkpoint(function: type | None) -> bool:
    """Whether `function` is the Function of `torch.utils.checkpoint(use_reentrant=True)`."""
    return function is CheckpointFunction


# --------------------------------------------------------------------------- frames


def user_stacklevel() -> int:
    """`stacklevel` for a `warnings.warn` in the caller of this function: that of the first
    frame outside gq_loss and torch (a warning names the user's line)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").split(".")[0] in (
        "gq_loss",
        "torch",
    ):
        frame, level = frame.f_back, level + 1
    return level


# --------------------------------------------------------------------------- buffers, versions


def version(tensor: Tensor) -> int:
    """The version counter of `tensor` (bumped by every in-place op autograd sees)."""
    return int(tensor._version)


class BufferSwap:
    """Every registered buffer of `model` (each module's, `None` skipped), swapped for other
    tensors (`swap`) and put back as the very same tensors (`restore`).

    The one buffer-swapping mechanism of the package: `recompute`'s replay and `auto`'s probe.
    """

    def __init__(self, model: nn.Module) -> None:
        self.slots: list[tuple[nn.Module, str, Tensor]] = [
            (module, name, buf)
            for module in model.modules()
            for name, buf in module._buffers.items()
            if buf is not None
        ]

    def keys(self) -> list[tuple[nn.Module, str]]:
        """`(module, name)` of every slot, in order."""
        return [(module, name) for module, name, _ in self.slots]

    def originals(self) -> list[Tensor]:
        """The model's own buffers, in slot order."""
        return [buf for _, _, buf in self.slots]

    def swap(self, tensors: Sequence[Tensor]) -> None:
        """Registers `tensors` (one per slot, in order) in place of the buffers."""
        for (module, name, _), tensor in zip(self.slots, tensors, strict=True):
            module._buffers[name] = tensor

    def restore(self) -> None:
        """Puts the model's own buffers back."""
        self.swap(self.originals())

    @contextmanager
    def swapped(self, tensors: Sequence[Tensor]) -> Iterator[None]:
        """`swap(tensors)` inside the context, `restore()` on exit."""
        try:
            self.swap(tensors)
            yield
        finally:
            self.restore()


def write_back(
    named: list[tuple[str, Tensor]], scratch: dict[str, Tensor], versions: dict[str, int]
) -> None:
    """Writes the scratch buffers that a forward pass under `torch.func` changed into the
    model's buffers `named`; `versions` are the scratch copies' version counters as made.

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
    bumped = [(buf, scratch[n]) for n, buf in named if version(scratch[n]) != versions[n]]
    unbumped = [
        (buf, scratch[n]) for n, buf in named if version(scratch[n]) == versions[n] and buf.numel()
    ]
    with torch.no_grad():
        for buf, new in bumped:
            buf.copy_(new)
        if unbumped:
            differs = torch.stack([(buf != new).any().cpu() for buf, new in unbumped]).tolist()
            for (buf, new), changed in zip(unbumped, differs, strict=True):
                if changed:
                    buf.data.copy_(new)  # `.data`: a fresh version counter, the buffer's unmoved


# --------------------------------------------------------------------------- modules


#: The base class of every Dropout layer (`p` is its drop probability).
DropoutNd = nn.modules.dropout._DropoutNd


def ddp_static_graph(module: nn.Module) -> bool:
    """Whether `module` is a DistributedDataParallel built with `static_graph=True`."""
    return isinstance(module, nn.parallel.DistributedDataParallel) and bool(
        getattr(module, "static_graph", False)
    )


# --------------------------------------------------------------------------- autocast

#: Autocast settings of the device types recorded: (device type, enabled, dtype) each.
AutocastState = tuple[tuple[str, bool, torch.dtype], ...]
_AUTOCAST_KINDS = ("cpu", "cuda", "xpu", "mps", "hpu")


@contextmanager
def autocast_disabled() -> Iterator[None]:
    """Autocast off on every device type that has it (the CPU, CUDA and any other backend)."""
    with contextlib.ExitStack() as stack:
        for kind in _AUTOCAST_KINDS:
            if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
                stack.enter_context(torch.autocast(kind, enabled=False))
        yield


def autocast_state(device: torch.device) -> tuple[AutocastState, bool]:
    """Autocast of the CPU, of `device`'s type and of CUDA (when present), and the cache flag."""
    types = ["cpu", device.type]
    if torch.cuda.is_available():
        types.append("cuda")
    state = tuple(
        (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        for kind in dict.fromkeys(types)
        if torch.amp.is_autocast_available(kind)
    )
    return state, torch.is_autocast_cache_enabled()


@contextmanager
def autocast_as(recorded: tuple[AutocastState, bool]) -> Iterator[None]:
    """Re-enters a recorded autocast state, enabled or not, whatever the current one is."""
    state, cache = recorded
    with contextlib.ExitStack() as stack:
        for kind, enabled, dtype in state:
            stack.enter_context(
                torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=cache)
            )
        yield
