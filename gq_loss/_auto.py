"""How `method="auto"` picks its method: a one-time timing per model and set-up.

Package-internal; `gq_loss.kernels` calls `auto_method` and re-exports `auto_choice` and
`AutoChoice`. Like `torch.backends.cudnn.benchmark`, the first call for a model and set-up times
the candidate methods on that call's batch and caches the fastest; later calls look it up.
"""

from __future__ import annotations

import statistics
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._autograd import differentiable_forward
from ._recompute import get_autocast_state, get_rng_state
from ._validation import call_model, check_logits

#: `batched` and `jacrev` differentiate every class of a sample at once; above this many classes
#: per sample `auto` does not consider them (and does not pay for timing them).
VMAP_MAX_CLASSES = 32
#: Timed rounds of the candidates after a warm-up round: at least `ROUNDS`, and more, up to
#: `MAX_ROUNDS`, until the timed runs took `PROBE_SECONDS` (cheap steps are noisy). Each round
#: starts with another method, so no method always runs first.
ROUNDS = 3
MAX_ROUNDS = 15
PROBE_SECONDS = 0.5
#: A method more than this many times slower than the fastest in the first timed round is not
#: timed again.
DROP_FACTOR = 2.0
#: Distinct input shapes timed per model and set-up; later shapes reuse the first one's choice.
MAX_SHAPES = 8


@dataclass(frozen=True)
class AutoChoice:
    """What `method="auto"` chose for a model and set-up, and why.

    Attributes:
        method: The method that ran: `"loop"`, `"batched"`, `"jacrev"` or `"recompute"`.
        seconds: Median time of one step (forward, norms and, when training, the parameter
            gradient through them) per method the timing probe measured; empty when nothing
            needed timing.
        excluded: The methods `auto` did not consider or that failed in the probe, each with
            the reason.
    """

    method: str
    seconds: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)


class _ModelChoices:
    """The cached choices of one model: `{set-up: {input shape: choice}}` and the latest one."""

    def __init__(self) -> None:
        self.by_setup: dict[tuple[Any, ...], dict[tuple[int, ...], AutoChoice]] = {}
        self.latest: AutoChoice | None = None


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
        setup = (
            sum(m.training for m in model.modules()),  # the modes
            run.x.dtype,
            run.x.device,
            get_autocast_state(run.x.device),
            run.create_graph,
            run.input_grad,
            run.operand,
            run.p,
            width,
        )
        shape = tuple(run.x.shape)
        entry = _CHOICES.setdefault(model, _ModelChoices())
        shapes = entry.by_setup.setdefault(setup, {})
        choice = shapes.get(shape)
        if choice is None and len(shapes) >= MAX_SHAPES:
            choice = next(iter(shapes.values()))
        if choice is None:
            choice, keep = _probe(run, width)
            if keep:
                shapes[shape] = choice
    _record(model, choice)
    return choice.method


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


def _probe(run: Any, width: int | None) -> tuple[AutoChoice, bool]:
    """Times the candidate methods on `run`'s batch; `(choice, cacheable)`.

    The probe leaves no trace on the model or the caller: it runs on the batch detached from any
    graph of the caller, against scratch copies of the buffers (BatchNorm statistics do not
    move), with the global RNG forked (the caller's next random numbers are those it would have
    drawn anyway), and takes the parameter gradient with `torch.autograd.grad` (no `.grad` is
    written). Warnings raised inside are not shown; the real call shows its own.
    """
    model: nn.Module = run.model
    x = run.x.detach()
    device = x.device
    excluded: dict[str, str] = {}
    with warnings.catch_warnings(), _isolated(model, device):
        warnings.simplefilter("ignore")
        before = get_rng_state(device)
        try:
            with torch.no_grad(), differentiable_forward():
                logits = call_model(model, x, run.output)
                check_logits(logits, x.shape[0])
        except Exception:  # the call itself will fail, with its own error
            return AutoChoice("loop"), False
        random = not _same_rng(before, get_rng_state(device))
        num_classes = logits.shape[1]
        width = num_classes if width is None else min(width, num_classes)
        candidates = ["loop"]
        if width > VMAP_MAX_CLASSES:
            reason = (
                f"{width} classes per sample, more than {VMAP_MAX_CLASSES}: the vmapped methods "
                "differentiate them all at once"
            )
            excluded |= dict.fromkeys(("batched", "jacrev"), reason)
        else:
            candidates.append("batched")
            if random:
                excluded["jacrev"] = (
                    "the forward pass draws random numbers (Dropout in train mode), which "
                    "torch.func may draw in another order than the other methods"
                )
            else:
                candidates.append("jacrev")
        if len(candidates) == 1:
            return AutoChoice("loop", excluded=excluded), True
        columns = (
            None
            if width == num_classes
            else torch.arange(width, device=device).expand(x.shape[0], width)
        )
        params = [q for q in model.parameters() if q.requires_grad]

        def step(method: str) -> None:
            probe = type(run)(
                model,
                x,
                operand=run.operand,
                temperature=run.temperature,
                p=run.p,
                method=method,
                chunk_size=None,
                create_graph=run.create_graph,
                output=run.output,
            )
            norms = probe.norms(columns)
            if norms.requires_grad and params:
                torch.autograd.grad(norms.sum(), params, allow_unused=True)

        times = _time(step, candidates, device, excluded)
    if times is None:  # loop runs what autograd runs: the model itself fails
        return AutoChoice("loop", excluded=excluded), False
    if not next(iter(times.values())):  # every other method was left out: nothing to compare
        return AutoChoice("loop", excluded=excluded), True
    # Each method's share of its round's time, median over the rounds: the methods of one round
    # run back to back, so a change in the machine's load between rounds cancels.
    totals = [sum(ts) for ts in zip(*times.values(), strict=True)]
    share = {
        m: statistics.median(t / s for t, s in zip(ts, totals, strict=True))
        for m, ts in times.items()
    }
    medians = {m: statistics.median(ts) for m, ts in times.items()}
    return AutoChoice(min(share, key=share.__getitem__), medians, excluded), True


def _time(
    step: Callable[[str], None], candidates: list[str], device: torch.device, excluded: dict
) -> dict[str, list[float]] | None:
    """Seconds of each candidate's timed rounds (loop first); `None` when loop fails.

    A warm-up round first (a failure there, or on CUDA more memory than is left free, leaves the
    method out, with the reason in `excluded`); then timed rounds, each started by another
    method. A method more than `DROP_FACTOR` times slower than the fastest in the first timed
    round is left out there, so a hopeless method is not timed again.
    """
    times: dict[str, list[float]] = {m: [] for m in candidates}
    marks: dict[str, int | None] = {}
    spent = 0.0
    for repeat in range(1 + MAX_ROUNDS):
        if len(times) == 1 or (repeat > ROUNDS and spent >= PROBE_SECONDS):
            break
        order = list(times)
        for method in order[repeat % len(order) :] + order[: repeat % len(order)]:
            try:
                seconds = _measure(step, method, device)
            except Exception as err:
                if method == "loop":
                    return None
                excluded[method] = f"failed: {type(err).__name__}: {err}"[:300]
                del times[method]
                continue
            if repeat:
                times[method].append(seconds)
                spent += seconds
            else:
                marks[method] = _memory_mark(device)
        if repeat == 0:
            _leave_out_memory_hungry(times, marks, _memory_free(device), excluded)
        if repeat == 1:
            fastest = min(ts[0] for ts in times.values())
            for method, ts in list(times.items()):
                if method != "loop" and ts[0] > DROP_FACTOR * fastest:
                    excluded[method] = (
                        f"{1e3 * ts[0]:.1f} ms in the first timed round, more than "
                        f"{DROP_FACTOR:g}x the fastest ({1e3 * fastest:.1f} ms)"
                    )
                    del times[method]
    return times


def _leave_out_memory_hungry(
    times: dict[str, list[float]], marks: dict[str, int | None], free: int | None, excluded: dict
) -> None:
    """Leaves out the methods whose warm-up needed more memory beyond loop's than is still free.

    `marks` are the allocator's reserved bytes after each warm-up run (loop's first; the mark
    only grows during the probe, so its growth over loop's mark bounds a method's extra peak
    from below). Such a method fitted this once, but would leave less memory for the rest of
    the training (optimiser state, larger batches) than it takes beyond loop.
    """
    base = marks.get("loop")
    if base is None or free is None:
        return
    for method in [m for m in times if m != "loop"]:
        mark = marks.get(method)
        if mark is not None and mark - base > free:
            excluded[method] = (
                f"needed {(mark - base) / 2**20:.0f} MiB more than loop, more than the "
                f"{free / 2**20:.0f} MiB left free on the device"
            )
            del times[method]


@contextmanager
def _isolated(model: nn.Module, device: torch.device) -> Iterator[None]:
    """The probe's scratch state: every buffer swapped for a copy, the global RNG forked."""
    originals = [
        (module, name, buf)
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None
    ]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            for module, name, buf in originals:
                module._buffers[name] = buf.clone()
            yield
        finally:
            for module, name, buf in originals:
                module._buffers[name] = buf


def _measure(step: Callable[[str], None], method: str, device: torch.device) -> float:
    """Seconds of `step(method)`, the device synchronised around it."""
    _synchronize(device)
    start = time.perf_counter()
    step(method)
    _synchronize(device)
    return time.perf_counter() - start


def _memory_mark(device: torch.device) -> int | None:
    """Bytes the caching allocator holds on a CUDA `device` (`None` elsewhere: not checked)."""
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else None


def _memory_free(device: torch.device) -> int | None:
    """Free bytes on a CUDA `device` (`None` elsewhere)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.synchronize(device)


def _same_rng(a: tuple[Tensor, Tensor | None], b: tuple[Tensor, Tensor | None]) -> bool:
    return all(
        (s is None and t is None) or (s is not None and t is not None and torch.equal(s, t))
        for s, t in zip(a, b, strict=True)
    )
