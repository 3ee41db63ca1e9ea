"""The report: paired differences of each arm from its control, as Markdown tables."""

from __future__ import annotations

import math
import os
import platform
from dataclasses import replace
from typing import Any

import numpy as np

from .arms import ARMS, CONTROLS, DOSE_STEPS, EQUAL_COMPUTE, FEW_SEED_ARMS
from .datasets import NOISE_SETS
from .evaluate import DETECTION_METHODS, EPS_ODIN, T_ODIN

# Where the headline mean is defined: what its photos set is, and how much of the mean it is.
PHOTOS_NOTE = "; photos: {n} crops of scikit-learn's two sample photographs, a third of the mean"


def t_critical(df: int) -> float:
    """Two-sided 95 % Student t quantile (scipy if installed, else a table)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}
        return table.get(df, 2.262 if df == 9 else 1.96)


def paired(diffs: list[float]) -> tuple[float, float]:
    """Mean of paired differences and the half-width of its 95 % t interval (nan for n < 2)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return float(d.mean()) if len(d) else math.nan, math.nan
    return float(d.mean()), t_critical(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))


def fmt_ci(mean: float, half: float, scale: float = 100.0) -> str:
    if math.isnan(mean):  # no seed to compare
        return "-"
    if math.isnan(half):
        return f"{scale * mean:+.1f}"
    return f"{scale * mean:+.1f} ± {scale * half:.1f}"


def metric(run: dict, method: str, key: str, sets: list[str]) -> float:
    return float(np.mean([run["ood"][s][method][key] for s in sets]))


def odin_auroc(run: dict, real: list[str]) -> float:
    return metric(run, "ODIN", "auroc", real)


def control_run(runs: dict[str, dict[int, dict]], name: str, seed: int) -> dict | None:
    """The run ``name`` of ``seed`` is compared with: the weights it started from where the run
    evaluated them itself (``"start"``), else its control arm's run of the same seed."""
    run = runs.get(name, {}).get(seed)
    if run is not None and "start" in run:
        return run["start"]
    return runs.get(CONTROLS[name], {}).get(seed)


def compare(
    runs: dict[str, dict[int, dict]], name: str, fn: Any, control: str | None = None
) -> tuple[list[int], tuple[float, float]]:
    """Seeds with both runs, and the paired difference ``fn(name) - fn(control)``; the control
    is the arm's own (:func:`control_run`) unless ``control`` names another arm."""
    pairs = {}
    for seed, run in runs.get(name, {}).items():
        other = (
            control_run(runs, name, seed) if control is None else runs.get(control, {}).get(seed)
        )
        if other is not None:
            pairs[seed] = fn(run) - fn(other)
    seeds = sorted(pairs)
    return seeds, paired([pairs[s] for s in seeds])


def report(
    runs: dict[str, dict[int, dict]], costs: dict | None = None
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Markdown tables of the paired differences of every arm from its own control (CE of the
    same length, or the weights a run started from); also returns the headline numbers per arm.
    Covers whatever ran: an arm without a finished control run is listed with its absolute
    values only.

    ``costs``: what ``grid.measure_step_costs`` wrote; without it an arm's step cost is the
    median over seeds of its seconds per step / the 20-step CE arm's, measured inside the grid
    (none when no CE arm ran)."""
    if not runs:
        raise SystemExit("no finished runs: nothing to report")
    any_run = next(iter(next(iter(runs.values())).values()))
    sets = list(any_run["ood"])
    real = [s for s in sets if s not in NOISE_SETS]
    st = any_run["settings"]
    schedule = (
        f"(the fast recipe of examples/fast_cifar.py, {st.get('precision', 'float32')})"
        if st["arch"] == "fast_cnn"
        else f"(OneCycle to lr {st['pretrain_lr']})"
    )
    lines = [
        f"Model `{st['arch']}`; {st['pretrain_epochs']} CE epochs on the 50k training split "
        f"{schedule} shared by the arms of a seed; then each arm "
        f"fine-tunes for its number of steps (20 unless the name says `_s<steps>`), batch "
        f"{st['batch_size']}, cosine from lr {st['ft_lr']}, on the first steps × batch images of "
        "a seed-fixed permutation of the training split (cycled when 1600 steps need more than "
        "the 50k); arms of the same length see the same batches. Arms named `scratch_*` train "
        "from random weights with the pre-training's recipe, seed and batches instead. "
        f"ODIN T = {T_ODIN:g}, eps = {EPS_ODIN:g}. Accuracy on the 10,000 test images; detection: "
        f"the first {st['id_eval_size']} test images against "
        f"{st['ood_size']} images per set. Headline mean over the real-image sets "
        f"({', '.join(real)}{PHOTOS_NOTE.format(n=st['ood_size']) if 'photos' in real else ''}); noise sets only in their "
        "own columns. Differences are arm − "
        "control per seed, in points: mean ± half-width of the 95 % t interval over seeds. "
        "The control is CE of the same length (for a longer CE arm, the 20-step CE); for the "
        "arms from scratch, the CE pre-training; for `gq_only_*`, the weights it started from.",
        "",
    ]
    ce = runs.get("ce", {})
    ce_step = {s: r["seconds_per_step"] for s, r in ce.items()}
    head: dict[str, dict[str, Any]] = {}
    lines += ["## Which should I use?", "",
              "| arm | steps | control | seeds | Δ ODIN AUROC | Δ ODIN FPR95 | Δ ID accuracy "
              "| × cost of a CE step | compute (CE steps) |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, arm in ARMS.items():
        arm_runs = runs.get(name, {})
        if not arm_runs:
            continue
        with_ce = sorted(set(arm_runs) & set(ce_step))
        in_grid = (
            float(np.median([arm_runs[s]["seconds_per_step"] / ce_step[s] for s in with_ce]))
            if with_ce
            else math.nan
        )
        cost = measured(costs, name, "cost", in_grid)
        control = CONTROLS[name]
        cells = {}
        for key, f in (("auroc", lambda r: odin_auroc(r, real)),
                       ("fpr95", lambda r: metric(r, "ODIN", "fpr95", real)),
                       ("accuracy", lambda r: r["accuracy"])):  # fmt: skip
            paired_seeds, cells[key] = compare(runs, name, f)
        head[name] = {"seeds": paired_seeds, "cost": cost, "in_grid_cost": in_grid,
                      "steps": arm.steps, "control": control, **cells}  # fmt: skip
        if name == "ce" or not paired_seeds:
            continue
        lines.append(f"| {name} | {arm.steps} | {control} | {len(paired_seeds)} | "
                     f"{fmt_ci(*cells['auroc'])} | {fmt_ci(*cells['fpr95'])} | "
                     f"{fmt_ci(*cells['accuracy'])} | {fmt_x(cost)} | {fmt_x(arm.steps * cost, ',.0f')} |")  # fmt: skip

    lines += dose_response(runs, real, head) + equal_compute(runs, real, head)
    lines += cheap_estimator(runs, real, head) + paper_regimes(runs, real, head)
    lines += precision_check(runs, real, head) + noise_and_tuned(runs, real, sets, head)

    lines += ["", "## Paired differences from the control (real-image mean), points", "",
              "| arm | control | seeds | Δ ID acc. | Δ ODIN AUROC | Δ ODIN FPR95 | Δ MSP AUROC | "
              "Δ MSP FPR95 | Δ energy AUROC | Δ energy FPR95 |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    fns = [lambda r: r["accuracy"]] + [
        (lambda r, m=m, k=k: metric(r, m, k, real))
        for m in DETECTION_METHODS
        for k in ("auroc", "fpr95")
    ]
    compared = [name for name in ARMS if name != "ce" and head.get(name, {}).get("seeds")]
    for name in compared:
        cells = [fmt_ci(*compare(runs, name, f)[1]) for f in fns]
        lines.append(
            f"| {name} | {CONTROLS[name]} | {len(head[name]['seeds'])} | "
            + " | ".join(cells)
            + " |"
        )
    for key, label in (("auroc", "AUROC"), ("fpr95", "FPR95")):
        lines += ["", f"## ODIN {label} per OOD set: difference from the control, points", "",
                  "Where GQ moves and where it does not: each set on its own, next to the "
                  "real-image mean of the headline.", "",
                  "| arm | seeds | real-image mean | " + " | ".join(sets) + " |",
                  "|---|---|---|" + "---|" * len(sets)]  # fmt: skip
        for name in compared:
            mean = compare(runs, name, lambda r, k=key: metric(r, "ODIN", k, real))[1]
            cells = [fmt_ci(*compare(runs, name, lambda r, o=o, k=key: r["ood"][o]["ODIN"][k])[1])
                     for o in sets]  # fmt: skip
            lines.append(f"| {name} | {len(head[name]['seeds'])} | {fmt_ci(*mean)} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "## Absolute values: mean ± std over seeds, %", "",
              "| model | seeds | ID acc. | ODIN AUROC (real mean) | "
              + " | ".join(f"ODIN AUROC {s}" for s in sets) + " | MSP AUROC | energy AUROC |",
              "|---|---|---|---|" + "---|" * len(sets) + "---|---|"]  # fmt: skip
    for name in ("pretrained", *ARMS):
        rs = list(runs.get(name, {}).values())
        if rs:
            cells = [ms([r["accuracy"] for r in rs]), ms([odin_auroc(r, real) for r in rs])]
            cells += [ms([r["ood"][o]["ODIN"]["auroc"] for r in rs]) for o in sets]
            cells += [ms([metric(r, m, "auroc", real) for r in rs]) for m in ("MSP", "energy")]
            lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    pre = [sum(e["seconds"] for e in r["train_log"]) for r in runs.get("pretrained", {}).values()]
    if pre:
        lines += ["", f"Measured: CE pre-training {np.mean(pre) / 60:.1f} min per seed."]
    lines += ["", f"Machine: {platform.machine()}, {os.cpu_count()} cores, {st['threads']} torch "
              f"thread(s) per run, torch {st['torch']}."]  # fmt: skip
    lines += ["", "Cost of one training step, per arm: in-grid seconds per step / the 20-step CE "
              "arm's (median over seeds; the machine was shared, so these move with its load)"
              + (f", and a controlled measurement (`--measure-cost`: batch {costs['batch_size']}, "
                 "losses interleaved, median of rounds)" if costs else "") + ":", "",
              "| arm | in-grid × CE | s per step (controlled) | × CE (controlled) |", "|---|---|---|---|"]  # fmt: skip
    for name, h in head.items():
        sec = measured(costs, name, "seconds_per_step", None)
        cells = [fmt_x(h["in_grid_cost"]), "-" if sec is None else f"{sec:.3f}",
                 "-" if sec is None else f"{measured(costs, name, 'cost', None):.1f}"]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", head


def measured(costs: dict | None, name: str, key: str, default: Any) -> Any:
    """``costs[key]`` of the arm, or of a measured arm with the same loss (``Arm.loss``: the
    step cost does not depend on the length or on the starting weights)."""
    table = costs[key] if costs else {}
    for other in (name, *table):
        if other in table and other in ARMS and ARMS[other].loss == ARMS[name].loss:
            return table[other]
    return default


def fmt_x(value: float, spec: str = ".1f") -> str:
    """A cost, or ``-`` where none was measured."""
    return "-" if math.isnan(value) else format(value, spec)


def paper_regimes(runs: dict, real: list[str], head: dict) -> list[str]:
    """The paper's own regimes: GQ from random weights (its Tables 1-2) against the CE
    pre-training, and the GQ term alone for one epoch (its Table 3) against the weights it
    started from: absolute values of both and the paired differences."""
    names = [n for n in ARMS if (ARMS[n].from_scratch or ARMS[n].base == "none")
             and head.get(n, {}).get("seeds")]  # fmt: skip
    if not names:
        return []
    epochs = next(iter(runs[names[0]].values())).get("settings", {}).get("pretrain_epochs", "?")
    lines = ["", "## The paper's regimes: from scratch, and GQ alone", "",
             "Each arm next to its control on the same seeds (mean over seeds, %), and the "
             "paired differences (points). `scratch_*`: CE + λ · GQ from random weights for the "
             f"pre-training's {epochs} epochs, control the CE pre-training. `gq_only_*`: the GQ term "
             "alone (no CE) for one epoch from the CE weights, control those weights.", "",
             "| arm | seeds | ID acc. control | ID acc. arm | ODIN AUROC control | ODIN AUROC arm "
             "| Δ ODIN AUROC | Δ ODIN FPR95 | Δ ID accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in names:
        h, seeds = head[name], head[name]["seeds"]
        cells = []
        for f in (lambda r: r["accuracy"], lambda r: odin_auroc(r, real)):
            control = [f(control_run(runs, name, s)) for s in seeds]  # type: ignore[arg-type]
            cells += [f"{100 * np.mean(control):.1f}",
                      f"{100 * np.mean([f(runs[name][s]) for s in seeds]):.1f}"]  # fmt: skip
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + f" | {fmt_ci(*h['auroc'])} "
                     f"| {fmt_ci(*h['fpr95'])} | {fmt_ci(*h['accuracy'])} |")  # fmt: skip
    return lines


def ms(values: list[float]) -> str:
    """``mean ± std`` in percent; one value has no std and is shown alone."""
    if len(values) < 2:
        return f"{100 * np.mean(values):.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def dose_arm(name: str, steps: int) -> str:
    return name if steps == 20 else f"{name}_s{steps}"


def dose_response(runs: dict, real: list[str], head: dict) -> list[str]:
    """Δ ODIN AUROC of ``gq_1`` (and the sampled arms) against CE of the same length, by length."""
    lines = ["", "## Does the effect grow with training?", "",
             "`gq_1` against CE of the same length (paired over seeds), and the absolute values "
             "of both (mean over seeds, %).", "",
             "| steps | seeds | Δ ODIN AUROC | Δ ODIN FPR95 | Δ ID accuracy | ODIN AUROC CE | "
             "ODIN AUROC gq_1 | accuracy CE | accuracy gq_1 |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    if not any(head.get(dose_arm("gq_1", steps), {}).get("seeds") for steps in DOSE_STEPS):
        return []
    for steps in DOSE_STEPS:
        name, control = dose_arm("gq_1", steps), dose_arm("ce", steps)
        if not head.get(name, {}).get("seeds"):
            continue
        h, seeds = head[name], head[name]["seeds"]
        absolute = [f"{100 * np.mean([f(runs[a][s]) for s in seeds]):.1f}"
                    for f in (lambda r: odin_auroc(r, real), lambda r: r["accuracy"])
                    for a in (control, name)]  # fmt: skip
        lines.append(f"| {steps} | {len(seeds)} | {fmt_ci(*h['auroc'])} | {fmt_ci(*h['fpr95'])} | "
                     f"{fmt_ci(*h['accuracy'])} | " + " | ".join(absolute) + " |")  # fmt: skip
    return lines


def equal_compute(runs: dict, real: list[str], head: dict) -> list[str]:
    """Each GQ arm of ``EQUAL_COMPUTE`` against CE trained for the same measured compute."""
    lines = []
    for gq, ce_long in EQUAL_COMPUTE:
        if not (head.get(gq) and head.get(ce_long)):
            continue
        lines += ["", f"## The same compute: {gq}, or CE for longer?", "",
                  f"`{gq}` and `{ce_long}`, paired over seeds; compute in CE steps "
                  "(steps × measured cost of a step). The arms' rows are mean ± std over seeds, "
                  "%; the last row is the paired difference, points: mean ± half-width of the "
                  "95 % t interval.", "",
                  "| arm | steps | compute (CE steps) | ODIN AUROC | ODIN FPR95 | ID accuracy |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        seeds = sorted(set(runs[gq]) & set(runs[ce_long]))
        fns = (lambda r: odin_auroc(r, real), lambda r: metric(r, "ODIN", "fpr95", real),
               lambda r: r["accuracy"])  # fmt: skip
        for name in (CONTROLS[gq], gq, ce_long):
            if set(seeds) <= set(runs.get(name, {})) and name in head:
                cells = [ms([f(runs[name][s]) for s in seeds]) for f in fns]
                h = head[name]
                lines.append(f"| {name} (mean ± std) | {h['steps']} | "
                             f"{h['steps'] * h['cost']:,.0f} | " + " | ".join(cells) + " |")  # fmt: skip
        diffs = [fmt_ci(*compare(runs, gq, f, ce_long)[1]) for f in fns]
        lines.append(
            f"| {gq} − {ce_long} (paired, {len(seeds)} seeds, 95 % t interval) | | | "
            + " | ".join(diffs)
            + " |"
        )
    return lines


def cheap_estimator(runs: dict, real: list[str], head: dict) -> list[str]:
    """The sampled estimator's Δ next to exact GQ's on the same seeds, and their difference."""
    lines = ["", "## The cheap estimator: sampled K of the 9 other classes", "",
             "Δ ODIN AUROC against CE of the same length; exact GQ on the same seeds; and "
             "sampled − exact, paired.", "",
             "| arm | steps | seeds | × cost of a CE step | Δ ODIN AUROC | exact gq_1 Δ (same seeds) "
             "| sampled − exact | Δ ID accuracy |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    found = False
    for name in FEW_SEED_ARMS:
        arm = ARMS[name]
        if arm.estimator != "sampled" or arm.from_scratch or arm.base != "ce":
            continue  # the paper's regimes have their own section
        if not head.get(name, {}).get("seeds"):
            continue
        found = True
        h, exact = head[name], dose_arm("gq_1", ARMS[name].steps)
        seeds = sorted(set(h["seeds"]) & set(runs.get(exact, {})))
        control = CONTROLS[name]
        exact_delta = paired([odin_auroc(runs[exact][s], real) - odin_auroc(runs[control][s], real)
                              for s in seeds])  # fmt: skip
        gap = paired([odin_auroc(runs[name][s], real) - odin_auroc(runs[exact][s], real)
                      for s in seeds])  # fmt: skip
        lines.append(f"| {name} | {h['steps']} | {len(h['seeds'])} | {h['cost']:.1f} | "
                     f"{fmt_ci(*h['auroc'])} | {fmt_ci(*exact_delta)} | {fmt_ci(*gap)} | "
                     f"{fmt_ci(*h['accuracy'])} |")  # fmt: skip
    return lines if found else []


def tuned(run: dict, key: str, sets: list[str]) -> float:
    """ODIN with the run's validation-tuned ``(T, eps)``: ``key`` averaged over ``sets``."""
    return float(np.mean([run["odin_tuned"]["ood"][s][key] for s in sets]))


def precision_check(runs: dict, real: list[str], head: dict) -> list[str]:
    """Each float32 twin (``Arm.precision``) next to its bf16 arm: both against their control,
    and twin − bf16 paired, so an effect that bf16's imprecise GQ gradient made shows."""
    lines = ["", "## Precision check: the same arm with GQ and CE in float32", "",
             "Both arms start from the same pre-trained weights and see the same batches and "
             "draws; Δ against CE of the same length (in the other arm's precision), and "
             "float32 − the other arm paired, points.", "",
             "| arm | precision | seeds | Δ ODIN AUROC | Δ ODIN FPR95 | Δ ID accuracy |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    found = False
    for twin, arm in ARMS.items():
        bf16 = next((n for n, a in ARMS.items() if a == replace(arm, precision=None)), None)
        if arm.precision is None or bf16 is None or not head.get(twin, {}).get("seeds"):
            continue
        found = True
        for name in (bf16, twin):
            h = head.get(name)
            if h and h["seeds"]:
                lines.append(f"| {name} | {precisions(runs, name)} | "
                             f"{len(h['seeds'])} | {fmt_ci(*h['auroc'])} | {fmt_ci(*h['fpr95'])} "
                             f"| {fmt_ci(*h['accuracy'])} |")  # fmt: skip
        fns = (lambda r: odin_auroc(r, real), lambda r: metric(r, "ODIN", "fpr95", real),
               lambda r: r["accuracy"])  # fmt: skip
        seeds, _ = compare(runs, twin, fns[0], bf16)
        cells = [fmt_ci(*compare(runs, twin, f, bf16)[1]) for f in fns]
        lines.append(f"| {twin} − {bf16} (paired) | | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines if found else []


def precisions(runs: dict, name: str) -> str:
    """The precisions the runs of arm ``name`` recorded (``float32`` where none is recorded)."""
    return ", ".join(sorted({r.get("precision", "float32") for r in runs[name].values()}))


def noise_and_tuned(runs: dict, real: list[str], sets: list[str], head: dict) -> list[str]:
    """Every arm's Δ on the real-image mean next to the mean with the noise sets, and with ODIN's
    ``(T, eps)`` tuned on the validation pair (the same protocol for every arm and control)."""
    names = [n for n in ARMS if n != "ce" and head.get(n, {}).get("seeds")]
    has_tuned = all("odin_tuned" in runs[n][s] for n in names for s in head[n]["seeds"])
    if not names:
        return []
    lines = ["", "## The noise sets, and ODIN tuned on validation data", "",
             "Δ ODIN AUROC against the control on the real-image mean, and on the mean over "
             "every set including the noise sets"
             + ("; then ODIN with (T, ε) tuned per run by the lowest FPR95 on the validation "
                "pair (the last 500 test images, never scored for detection, against "
                "jigsaw-shuffled copies of them), real-image mean" if has_tuned else "")
             + ". Points, mean ± half-width of the 95 % t interval.", "",
             "| arm | seeds | Δ ODIN AUROC, real | Δ ODIN AUROC, all sets"
             + (" | Δ tuned ODIN AUROC | Δ tuned ODIN FPR95 |" if has_tuned else " |"),
             "|---|---|---|---|" + ("---|---|" if has_tuned else "")]  # fmt: skip
    fns = [lambda r: odin_auroc(r, real), lambda r: metric(r, "ODIN", "auroc", sets)]
    if has_tuned:
        fns += [lambda r: tuned(r, "auroc", real), lambda r: tuned(r, "fpr95", real)]
    for name in names:
        cells = [fmt_ci(*compare(runs, name, f)[1]) for f in fns]
        lines.append(f"| {name} | {len(head[name]['seeds'])} | " + " | ".join(cells) + " |")
    if has_tuned:
        chosen = sorted({(r["odin_tuned"]["temperature"], r["odin_tuned"]["epsilon"])
                         for arm in runs.values() for r in arm.values() if "odin_tuned" in r})  # fmt: skip
        lines += ["", "(T, ε) chosen by the validation pair in these runs: "
                  + ", ".join(f"({t:g}, {e:g})" for t, e in chosen) + "."]  # fmt: skip
    return lines
