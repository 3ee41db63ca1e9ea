"""The study's figures: what each loss buys and costs, the dose-response, and the paper's
regimes set by set."""

from __future__ import annotations

import math
from typing import Any

from .arms import ARMS, DOSE_STEPS
from .datasets import NOISE_SETS
from .report import compare, dose_arm, metric


def figure(head: dict[str, dict[str, Any]], path: str) -> str | None:
    """ΔODIN AUROC (real-image mean) against the cost of a step, and against the number of
    fine-tuning steps (the dose-response), with 95 % CIs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, dose) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, h in head.items():
        if name == "ce" or ARMS[name].steps != 20 or not h["seeds"]:
            continue
        mean, half = h["auroc"]
        ax.errorbar([h["cost"]], [100 * mean], yerr=[0 if math.isnan(half) else 100 * half],
                    marker="o", capsize=3, label=f"{name} ({len(h['seeds'])} seeds)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("cost of a training step (× CE)")
    ax.set_title("20 steps: what each loss buys, and what it costs")
    series = (("gq_1", "exact GQ"), ("gq_1_k1", "sampled K = 1"), ("gq_1_k3", "sampled K = 3"))
    for i, (base, label) in enumerate(series):
        points = [(steps, head[a]) for steps in DOSE_STEPS
                  if (a := dose_arm(base, steps)) in head and head[a]["seeds"]]  # fmt: skip
        if not points:
            continue
        x = [steps * 1.06**i for steps, _ in points]  # side by side, not on top of each other
        y = [100 * h["auroc"][0] for _, h in points]
        err = [0 if math.isnan(h["auroc"][1]) else 100 * h["auroc"][1] for _, h in points]
        seeds = min(len(h["seeds"]) for _, h in points)
        dose.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{label} (≥ {seeds} seeds)")
    dose.set_xscale("log")
    dose.set_xticks(DOSE_STEPS, [str(s) for s in DOSE_STEPS])
    dose.minorticks_off()
    dose.set_xlabel("fine-tuning steps")
    dose.set_title("Does the effect grow with training?")
    for a in (ax, dose):
        a.axhline(0, color="grey", lw=1)
        a.set_ylabel("Δ ODIN AUROC vs CE, real-image mean (points)")
        a.legend(fontsize=7)
    fig.suptitle("Paired differences from CE of the same length (GQ − CE), 95 % CI over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def regimes_figure(runs: dict, head: dict[str, dict[str, Any]], path: str) -> str | None:
    """The paper's regimes (GQ from scratch, GQ alone): Δ ODIN AUROC and Δ ID accuracy against
    each arm's control, per OOD set and for the real-image mean, with 95 % CIs over seeds."""
    names = [n for n in ARMS if (ARMS[n].from_scratch or ARMS[n].base == "none")
             and head.get(n, {}).get("seeds")]  # fmt: skip
    if not names:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sets = list(next(iter(runs[names[0]].values()))["ood"])
    real = [s for s in sets if s not in NOISE_SETS]
    columns = [("real-image mean", lambda r: metric(r, "ODIN", "auroc", real))]
    columns += [(s, lambda r, s=s: r["ood"][s]["ODIN"]["auroc"]) for s in sets]
    columns += [("ID accuracy", lambda r: r["accuracy"])]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        stats = [compare(runs, name, fn)[1] for _, fn in columns]
        x = [c + (i - (len(names) - 1) / 2) * width for c in range(len(columns))]
        ax.bar(x, [100 * m for m, _ in stats], width,
               yerr=[0 if math.isnan(h) else 100 * h for _, h in stats], capsize=3,
               label=f"{name} ({len(head[name]['seeds'])} seeds)")  # fmt: skip
    ax.axhline(0, color="grey", lw=1)
    ax.set_xticks(range(len(columns)), [label for label, _ in columns])
    ax.set_ylabel("arm − control (points)")
    ax.set_title("The paper's regimes: Δ ODIN AUROC per OOD set, and Δ ID accuracy "
                 "(95 % CI over seeds)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
