"""How `method="auto"` picks its method: a one-time timing per model and set-up.

Package-internal; `gq_loss.kernels` calls `auto_method` and re-exports `auto_choice` and
`AutoChoice`. Like `torch.backends.cudnn.benchmark`, the first call for a model and set-up times
the candidate methods on that call's batch, checks each one's norms and parameter gradient
against `loop`'s, and caches the fastest that agrees; later calls look it up. Each probe is
logged (logger `"gq_loss"`, level INFO) with the choice and the time it took.
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.overrides import TorchFunctionMode

from ._autograd import differentiable_forward
from ._recompute import get_autocast_state, get_rng_state
from ._runtime import call_model, check_logits

logger = logging.getLogger("gq_loss")

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
#: Distinct input shapes timed per model and set-up. Only the first shape's probe takes extra
#: rounds up to `PROBE_SECONDS`; a later shape is timed (in `ROUNDS` rounds) only while the
#: set-up's probes have measured less than `SHAPES_SECONDS` in all (dynamic padding gives a new
#: shape every few batches). Shapes beyond either limit take the choice of the probed shape with
#: the nearest number of elements.
MAX_SHAPES = 8
SHAPES_SECONDS = 1.0


@dataclass(frozen=True)
class AutoChoice:
    """What `method="auto"` chose for a model and set-up, and why.

    Attributes:
        method: The method that ran: `"loop"`, `"batched"`, `"jacrev"` or `"recompute"`.
        seconds: Median time of one step (forward, norms and, when training, the parameter
            gradient through them) per method the timing probe measured; empty when nothing
            needed timing.
        excluded: The methods `auto` did not consider, that failed in the probe or whose
            norms or parameter gradient there disagreed with `loop`'s, each with the reason.
    """

    method: str
    seconds: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)


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
            choice, keep, spent = _probe(
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
        tuple(0 < m.p < 1 for m in modules if isinstance(m, nn.modules.dropout._DropoutNd)),
        run.x.dtype,
        run.x.device,
        get_autocast_state(run.x.device),
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


def _probe(
    run: Any, width: int | None, seconds: float, refused: dict[str, str]
) -> tuple[AutoChoice, bool, float]:
    """Times the candidate methods on `run`'s batch; `(choice, cacheable, seconds measured)`.

    The probe leaves no trace on the model or the caller (`_Scratch`): it runs on the batch
    detached from any graph of the caller, against scratch copies of the buffers (BatchNorm
    statistics do not move), with the global RNG and every generator the forward pass draws
    from restored after it (the caller's next random numbers are those it would have drawn
    anyway), and takes the parameter gradient with `torch.autograd.grad` (no `.grad` is
    written). Every step starts from the same buffers and random state, so each run of a
    candidate is checked against `loop`'s warm-up norms and parameter gradient
    (`_disagreement`): a method that disagrees is wrong for this model and left out. Warnings raised inside are
    not shown; the real call shows its own. Methods in `refused` are not timed. `seconds`: time
    extra rounds until the timed runs took that long (`PROBE_SECONDS`, or 0).
    """
    model: nn.Module = run.model
    x = run.x.detach()
    device = x.device
    excluded = dict(refused)
    with warnings.catch_warnings(), _Scratch(model, device) as scratch:
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad(), differentiable_forward(), scratch.watching():
                logits = call_model(model, x, run.output)
                check_logits(logits, x.shape[0])
        except Exception:  # the call itself will fail, with its own error
            return AutoChoice("loop"), False, 0.0
        random = scratch.drew_random()
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
            if "batched" not in excluded:
                candidates.append("batched")
            if random:
                excluded["jacrev"] = (
                    "the forward pass draws random numbers (Dropout in train mode), which "
                    "torch.func may draw in another order than the other methods"
                )
            elif "jacrev" not in excluded:
                candidates.append("jacrev")
        if len(candidates) == 1:
            return AutoChoice("loop", excluded=excluded), True, 0.0
        columns = (
            None
            if width == num_classes
            else torch.arange(width, device=device).expand(x.shape[0], width)
        )
        params = [q for q in model.parameters() if q.requires_grad]
        # Loop's warm-up result, and each other method's last one until it is checked.
        results: dict[str, tuple[Tensor, Sequence[Tensor | None]]] = {}

        def step(method: str) -> None:
            scratch.reset()
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
            grads: Sequence[Tensor | None] = ()
            if norms.requires_grad and params:
                grads = torch.autograd.grad(norms.sum(), params, allow_unused=True)
            if method != "loop" or method not in results:
                results[method] = norms.detach(), grads

        def check(method: str) -> str | None:
            reference = results["loop"]
            return _disagreement(reference, results.pop(method), _tolerance(x))

        times, spent = _time(step, check, candidates, device, excluded, seconds)
    if times is None:  # loop runs what autograd runs: the model itself fails
        return AutoChoice("loop", excluded=excluded), False, spent
    if not next(iter(times.values())):  # every other method was left out: nothing to compare
        return AutoChoice("loop", excluded=excluded), True, spent
    # Each method's share of its round's time, median over the rounds: the methods of one round
    # run back to back, so a change in the machine's load between rounds cancels.
    totals = [sum(ts) for ts in zip(*times.values(), strict=True)]
    share = {
        m: statistics.median(t / s for t, s in zip(ts, totals, strict=True))
        for m, ts in times.items()
    }
    medians = {m: statistics.median(ts) for m, ts in times.items()}
    return AutoChoice(min(share, key=share.__getitem__), medians, excluded), True, spent


def _tolerance(x: Tensor) -> float:
    """Relative disagreement with `loop` beyond which a method is wrong: the square root of the
    machine epsilon of the computation (the autocast dtype under autocast), about 3e-4 in
    float32 and 1.5e-8 in float64; the methods' rounding differences are orders below it, the
    errors of a method that cannot differentiate a model are of order 1."""
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return float(torch.finfo(dtype).eps) ** 0.5


def _disagreement(
    reference: tuple[Tensor, Sequence[Tensor | None]],
    candidate: tuple[Tensor, Sequence[Tensor | None]],
    tolerance: float,
) -> str | None:
    """Why `candidate`'s norms or parameter gradient differ from `loop`'s (`reference`) beyond
    `tolerance` (relative, in the 2-norm over all entries; a missing gradient is zero), or
    `None`. One device sync."""
    sums: list[Tensor] = []  # per part: squared difference, squared reference
    for want, got in (([reference[0]], [candidate[0]]), (reference[1], candidate[1])):
        diff: list[Tensor] = []
        size: list[Tensor] = []
        for w, g in itertools.zip_longest(want, got):
            w64 = None if w is None else w.detach().to(torch.float64)
            g64 = None if g is None else g.detach().to(torch.float64)
            if w64 is not None:
                size.append(w64.square().sum())
            if w64 is not None or g64 is not None:
                gap = g64 if w64 is None else w64 if g64 is None else g64 - w64
                diff.append(gap.square().sum())  # type: ignore[union-attr]
        sums += [_cpu_sum(diff), _cpu_sum(size)]
    values = torch.stack(sums).tolist()
    errors = {}
    for what, diff_sq, size_sq in (
        ("norms", values[0], values[1]),
        ("parameter gradient", values[2], values[3]),
    ):
        error = math.sqrt(diff_sq) / max(math.sqrt(size_sq), torch.finfo(torch.float64).tiny)
        if not error <= tolerance:  # also NaN
            errors[what] = error
    if not errors:
        return None
    found = ", ".join(f"{what} {error:.2g}" for what, error in errors.items())
    return (
        f"disagreed with loop on the probe batch (relative error of the {found}; tolerance "
        f"{tolerance:.2g}): this method cannot differentiate this model exactly"
    )


def _cpu_sum(scalars: list[Tensor]) -> Tensor:
    """The sum of 0-dim tensors (on any devices), on the CPU, without a sync per tensor."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in scalars:
        by_device.setdefault(t.device, []).append(t)
    total = torch.zeros((), dtype=torch.float64)
    for group in by_device.values():
        total = total + torch.stack(group).sum().cpu()
    return total


def _time(
    step: Callable[[str], None],
    check: Callable[[str], str | None],
    candidates: list[str],
    device: torch.device,
    excluded: dict,
    seconds: float,
) -> tuple[dict[str, list[float]] | None, float]:
    """Seconds of each candidate's timed rounds (loop first; `None` when loop fails) and the
    seconds of every run measured.

    A warm-up round first, loop first; then timed rounds, each started by another method, at
    least `ROUNDS` and more (up to `MAX_ROUNDS`) until they took `seconds`. A method is left
    out, with the reason in `excluded`, where it fails, where `check` finds a result of it wrong
    (every run is checked: TorchScript, for one, runs another graph from a function's second
    call on), on CUDA where its warm-up needed more memory than is left free, and where it was
    more than `DROP_FACTOR` times slower than the fastest in the first timed round (a hopeless
    method is not timed again).
    """
    times: dict[str, list[float]] = {m: [] for m in candidates}
    marks: dict[str, int | None] = {}
    spent = timed = 0.0
    for repeat in range(1 + MAX_ROUNDS):
        if len(times) == 1 or (repeat > ROUNDS and timed >= seconds):
            break
        order = list(times)
        for method in order[repeat % len(order) :] + order[: repeat % len(order)]:
            try:
                took = _measure(step, method, device)
                wrong = None if method == "loop" else check(method)
            except Exception as err:
                if method == "loop":
                    return None, spent
                excluded[method] = f"failed: {type(err).__name__}: {err}"[:300]
                del times[method]
                continue
            spent += took
            if wrong is not None:
                excluded[method] = wrong
                del times[method]
            elif repeat:
                times[method].append(took)
                timed += took
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
    return times, spent


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


class _Scratch:
    """The probe's scratch state, undone on exit: every buffer swapped for a copy, the global
    RNG forked, and the generators the forward pass draws from (`watching`) restored.

    `reset()` puts the scratch state back to where it started (fresh buffer copies, the random
    state of the call), so every step of the probe runs the same function on the same draws.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.buffers = [
            (module, name, buf)
            for module in model.modules()
            for name, buf in module._buffers.items()
            if buf is not None
        ]
        self.generators: dict[torch.Generator, Tensor] = {}
        self.fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def __enter__(self) -> _Scratch:
        self.fork.__enter__()
        self.rng = get_rng_state(self.device)
        self._swap()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for module, name, buf in self.buffers:
            module._buffers[name] = buf
        for generator, state in self.generators.items():
            generator.set_state(state)
        self.fork.__exit__(kind, value, traceback)

    def _swap(self) -> None:
        for module, name, buf in self.buffers:
            module._buffers[name] = buf.clone()

    def watching(self) -> _GeneratorWatch:
        """A mode that records each `torch.Generator` passed to a torch function, with its
        state before its first use."""
        return _GeneratorWatch(self.generators)

    def drew_random(self) -> bool:
        """Whether the forward pass watched drew from the global RNG or from a generator."""
        return bool(self.generators) or not _same_rng(self.rng, get_rng_state(self.device))

    def reset(self) -> None:
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state(self.rng[1], self.device)
        for generator, state in self.generators.items():
            generator.set_state(state)
        self._swap()


class _GeneratorWatch(TorchFunctionMode):
    """Records every `torch.Generator` argument of a torch function with its state before use
    (a model's own generator, e.g. `torch.rand(..., generator=self.generator)`)."""

    def __init__(self, states: dict[torch.Generator, Tensor]) -> None:
        super().__init__()
        self.states = states

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        for value in itertools.chain(args, kwargs.values()):
            if isinstance(value, torch.Generator) and value not in self.states:
                self.states[value] = value.get_state()
        return func(*args, **kwargs)


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
