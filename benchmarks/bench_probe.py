"""How much timing does ``method="auto"`` need to choose well?

``auto`` times its candidates on a model's first call: a warm-up round, then at least
``_probe.ROUNDS`` (3) timed rounds and more until they took ``_auto.PROBE_SECONDS`` (0.5 s), and
no more once they took ``_probe.ENOUGH_SECONDS`` (1 s) in all. This script compares probes on the
same models and batches (``--probes``): ``now`` (those settings), ``before`` (no
``ENOUGH_SECONDS``: what ``auto`` did until it was added) and ``cheap`` (one timed round):

1. a long reference timing of ``loop``, ``batched`` and ``jacrev`` (full training steps,
   interleaved repeats, as in ``bench_gq.py``) names the fastest exact method;
2. ``--trials`` first calls of ``auto`` per probe, each on a freshly built model (same weights,
   same batch), the probes interleaved so that drifts in machine load hit them alike.

Reported per probe: the methods chosen (counts), the regret (the reference median of the chosen
method over the fastest's, minus 1; mean and worst over the trials) and the first call's extra
time (the first call minus the median of two later calls).

    python benchmarks/bench_probe.py                                   # before against cheap
    python benchmarks/bench_probe.py --probes before now --batch-sizes 2 16
    python benchmarks/bench_probe.py --amp       # under bf16 autocast
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import statistics
from collections.abc import Iterator

import torch
from bench_gq import make_steps, measure, print_markdown, run_once, setup

from gq_loss import _auto, _probe
from gq_loss.kernels import auto_choice

EXACT = ("loop", "batched", "jacrev")
#: probe name: (timed rounds at least, seconds at least, seconds that end the timing)
PROBES = {
    "now": (_probe.ROUNDS, _auto.PROBE_SECONDS, _probe.ENOUGH_SECONDS),
    "before": (3, 0.5, math.inf),  # before ENOUGH_SECONDS
    "cheap": (1, 0.0, math.inf),  # one timed round
}


@contextlib.contextmanager
def probe_settings(rounds: int, seconds: float, enough: float) -> Iterator[None]:
    saved = _probe.ROUNDS, _auto.PROBE_SECONDS, _probe.ENOUGH_SECONDS
    _probe.ROUNDS, _auto.PROBE_SECONDS, _probe.ENOUGH_SECONDS = rounds, seconds, enough
    try:
        yield
    finally:
        _probe.ROUNDS, _auto.PROBE_SECONDS, _probe.ENOUGH_SECONDS = saved


def first_call(args: argparse.Namespace, name: str, n: int, batch: int, probe: str) -> tuple:
    """The method a fresh model's first ``auto`` call chose under ``probe``, and the first
    call's seconds beyond a later call's."""
    model, x, y = setup(name, n, batch, args.device)
    step = make_steps([], n)["auto"]
    with probe_settings(*PROBES[probe]):
        first = run_once(step, model, x, y, args.amp)
    later = statistics.median(run_once(step, model, x, y, args.amp) for _ in range(2))
    return auto_choice(model).method, first - later


def compare(args: argparse.Namespace, name: str, n: int, batch: int) -> list[dict]:
    steps = make_steps([], n)
    steps = {k: steps[k] for k in ("ce", *EXACT)}
    ref_rows = measure(name, n, batch, steps, device=args.device, repeats=args.repeats,
                       amp=args.amp)  # fmt: skip
    ref = {r["step"]: r["ms"] for r in ref_rows if r["step"] in EXACT and r["status"] == "ok"}
    fastest = min(ref, key=ref.__getitem__)
    trials: dict[str, list[tuple[str, float]]] = {p: [] for p in args.probes}
    order = list(args.probes)
    for t in range(args.trials):
        for probe in order[t % len(order) :] + order[: t % len(order)]:
            trials[probe].append(first_call(args, name, n, batch, probe))
        print(f"  {name} batch {batch}: trial {t + 1}/{args.trials}", flush=True)
    rows = []
    for probe, results in trials.items():
        regrets = [ref[m] / ref[fastest] - 1 for m, _ in results]
        counts = collections.Counter(m for m, _ in results)
        rows.append(dict(
            model=name, batch=batch, N=n, probe=probe,
            reference=", ".join(f"{m} {ref[m]:.0f}" for m in EXACT if m in ref),
            fastest=fastest,
            chose=", ".join(f"{m} {c}" for m, c in counts.most_common()),
            regret_mean_pct=100 * statistics.mean(regrets),
            regret_max_pct=100 * max(regrets),
            probe_s=statistics.median(s for _, s in results),
        ))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny_cnn", "small_cnn", "fast_cnn"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--trials", type=int, default=6, help="first calls per probe")
    parser.add_argument("--repeats", type=int, default=15, help="rounds of the reference timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="under bf16 autocast")
    parser.add_argument("--probes", nargs="+", choices=list(PROBES), default=["before", "cheap"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probes = {p: PROBES[p] for p in args.probes}
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"probes {probes} (timed rounds at least, seconds at least, seconds that end it)")  # fmt: skip
    rows = []
    for name in args.models:
        for batch in args.batch_sizes:
            rows += compare(args, name, args.classes, batch)
    print("\nreference: median ms of a full step over the rounds; regret: the chosen method's "
          "reference time over the fastest's, minus 1; probe_s: the first call's extra seconds")  # fmt: skip
    print_markdown(rows, ["model", "batch", "probe", "reference", "fastest", "chose",
                          "regret_mean_pct", "regret_max_pct", "probe_s"])  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
