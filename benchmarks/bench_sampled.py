"""The sampled estimator (``estimator="sampled"``): its spread per operand, and its cost and
spread at N = 1000 classes, K = 10.

Two tables, one small CNN (``tiny_cnn`` of ``examples/models.py``: 16/32/64 channels), CPU:

1. **Spread per operand** (N = 100, K = 10, batch 32, eval mode): over ``--draws`` draws, the
   relative standard deviation of one draw's batch-mean GQ and of the per-sample denominators
   (median over the batch), and the largest relative bias of the mean denominator, for the
   proposal the package uses for each operand (``now``) and for the proposal proportional to
   the softmax (``softmax q``, the one used for every operand before). At initialisation and
   with a peaked softmax (last layer scaled by ``--peak``).
2. **N = 1000, K = 10** (batch 16): the training-step time (forward, CE + GQ, backward) of the
   sampled estimator against the CE step and the exact step (``chunk_size=100``, so that it fits
   in memory), interleaved, medians; and the same spread measures as above on the softmax
   operand, at initialisation and peaked.

The estimator's draws depend on the logits and the generator only, so each draw is evaluated on
the exact per-class norms (computed once): the script checks on one draw that this equals
``gq_loss(..., estimator="sampled")`` with the same generator.

    OMP_NUM_THREADS=1 python benchmarks/bench_sampled.py     # about 2-3 minutes on one core
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import _examples_path  # noqa: F401  (puts examples/ on sys.path)
import torch
import torch.nn.functional as F
from models import build_model

from gq_loss import class_gradient_norms, gq_loss
from gq_loss._sampled import draw_columns, quotient, softmax_draws

K = 10


def setup(
    num_classes: int, batch: int, peak: float
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("tiny_cnn", num_classes)
    if peak != 1.0:
        with torch.no_grad():
            model.fc.weight.mul_(peak)
    x = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, num_classes, (batch,))
    return model, x, y


def softmax_q(logits: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple:
    """The former proposal for every operand: K // 2 top classes, the rest q_j ~ S_j."""
    z = logits.double()
    others, weights = softmax_draws(z, y[:, None], K, gen)
    return torch.cat([y[:, None], others], dim=1), weights


def package(operand: str) -> Callable[..., tuple]:
    def draw(logits: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple:
        return draw_columns(logits, y, 1.0, operand, "sampled", K, gen)

    return draw


def spread(
    norms: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, draw: Callable, draws: int
) -> dict[str, float]:
    """Spread of ``draws`` estimates evaluated on the exact norms ``(B, N)`` (float64)."""
    num = norms.gather(1, y[:, None]).squeeze(1)
    exact_den = norms.sum(1) - num
    exact_gq = float((num / exact_den).mean())
    gen = torch.Generator().manual_seed(0)
    means, dens = [], []
    for _ in range(draws):
        columns, weights = draw(logits, y, gen)
        gq = quotient(norms.gather(1, columns), y, weights, 0.0)
        means.append(float(gq.mean()))
        dens.append(num / gq)
    den = torch.stack(dens)
    return {
        "gq_rel_std": statistics.pstdev(means) / exact_gq,
        "den_rel_std": float((den.std(0) / exact_den).median()),
        "den_bias": float(((den.mean(0) - exact_den) / exact_den).abs().max()),
    }


def exact_norms(model: torch.nn.Module, x: torch.Tensor, operand: str) -> torch.Tensor:
    with torch.no_grad():
        return class_gradient_norms(model, x, operand=operand).double()


def check_one_draw(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, operand: str) -> None:
    """The evaluation on the exact norms is the package's estimator: same generator, same GQ."""
    norms = exact_norms(model, x, operand)
    with torch.no_grad():
        logits = model(x)
    columns, weights = draw_columns(
        logits, y, 1.0, operand, "sampled", K, torch.Generator().manual_seed(7)
    )
    mine = quotient(norms.gather(1, columns), y, weights, 1e-12).mean()
    with torch.no_grad():
        theirs = gq_loss(
            model, x, y, operand=operand, estimator="sampled", num_sampled=K,
            generator=torch.Generator().manual_seed(7),
        )  # fmt: skip
    torch.testing.assert_close(mine.float(), theirs.float(), rtol=1e-4, atol=0)


def print_table(rows: list[dict], columns: list[str]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        cells = [f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
        print("| " + " | ".join(cells) + " |")


def operand_table(args: argparse.Namespace) -> None:
    rows = []
    for state, peak in (("init", 1.0), ("peaked", args.peak)):
        model, x, y = setup(100, 32, peak)
        model.eval()
        with torch.no_grad():
            logits = model(x)
        max_prob = float(logits.softmax(1).max(1).values.mean())
        for operand in ("softmax", "log_softmax", "logits"):
            if state == "init":
                check_one_draw(model, x, y, operand)
            norms = exact_norms(model, x, operand)
            for proposal, draw in (("now", package(operand)), ("softmax q", softmax_q)):
                if operand == "softmax" and proposal != "now":
                    continue  # the same proposal
                rows.append(
                    dict(state=state, max_prob=max_prob, operand=operand, proposal=proposal,
                         **spread(norms, logits, y, draw, args.draws))
                )  # fmt: skip
    print(f"\n### Spread of one draw, N = 100, K = {K}, batch 32, {args.draws} draws")
    print_table(
        rows,
        ["state", "max_prob", "operand", "proposal", "gq_rel_std", "den_rel_std", "den_bias"],
    )


def step_times(args: argparse.Namespace) -> None:
    model, x, y = setup(1000, 16, 1.0)
    model.train()

    def ce() -> None:
        F.cross_entropy(model(x), y).backward()

    def gq(**options: object) -> Callable[[], None]:
        def step() -> None:
            value, logits = gq_loss(model, x, y, return_logits=True, **options)  # type: ignore[arg-type]
            (F.cross_entropy(logits, y) + value).backward()

        return step

    steps = {"ce": ce, "sampled_k10": gq(estimator="sampled", num_sampled=K)}
    exact = gq(chunk_size=100)
    times: dict[str, list[float]] = {k: [] for k in [*steps, "exact_c100"]}

    def timed(name: str, step: Callable[[], None]) -> None:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        times[name].append(time.perf_counter() - start)

    for name, step in steps.items():  # warm-up
        timed(name, step)
        times[name].clear()
    for i in range(args.repeats):
        for name, step in steps.items():
            timed(name, step)
        if i == args.repeats // 2:  # one exact step, amid the others (it takes ~1800 CE steps)
            timed("exact_c100", exact)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\n### Step time, N = 1000, batch 16, train mode: medians of {args.repeats} "
        "interleaved steps (exact: one step)"
    )
    rows = [
        dict(step=k, ms=1e3 * v, x_ce=v / med["ce"], x_exact=v / med["exact_c100"])
        for k, v in [(k, med[k]) for k in ("ce", "sampled_k10", "exact_c100")]
    ]
    print_table(rows, ["step", "ms", "x_ce", "x_exact"])


def spread_1000(args: argparse.Namespace) -> None:
    rows = []
    for state, peak in (("init", 1.0), ("peaked", args.peak)):
        model, x, y = setup(1000, 16, peak)
        model.eval()
        with torch.no_grad():
            logits = model(x)
        norms = exact_norms(model, x, "softmax")
        rows.append(
            dict(state=state, max_prob=float(logits.softmax(1).max(1).values.mean()),
                 **spread(norms, logits, y, package("softmax"), args.draws))
        )  # fmt: skip
    print(f"\n### Spread of one draw, softmax, N = 1000, K = {K}, batch 16, {args.draws} draws")
    print_table(rows, ["state", "max_prob", "gq_rel_std", "den_rel_std", "den_bias"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--peak", type=float, default=100.0, help="last-layer scale of 'peaked'")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    operand_table(args)
    spread_1000(args)
    step_times(args)


if __name__ == "__main__":
    main()
