"""`method="auto"`'s timing probe: the candidates timed on one batch, leaving no trace.

Package-internal; `_auto.auto_method` calls `probe` on the first call of a model and set-up
(and input shape) and caches its `AutoChoice`. Every run starts from the same scratch buffers
and random state and is checked against `loop`'s result; a method that disagrees, fails or
needs too much memory is left out with the reason.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._recompute import get_rng_state
from ._runtime import call_model, check_logits
from ._torch_internals import BufferSwap, differentiable_forward

#: `batched` and `jacrev` differentiate every class of a sample at once; above this many classes
#: per sample `auto` does not consider them (and does not pay for timing them).
VMAP_MAX_CLASSES = 32
#: Timed rounds of the candidates after a warm-up round: at least `ROUNDS`, and more, up to
#: `MAX_ROUNDS`, until the timed runs took the probe's `seconds` (`_auto.PROBE_SECONDS` for a
#: set-up's first shape; cheap steps are noisy). Each round starts with another method, so no
#: method always runs first.
ROUNDS = 3
MAX_ROUNDS = 15
#: Timed runs that took this many seconds in all end the timing after any round: slow steps
#: rank alike in one run each (`benchmarks/bench_probe.py`: the probe of a CIFAR ResNet-18 at
#: batch 2 took 13.8 s instead of 26.0 s, with the same choices).
ENOUGH_SECONDS = 1.0
#: A method more than this many times slower than the fastest in the first timed round is not
#: timed again.
DROP_FACTOR = 2.0


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


def probe(
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
    (`_disagreement`): a method that disagrees is wrong for this model and left out. Warnings
    raised inside are not shown; the real call shows its own. Methods in `refused` are not timed. `seconds`: time
    extra rounds until the timed runs took that long (`_auto.PROBE_SECONDS`, or 0).
    """
    model: nn.Module = run.model
    x = run.x.detach()
    device = x.device
    excluded = dict(refused)
    with warnings.catch_warnings(), _Scratch(model, device) as scratch:
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad(), differentiable_forward(model, x), scratch.watching():
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
            settings = replace(run.settings, method=method, resolved=method, chunk_size=None)
            probe = type(run)(model, x, settings, create_graph=run.create_graph)
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
    least `ROUNDS` and more (up to `MAX_ROUNDS`) until they took `seconds`, and no more once
    they took `ENOUGH_SECONDS` in all (at least one round). A method is left
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
        if len(times) == 1 or (repeat > ROUNDS and timed >= seconds) or timed >= ENOUGH_SECONDS:
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
        self.buffers = BufferSwap(model)
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
        self.buffers.restore()
        for generator, state in self.generators.items():
            generator.set_state(state)
        self.fork.__exit__(kind, value, traceback)

    def _swap(self) -> None:
        self.buffers.swap([buf.clone() for buf in self.buffers.originals()])

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
