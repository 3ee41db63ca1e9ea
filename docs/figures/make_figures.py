"""Draw the figures of the documentation outside the reproduction study (PNG, committed).

    python docs/figures/make_figures.py          # all four, about 30 s (the demo runs once)
    python docs/figures/make_figures.py --no-demo

- ``answer.png`` (docs/answer.md): what each choice bought in the decision study on both
  networks, paired differences with 95 % intervals, read from the committed per-run JSON files
  of ``docs/reproduction/study_long/`` (small CNN) and ``docs/reproduction/study_fast/``
  (``fast_cnn``) with the study's own pairing (``benchmarks/study``).
- ``cost.png`` (docs/answer.md, docs/benchmarks.md): the cost of a training step of each GQ
  set-up relative to a CE step, from the study's ``step_costs.json`` (measured side by side).
- ``protocol.png`` (docs/ood.md): the detectors' protocol, fit / calibrate / predict.
- ``demo_odin_scores.png`` (docs/answer.md): what GQ does to ODIN's score distributions, the
  demo's figure of seed 0 (``examples/demo.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STUDY = ROOT / "docs" / "reproduction" / "study_long"
STUDY_FAST = ROOT / "docs" / "reproduction" / "study_fast"
sys.path.insert(0, str(ROOT / "benchmarks"))

# (arm, control or None for the arm's own, label); every difference is arm - control
CHOICES = (
    ("gq_1", None, "CE + 1·GQ (exact), 20 steps"),
    ("gq_1_s320", None, "CE + 1·GQ (exact), 320 steps"),
    ("gq_1_k1_s320", None, "CE + 1·GQ (sampled K = 1), 320 steps"),
    ("ce_s1600", "gq_1_s80", "CE for 1,600 steps, against CE + GQ\nfor 80 (the same compute)"),
    ("scratch_gq_1_k1", None, "CE + 1·GQ from scratch (K = 1), 5 epochs"),
    ("gq_only_k1_s390", None, "GQ alone (no CE), 1 epoch"),
)
CHOICES_FAST = (
    ("gq_0.1_k1_s80", None, "CE + 0.1·GQ (K = 1), 80 steps"),
    ("gq_1_k1_s80", None, "CE + 1·GQ (K = 1), 80 steps"),
    ("gq_3_k1_s80", None, "CE + 3·GQ (K = 1), 80 steps"),
    ("gq_1_s80", None, "CE + 1·GQ (exact), 80 steps"),
    (
        "ce_s500",
        "gq_1_k1_s80",
        "CE for 500 steps, against CE + GQ\n(K = 1) for 80 (the same compute)",
    ),
    ("scratch_gq_1_k1", None, "CE + 1·GQ from scratch (K = 1), 10 epochs"),
    ("gq_only_k1_s390", None, "GQ alone (no CE), 1 epoch"),
)


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _choice_rows(study: Path, choices: tuple[tuple[str, str | None, str], ...]) -> list[tuple]:
    """(label, Δ ODIN AUROC, Δ accuracy) of each choice; each Δ a (mean, half-width) pair."""
    from study.report import compare, odin_auroc
    from study.results import load_runs

    runs = load_runs(str(study))
    real = ["MNIST", "textures", "photos"]
    rows = []
    for arm, control, label in choices:
        seeds, auroc = compare(runs, arm, lambda r: odin_auroc(r, real), control)
        _, acc = compare(runs, arm, lambda r: r["accuracy"], control)
        rows.append((f"{label}\n({len(seeds)} seed{'s' if len(seeds) > 1 else ''})", auroc, acc))
    return rows


def answer_figure(out: Path) -> None:
    networks = (
        ("small CNN, 72 %", _choice_rows(STUDY, CHOICES)),
        ("fast_cnn, 89.6 %", _choice_rows(STUDY_FAST, CHOICES_FAST)),
    )
    plt = _pyplot()
    fig, grid = plt.subplots(
        2, 2, figsize=(11, 9.4), sharex=True,
        gridspec_kw={"height_ratios": [len(rows) for _, rows in networks]},
    )  # fmt: skip
    limits = (-9.0, 9.0)
    for axes, (network, rows) in zip(grid, networks, strict=True):
        for ax, k, title in zip(
            axes, (1, 2), ("Δ ODIN AUROC (points)", "Δ ID accuracy (points)"), strict=True
        ):
            for y, row in enumerate(rows):
                mean, half = (100 * v for v in row[k])
                shown = min(max(mean, limits[0]), limits[1])
                colour = (
                    "tab:green" if mean - half > 0 else "tab:red" if mean + half < 0 else "grey"
                )
                if shown != mean:  # off the axis: a marker at its edge, and the value
                    ax.plot(shown, y, marker="<" if mean < 0 else ">", color=colour, markersize=9)
                    text = f"{mean:+.0f}" if math.isnan(half) else f"{mean:+.0f} ± {half:.0f}"
                    ax.text(shown + (0.4 if mean < 0 else -0.4), y - 0.3, text, color=colour,
                            ha="left" if mean < 0 else "right", fontsize=9)  # fmt: skip
                else:
                    ax.errorbar(mean, y, xerr=0 if math.isnan(half) else half, fmt="o",
                                color=colour, capsize=4)  # fmt: skip
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_xlim(*limits)
            ax.set_ylim(len(rows) - 0.5, -0.5)
            ax.set_title(f"{title}, {network}", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8.5)
        axes[1].set_yticks(range(len(rows)), [])
    fig.suptitle(
        "What each choice bought against CE (CIFAR-10; mean and 95 % interval over seeds)\n"
        "green: better than CE, red: worse, grey: cannot be told from CE",
        fontsize=10.5,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def cost_figure(out: Path) -> None:
    cost = json.loads((STUDY / "step_costs.json").read_text())["cost"]
    bars = (
        ("CE", cost["ce"]),
        ("CE + GQ, sampled K = 1", cost["gq_1_k1"]),
        ("CE + GQ, sampled K = 3", cost["gq_1_k3"]),
        ("CE + GQ, authors' formulation", cost["reference_1"]),
        ("CE + GQ, exact Eq. 7", cost["gq_1"]),
    )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.0))
    colours = ["grey", "tab:green", "tab:olive", "tab:blue", "tab:red"]
    ax.barh(range(len(bars)), [b[1] for b in bars], color=colours)
    for y, (_, value) in enumerate(bars):
        ax.text(value + 0.3, y, f"{value:.1f}x", va="center", fontsize=9)
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("seconds per training step, relative to a CE step")
    ax.set_xlim(0, max(b[1] for b in bars) * 1.15)
    ax.set_title(
        "Cost of a training step (N = 10 classes, small CNN, batch 128, one CPU thread)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def protocol_figure(out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 2.9))
    ax.set_axis_off()
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 3)
    boxes = (
        (0.9, "fit(id_train)\nMahalanobis only:\nclass means, covariance"),
        (3.5, "calibrate(id_val, tpr=0.95)\nthreshold_ = the score\n95 % of ID inputs exceed"),
        (6.2, "score(x)\nfloat64, higher =\nmore in-distribution"),
        (8.9, "predict(x)\nclass index, or -1\nwhere score < threshold_"),
    )
    for x, text in boxes:
        ax.text(x, 1.6, text, ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round,pad=0.5", "facecolor": "#eef3fa", "edgecolor": "#4a6fa5"})  # fmt: skip
    for (a, _), (b, _) in itertools.pairwise(boxes):
        ax.annotate("", (b - 1.25, 1.6), (a + 1.25, 1.6), arrowprops={"arrowstyle": "->"})
    ax.text(5, 0.25, "ODINDetector, MSPDetector, EnergyDetector, MahalanobisDetector: the same "
            "four calls; a NaN score is never accepted", ha="center", fontsize=9)  # fmt: skip
    ax.text(5, 2.8, "One protocol for every detector", ha="center", fontsize=11)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)


def demo_figure(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, str(ROOT / "examples" / "demo.py"), "--no-progress", "--out-dir", tmp],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        shutil.copyfile(Path(tmp) / "odin_scores.png", out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--no-demo", action="store_true", help="skip the demo's figure (30 s)")
    args = p.parse_args()
    answer_figure(HERE / "answer.png")
    cost_figure(HERE / "cost.png")
    protocol_figure(HERE / "protocol.png")
    if not args.no_demo:
        demo_figure(HERE / "demo_odin_scores.png")
    print(f"figures written to {HERE}")


if __name__ == "__main__":
    main()
