"""How `method="auto"` picks its method: a one-time timing per model and set-up.

Package-internal; `gq_loss.kernels` calls `auto_method` and re-exports `auto_choice` and
`AutoChoice`. Like `torch.backends.cudnn.benchmark`, the first call for a model and set-up times
the candidate methods on that call's batch (`_probe.probe`), checks each one's norms and
parameter gradient against `loop`'s, and caches the fastest that agrees; later calls look it
up. Each probe is logged (logger `"gq_loss"`, level INFO) with the choice and the time it took.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ._probe import ROUNDS, VMAP_MAX_CLASSES, AutoChoice, probe
from ._torch_internals import DropoutNd, autocast_state

logger = logging.getLogger("gq_loss")

#: Seconds the first shape's probe of a set-up times its candidates for, at least (in at least
#: `_probe.ROUNDS` rounds, at most `_probe.MAX_ROUNDS`).
PROBE_SECONDS = 0.5
#: Distinct input shapes timed per model and set-up. Only the first shape's probe takes extra
#: rounds up to `PROBE_SECONDS`; a later shape is timed (in `ROUNDS` rounds) only while the
#: set-up's probes have measured less than `SHAPES_SECONDS` in all (dynamic padding gives a new
#: shape every few batches). Shapes beyond either limit take the choice of the probed shape with
#: the nearest number of elements.
MAX_SHAPES = 8
SHAPES_SECONDS = 1.0

__all__ = ["ROUNDS", "VMAP_MAX_CLASSES", "AutoChoice", "auto_choice", "auto_method", "refuse"]


class _SetupChoices:
    """The choices of one model and set-up: `{input shape: choice}`, and the probes' seconds."""

    def __init__(self) -> None:
        self.shapes: dict[tuple[int, ...], AutoChoice] = {}
        self.spent = 0.0


class _ModelChoices:
    """The cached choices of one model by set-up, the latest one, and the methods a real call
    found unusable for the model (`refuse`)."""

    def __init__(self) -> None:
        self.by_setup: dict[tuple[Any, ...], _SetupChoices] = {}
        self.latest: AutoChoice | None = None
        self.refused: dict[str, str] = {}


# Weak keys: a model that is deleted takes its choices with it.
_CHOICES: weakref.WeakKeyDictionary[Any, _ModelChoices] = weakref.WeakKeyDictionary()


def auto_choice(model: Any) -> AutoChoice | None:
    """What `method="auto"` chose on the most recent call for `model`, or `None` before any.

    Args:
        model: The model passed to [`gq_loss`][gq_loss.gq_loss], [`GQLoss`][gq_loss.GQLoss] or
            [`class_gradient_norms`][gq_loss.class_gradient_norms] (the same object, e.g. the
            DistributedDataParallel wrapper when that was passed).

    Returns:
        The [`AutoChoice`][gq_loss.kernels.AutoChoice]: `method`, the probe's `seconds` per
        timed method, and the `excluded` methods with the reason.

    Examples:
        >>> from gq_loss import gq_loss
        >>> from gq_loss.kernels import auto_choice
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> value = gq_loss(model, torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]))
        >>> auto_choice(model).method in ("loop", "batched", "jacrev")
        True
    """
    try:
        entry = _CHOICES.get(model)
    except TypeError:  # not weak-referenceable: never recorded
        return None
    return None if entry is None else entry.latest


def auto_method(run: Any, chunk_size: int | None, width: int | None) -> str:
    """The method `auto` stands for in the `GradientPass` `run` (being built: `model`, `x`
    and the settings are set); records it for `auto_choice`.

    `width` is the number of classes per sample the pass will be asked for (`None`: all).
    """
    model = run.model
    choice = _fixed_choice(model, chunk_size)
    if choice is None:
        entry = _CHOICES.setdefault(model, _ModelChoices())
        choices = entry.by_setup.setdefault(_setup(run, width), _SetupChoices())
        shape = tuple(run.x.shape)
        choice = choices.shapes.get(shape)
        if (
            choice is None
            and choices.shapes
            and (len(choices.shapes) >= MAX_SHAPES or choices.spent >= SHAPES_SECONDS)
        ):
            choice = choices.shapes[_nearest(choices.shapes, shape)]
        if choice is None:
            choice = _traceless_fallback(model)
        if choice is None:
            start = time.perf_counter()
            first = not choices.shapes
            choice, keep, spent = probe(
                run, width, PROBE_SECONDS if first else 0.0, dict(entry.refused)
            )
            choices.spent += spent
            if keep:
                choices.shapes[shape] = choice
            _log_probe(model, shape, choice, time.perf_counter() - start)
    _record(model, choice)
    return choice.method


def refuse(model: Any, method: str, reason: str) -> None:
    """Records that a real call found `method`, which `auto` chose for `model`, unusable there
    (`reason`): that call and every later one of the model runs `loop` instead."""
    entry = _CHOICES.get(model)
    if entry is None:
        return
    entry.refused[method] = reason
    for choices in entry.by_setup.values():
        for shape, choice in choices.shapes.items():
            if choice.method == method:
                choices.shapes[shape] = AutoChoice(
                    "loop", choice.seconds, choice.excluded | {method: reason}
                )
    if entry.latest is not None and entry.latest.method == method:
        entry.latest = AutoChoice(
            "loop", entry.latest.seconds, entry.latest.excluded | {method: reason}
        )


def _setup(run: Any, width: int | None) -> tuple[Any, ...]:
    """The cache key of a call besides its input shape: which modules train and which Dropout
    layers draw (a Dropout's `p` of 0 or 1 draws nothing), dtype, device, autocast, and the
    call's settings."""
    modules = list(run.model.modules())
    return (
        tuple(m.training for m in modules),
        tuple(0 < m.p < 1 for m in modules if isinstance(m, DropoutNd)),
        run.x.dtype,
        run.x.device,
        autocast_state(run.x.device),
        run.create_graph,
        run.input_grad,
        run.operand,
        run.p,
        width,
    )


def _nearest(shapes: dict[tuple[int, ...], AutoChoice], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The probed shape with the number of elements nearest to `shape`'s (the first on ties)."""
    size = math.prod(shape)
    return min(shapes, key=lambda s: abs(math.prod(s) - size))


def _traceless_fallback(model: nn.Module) -> AutoChoice | None:
    """`loop`, with the reason, for models the probe cannot run without leaving a trace; `None`
    where it can. Not cached: the next call looks again."""
    reason = None
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    for name, tensor in tensors:
        if is_lazy(tensor):
            reason = (
                f"the model has lazy modules not yet initialised ({name}): the probe's forward "
                "pass would initialise them, drawing their initial values from the RNG; this "
                "call runs loop and the next one is timed"
            )
            break
        if tensor.grad_fn is not None:
            reason = (
                f"{name} is computed from a graph of the caller (fast weights, as in MAML): "
                "the probe's backward pass would run into that graph and free it"
            )
            break
    if reason is None:
        return None
    return AutoChoice("loop", excluded=dict.fromkeys(("batched", "jacrev"), reason))


def _log_probe(model: Any, shape: tuple[int, ...], choice: AutoChoice, took: float) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    times = ", ".join(f"{m} {1e3 * t:.3g} ms" for m, t in choice.seconds.items())
    left_out = "; ".join(f"{m}: {r}" for m, r in choice.excluded.items())
    logger.info(
        "method='auto' chose %r for %s with inputs %s in %.2f s (once per model and set-up; "
        "pass an explicit method to skip it)%s%s",
        choice.method,
        type(model).__name__,
        shape,
        took,
        f"; median step: {times}" if times else "",
        f"; left out: {left_out}" if left_out else "",
    )


def _record(model: Any, choice: AutoChoice) -> None:
    try:
        _CHOICES.setdefault(model, _ModelChoices()).latest = choice
    except TypeError:  # not weak-referenceable
        pass


def _fixed_choice(model: Any, chunk_size: int | None) -> AutoChoice | None:
    """The choice of set-ups that leave one method, without timing; `None` where timing decides."""
    if chunk_size is not None:
        reason = "chunk_size is given: recompute is the method that bounds memory"
        return AutoChoice(
            "recompute", excluded=dict.fromkeys(("loop", "batched", "jacrev"), reason)
        )
    if torch.are_deterministic_algorithms_enabled():
        reason = (
            "torch.use_deterministic_algorithms(True): the method must not depend on timings "
            "(the methods add the same terms in different orders)"
        )
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        reason = "a DistributedDataParallel model: loop is the method tested with it"
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        reason = (
            "a multi-process run: every process must choose alike, and timing would run the "
            "model's collective operations"
        )
    elif not isinstance(model, nn.Module):
        reason = "not an nn.Module: its state could not be restored after timing"
    else:
        return None
    return AutoChoice("loop", excluded=dict.fromkeys(("batched", "jacrev"), reason))
