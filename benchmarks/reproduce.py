"""When is GQ worth its cost? A seed-paired decision study on CIFAR-10 (CPU scale).

For every seed: one CE pre-training on the whole CIFAR-10 training split (cached), then every arm
fine-tunes a copy of those weights on the same fixed subset, with the same batch order, the same
augmentation and the same number of steps. Each arm is evaluated on the 10,000 test images and on
real-image OOD sets (MNIST, textures, photo crops) and ODIN's noise sets (kept out of the mean):
ODIN (T = 1000, eps = 0.001), MSP and energy. Every finished run is one JSON file, so the grid
resumes where it stopped; ``--report-only`` rebuilds the tables and the figure from them.

Arms: ``ce`` (continued CE, the control); ``gq_0.1``, ``gq_1``, ``gq_10`` (CE + lambda * GQ,
Eq. 7 exact); ``gq_reversed`` (lambda = -1: GQ maximised); ``logitnorm`` (Wei et al. 2022, CE on
``f / (tau * (||f|| + 1e-7))``, tau = 0.04); ``reference_1`` (the authors' formulation on logits).

    python benchmarks/reproduce.py --data-dir ../shared/data       # the whole grid; resumes
    python benchmarks/reproduce.py --seeds 0 2 4 &  python benchmarks/reproduce.py --seeds 1 3
                                                    # the same on two cores (one thread each)
    python benchmarks/reproduce.py --report-only                   # tables + figure from the JSON
    python benchmarks/reproduce.py --smoke                         # generated data, < 1 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import _examples_path  # noqa: F401  (puts examples/ on sys.path)
import numpy as np
import torch
import torch.nn.functional as F
from data import (
    augmentation_params,
    crop_flip,
    load_cifar,
    noise_images,
    npz_dataset,
    photo_crops,
    synthetic_dataset,
)
from evaluation import logits_in_batches, score_methods
from models import MODEL_NAMES, build_model
from torch import Tensor, nn
from train_utils import HelpFormatter, progress

from gq_loss import GQLoss
from gq_loss.metrics import ood_metrics

DETECTION_METHODS = ("ODIN", "MSP", "energy")
T_ODIN, EPS_ODIN = 1000.0, 0.001
LOGITNORM_TAU = 0.04
NOISE_SETS = ("uniform", "gaussian")


@dataclass(frozen=True)
class Arm:
    """One fine-tuning loss: ``base`` ("ce" or "logitnorm") + ``lam`` * GQ(``formulation``)."""

    base: str = "ce"
    lam: float = 0.0
    formulation: str = "paper"


ARMS = {
    "ce": Arm(),
    "gq_0.1": Arm(lam=0.1),
    "gq_1": Arm(lam=1.0),
    "gq_10": Arm(lam=10.0),
    "gq_reversed": Arm(lam=-1.0),
    "logitnorm": Arm(base="logitnorm"),
    "reference_1": Arm(lam=1.0, formulation="reference"),
}


# ----------------------------------------------------------------------------- data
@dataclass
class StudyData:
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    ood: dict[str, Tensor]  # real-image sets first, then NOISE_SETS

    @property
    def real_sets(self) -> list[str]:
        return [k for k in self.ood if k not in NOISE_SETS]


def load_data(args: argparse.Namespace) -> StudyData:
    n, side = args.ood_size, 32
    if args.smoke:  # generated 16x16 data only: a run of this script must not need ../shared
        side = 16
        train = synthetic_dataset(256, 10, image_size=side, seed=1).tensors
        test = synthetic_dataset(128, 10, image_size=side, seed=2).tensors
        ood = {"other patterns": synthetic_dataset(n, 7, image_size=side, seed=3).tensors[0]}
    else:
        train = load_cifar("cifar10", args.data_dir, "train_full").tensors
        test = load_cifar("cifar10", args.data_dir, "test_full").tensors
        ood = {}
        for name, file in (("MNIST", "mnist_test.npz"), ("textures", "textures.npz")):
            path = os.path.join(args.data_dir, file)
            ood[name] = npz_dataset(path, size=32, rgb=True).tensors[0][:n]
    ood["photos"] = photo_crops(n, side, seed=1234)
    for i, kind in enumerate(NOISE_SETS):
        ood[kind] = noise_images(kind, n, (3, side, side), seed=1235 + i)
    return StudyData(train, test, ood)


# ----------------------------------------------------------------------------- training
def logitnorm_loss(logits: Tensor, y: Tensor, tau: float = LOGITNORM_TAU) -> Tensor:
    """LogitNorm (Wei et al., ICML 2022): CE on the logits scaled to norm ``1 / tau``."""
    norms = logits.norm(p=2, dim=-1, keepdim=True) + 1e-7
    return F.cross_entropy(logits / (norms * tau), y)


def train(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    *,
    arm: Arm,
    epochs: int,
    lr: float,
    schedule: str,
    seed: int,
    batch_size: int,
    desc: str,
    show_progress: bool,
    probe: Any = None,
) -> list[dict[str, float]]:
    """SGD (nesterov momentum 0.9, weight decay 5e-4) with reflect-pad crop + flip.

    ``schedule``: ``"onecycle"`` (to ``lr``, for pre-training) or ``"cosine"`` (from ``lr`` to 0).
    The batch order and augmentation are a function of ``seed`` alone, so every arm of a seed
    sees the same batches. Returns one log row per epoch (loss, GQ, seconds).
    """
    x_all, y_all = data
    steps = len(x_all) // batch_size
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if schedule == "onecycle":
        sched: Any = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * steps, 1))
    criterion = GQLoss(formulation=arm.formulation) if arm.lam else None
    gen = torch.Generator().manual_seed(seed)
    log: list[dict[str, float]] = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=gen)
        offsets, flips = augmentation_params(len(x_all), seed, epoch)
        sums = {"loss": 0.0, "gq": 0.0}
        start = time.perf_counter()
        bar = progress(range(steps), enabled=show_progress, desc=f"{desc} ep {epoch + 1}/{epochs}",
                       leave=False, mininterval=5)  # fmt: skip
        for k in bar:
            idx = order[k * batch_size : (k + 1) * batch_size]
            x = crop_flip(x_all[idx], offsets[idx], flips[idx], padding_mode="reflect")
            y = y_all[idx]
            if criterion is None:
                logits, gq = model(x), None
            else:  # one forward: the loss hands back the logits it computed
                gq, logits = criterion(model, x, y, return_logits=True)
            loss = (
                logitnorm_loss(logits, y) if arm.base == "logitnorm" else F.cross_entropy(logits, y)
            )
            if gq is not None:
                loss = loss + arm.lam * gq
                sums["gq"] += float(gq.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums["loss"] += float(loss.detach())
            bar.set_postfix(loss=f"{sums['loss'] / (k + 1):.3f}", refresh=False)
        bar.close()
        log.append({"epoch": epoch, "loss": sums["loss"] / max(steps, 1),
                    "train_gq": sums["gq"] / max(steps, 1), "seconds": time.perf_counter() - start})  # fmt: skip
        if probe is not None:
            log[-1] |= probe(model)
            print(f"  {desc} epoch {epoch + 1}: {log[-1]}", flush=True)
    return log


def pretrained(args: argparse.Namespace, seed: int, data: StudyData) -> tuple[nn.Module, dict]:
    """The CE pre-training shared by every arm of ``seed``, cached under ``--cache-dir``."""
    path = os.path.join(
        args.cache_dir, "pretrain", f"{args.arch}_e{args.pretrain_epochs}_seed{seed}.pt"
    )
    torch.manual_seed(seed)
    model = build_model(args.arch, 10)
    if os.path.isfile(path):
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        return model, json.loads(state["info"])
    log = train(model, data.train, arm=ARMS["ce"], epochs=args.pretrain_epochs, lr=args.pretrain_lr,
                schedule="onecycle", seed=seed, batch_size=args.batch_size,
                desc=f"pre-train seed {seed}", show_progress=args.progress,
                probe=lambda m: quick_probe(m, data))  # fmt: skip
    info = {"log": log, "seconds": sum(r["seconds"] for r in log)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": model.state_dict(), "info": json.dumps(info)}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return model, info


# ----------------------------------------------------------------------------- evaluation
def evaluate(
    model: nn.Module, data: StudyData, id_size: int, batch_size: int = 500
) -> dict[str, Any]:
    """Accuracy on every test image and, per OOD set and method, AUROC / FPR95 / AUPR (fractions)
    against the first ``id_size`` test images."""
    model.eval()
    acc = float((logits_in_batches(model, data.test[0]).argmax(1) == data.test[1]).float().mean())
    kw = dict(
        methods=DETECTION_METHODS, temperature=T_ODIN, epsilon=EPS_ODIN, batch_size=batch_size
    )
    id_scores = score_methods(model, data.test[0][:id_size], **kw)
    ood: dict[str, dict[str, dict[str, float]]] = {}
    for name, x in data.ood.items():
        scores = score_methods(model, x, **kw)
        ood[name] = {m: ood_metrics(id_scores[m], scores[m]) for m in DETECTION_METHODS}
    return {"accuracy": acc, "ood": ood}


def quick_probe(model: nn.Module, data: StudyData, n: int = 300) -> dict[str, float]:
    """ID accuracy and ODIN AUROC per real-image OOD set on ``n`` images each: how detection
    evolves during pre-training (does a longer schedule help?)."""
    kw = dict(methods=("ODIN",), temperature=T_ODIN, epsilon=EPS_ODIN)
    id_scores, logits = score_methods(model, data.test[0][:n], return_logits=True, **kw)
    out = {"probe_acc": float((logits.argmax(1) == data.test[1][:n]).float().mean())}
    for name in data.real_sets:
        ood = score_methods(model, data.ood[name][:n], **kw)
        out[f"probe_auroc_{name}"] = ood_metrics(id_scores["ODIN"], ood["ODIN"])["auroc"]
    return out


def run_one(args: argparse.Namespace, name: str, seed: int, data: StudyData) -> dict[str, Any]:
    base, pre_info = pretrained(args, seed, data)
    model = build_model(args.arch, 10)
    model.load_state_dict(base.state_dict())
    # The fixed fine-tuning subset and the batch order depend on the seed only (not the arm).
    subset = torch.randperm(len(data.train[0]), generator=torch.Generator().manual_seed(seed))
    subset = subset[: args.ft_subset]
    log = train(model, (data.train[0][subset], data.train[1][subset]), arm=ARMS[name],
                epochs=args.ft_epochs, lr=args.ft_lr, schedule="cosine", seed=10_000 + seed,
                batch_size=args.batch_size, desc=f"{name} seed {seed}", show_progress=args.progress)  # fmt: skip
    return evaluate(model, data, args.id_eval_size) | {
        "arm": name, "seed": seed, **asdict(ARMS[name]), "train_log": log,
        "epoch_seconds": float(np.mean([r["seconds"] for r in log])),
        "settings": settings(args), "pretrain": {"seconds": pre_info["seconds"]},
    }  # fmt: skip


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("arch", "pretrain_epochs", "pretrain_lr", "ft_subset", "ft_epochs", "ft_lr",
            "batch_size", "id_eval_size", "ood_size", "threads")  # fmt: skip
    return {k: getattr(args, k) for k in keys} | {"torch": torch.__version__}


def run_grid(args: argparse.Namespace) -> None:
    data = load_data(args)
    t0 = time.perf_counter()
    for seed in args.seeds:  # seed-major: each finished seed is a complete paired comparison
        pre_path = os.path.join(args.results_dir, "pretrained", f"seed{seed}.json")
        if not os.path.isfile(pre_path):
            model, info = pretrained(args, seed, data)
            write_json(pre_path, evaluate(model, data, args.id_eval_size) | {"seed": seed, "train_log": info["log"],
                                                          "settings": settings(args)})  # fmt: skip
        for name in args.arms:
            path = os.path.join(args.results_dir, name, f"seed{seed}.json")
            if os.path.isfile(path):
                continue
            print(f"{name} seed {seed} ({time.perf_counter() - t0:.0f} s elapsed)", flush=True)
            write_json(path, run_one(args, name, seed, data))
    print(f"grid done in {time.perf_counter() - t0:.0f} s (runs missing at start)", flush=True)
    if not os.path.isfile(os.path.join(args.results_dir, "step_costs.json")) and "ce" in args.arms:
        measure_step_costs(args)


def measure_step_costs(args: argparse.Namespace, rounds: int = 3, steps: int = 3) -> dict:
    """Seconds per training step of every arm, same model and batches, arms interleaved over
    ``rounds`` (the first is warm-up) so that a busy machine slows them alike; and their ratio to
    the CE step. Written to ``step_costs.json``; the report's cost column comes from it."""
    side = 16 if args.smoke else 32
    if args.smoke:
        rounds, steps = 2, 1
    data = synthetic_dataset(steps * args.batch_size, 10, image_size=side, seed=5).tensors
    times: dict[str, list[float]] = {name: [] for name in args.arms}
    for r in range(rounds):
        for name in args.arms:
            torch.manual_seed(0)
            log = train(build_model(args.arch, 10), data, arm=ARMS[name], epochs=1, lr=args.ft_lr,
                        schedule="cosine", seed=0, batch_size=args.batch_size, desc=name,
                        show_progress=False)  # fmt: skip
            if r:
                times[name].append(log[0]["seconds"] / steps)
    sec = {k: float(np.median(v)) for k, v in times.items()}
    out = {"seconds_per_step": sec, "cost": {k: v / sec["ce"] for k, v in sec.items()},
           "batch_size": args.batch_size, "arch": args.arch, "threads": args.threads}  # fmt: skip
    write_json(os.path.join(args.results_dir, "step_costs.json"), out)
    return out


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- report
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
    if math.isnan(half):
        return f"{scale * mean:+.1f}"
    return f"{scale * mean:+.1f} ± {scale * half:.1f}"


def metric(run: dict, method: str, key: str, sets: list[str]) -> float:
    return float(np.mean([run["ood"][s][method][key] for s in sets]))


def load_runs(results_dir: str) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for name in ("pretrained", *ARMS):
        folder = os.path.join(results_dir, name)
        if os.path.isdir(folder):
            for f in sorted(os.listdir(folder)):
                if f.startswith("seed") and f.endswith(".json"):
                    with open(os.path.join(folder, f)) as fh:
                        run = json.load(fh)
                    runs.setdefault(name, {})[int(f[4:-5])] = run
    return runs


def report(
    runs: dict[str, dict[int, dict]], costs: dict | None = None
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Markdown tables of the paired differences arm - CE; also returns the headline numbers.

    ``costs``: what :func:`measure_step_costs` wrote; without it the cost column is the median
    over seeds of the arm's fine-tuning epoch time / CE's, measured inside the grid."""
    ce = runs.get("ce", {})
    if not ce:
        raise SystemExit("no finished `ce` runs: nothing to compare with")
    any_run = next(iter(ce.values()))
    sets = list(any_run["ood"])
    real = [s for s in sets if s not in NOISE_SETS]
    st = any_run["settings"]
    lines = [
        f"Model `{st['arch']}`; {st['pretrain_epochs']} CE epochs on the 50k training split "
        f"(OneCycle to lr {st['pretrain_lr']}) shared by the arms of a seed; then each arm "
        f"fine-tunes {st['ft_epochs']} epoch(s) on a fixed {st['ft_subset']}-image subset (cosine "
        f"from lr {st['ft_lr']}), batch {st['batch_size']}, same batch order for every arm. "
        f"ODIN T = {T_ODIN:g}, eps = {EPS_ODIN:g}. Accuracy on the 10,000 test images; detection: "
        f"the first {st['id_eval_size']} test images against "
        f"{st['ood_size']} images per set. Headline mean over the real-image sets "
        f"({', '.join(real)}); noise sets only in their own columns. Differences are arm − CE per "
        "seed, in points: mean ± half-width of the 95 % t interval over seeds.",
        "",
    ]
    head: dict[str, dict[str, Any]] = {}
    ce_secs = {s: r["epoch_seconds"] for s, r in ce.items()}
    lines += ["## Which should I use?", "",
              "| arm | seeds | Δ ODIN AUROC | Δ ODIN FPR95 | Δ ID accuracy | × cost of a CE step |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name in ARMS:
        arm_runs = runs.get(name, {})
        seeds = sorted(set(arm_runs) & set(ce))
        if not seeds:
            continue
        in_grid = float(np.median([arm_runs[s]["epoch_seconds"] / ce_secs[s] for s in seeds]))
        cost = costs["cost"].get(name, in_grid) if costs else in_grid
        cells = {}
        for key, f in (("auroc", lambda r: metric(r, "ODIN", "auroc", real)),
                       ("fpr95", lambda r: metric(r, "ODIN", "fpr95", real)),
                       ("accuracy", lambda r: r["accuracy"])):  # fmt: skip
            cells[key] = paired([f(arm_runs[s]) - f(ce[s]) for s in seeds])
        head[name] = {"seeds": seeds, "cost": cost, "in_grid_cost": in_grid, **cells}
        if name == "ce":
            continue
        lines.append(f"| {name} | {len(seeds)} | {fmt_ci(*cells['auroc'])} | "
                     f"{fmt_ci(*cells['fpr95'])} | {fmt_ci(*cells['accuracy'])} | {cost:.1f} |")  # fmt: skip
    lines += ["", "## Paired differences from CE (real-image mean), points", "",
              "| arm | seeds | Δ ID acc. | Δ ODIN AUROC | Δ ODIN FPR95 | Δ MSP AUROC | "
              "Δ MSP FPR95 | Δ energy AUROC | Δ energy FPR95 |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in list(ARMS)[1:]:
        seeds = sorted(set(runs.get(name, {})) & set(ce))
        if not seeds:
            continue
        fns = [lambda r: r["accuracy"]] + [
            (lambda r, m=m, k=k: metric(r, m, k, real))
            for m in DETECTION_METHODS
            for k in ("auroc", "fpr95")
        ]
        cells = [fmt_ci(*paired([f(runs[name][s]) - f(ce[s]) for s in seeds])) for f in fns]
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")
    for key, label in (("auroc", "AUROC"), ("fpr95", "FPR95")):
        lines += ["", f"## ODIN {label} per OOD set: difference from CE, points", "",
                  "| arm | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]  # fmt: skip
        for name in list(ARMS)[1:]:
            seeds = sorted(set(runs.get(name, {})) & set(ce))
            if seeds:
                cells = [fmt_ci(*paired([runs[name][s]["ood"][o]["ODIN"][key]
                                         - ce[s]["ood"][o]["ODIN"][key] for s in seeds]))
                         for o in sets]  # fmt: skip
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Absolute values: mean ± std over seeds, %", "",
              "| model | seeds | ID acc. | ODIN AUROC (real mean) | "
              + " | ".join(f"ODIN AUROC {s}" for s in sets) + " | MSP AUROC | energy AUROC |",
              "|---|---|---|---|" + "---|" * len(sets) + "---|---|"]  # fmt: skip

    def ms(values: list[float]) -> str:
        sd = np.std(values, ddof=1) if len(values) > 1 else 0.0
        return f"{100 * np.mean(values):.1f} ± {100 * sd:.1f}"

    for name in ("pretrained", *ARMS):
        rs = list(runs.get(name, {}).values())
        if rs:
            cells = [
                ms([r["accuracy"] for r in rs]),
                ms([metric(r, "ODIN", "auroc", real) for r in rs]),
            ]
            cells += [ms([r["ood"][o]["ODIN"]["auroc"] for r in rs]) for o in sets]
            cells += [ms([metric(r, m, "auroc", real) for r in rs]) for m in ("MSP", "energy")]
            lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    secs = [
        r["epoch_seconds"] for arm in runs.values() for r in arm.values() if "epoch_seconds" in r
    ]
    pre = [r["pretrain"]["seconds"] for r in ce.values()]
    lines += ["", f"Measured: CE pre-training {np.mean(pre) / 60:.1f} min per seed; fine-tuning "
              f"epochs {min(secs):.0f}-{max(secs):.0f} s. Machine: {platform.machine()}, "
              f"{os.cpu_count()} cores, {st['threads']} torch thread(s), torch {st['torch']}."]  # fmt: skip
    lines += ["", "Cost of one training step, per arm: in-grid fine-tuning epoch time / CE's (median "
              "over seeds; the machine was shared, so these move with its load)"
              + (f", and a controlled measurement (`--measure-cost`: batch {costs['batch_size']}, "
                 "arms interleaved, median of rounds)" if costs else "") + ":", "",
              "| arm | in-grid × CE | s per step (controlled) | × CE (controlled) |", "|---|---|---|---|"]  # fmt: skip
    for name, h in head.items():
        sec = costs["seconds_per_step"].get(name) if costs else None
        cells = [f"{h['in_grid_cost']:.1f}", "-" if sec is None else f"{sec:.3f}",
                 "-" if sec is None else f"{costs['cost'][name]:.1f}"]  # type: ignore[index]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", head


def figure(head: dict[str, dict[str, Any]], path: str) -> str | None:
    """ΔODIN AUROC (real-image mean) against the cost of an epoch, with 95 % CIs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, h in head.items():
        if name == "ce":
            continue
        mean, half = h["auroc"]
        ax.errorbar([h["cost"]], [100 * mean], yerr=[0 if math.isnan(half) else 100 * half],
                    marker="o", capsize=3, label=f"{name} ({len(h['seeds'])} seeds)")  # fmt: skip
    ax.axhline(0, color="grey", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("cost of a fine-tuning epoch (× CE)")
    ax.set_ylabel("Δ ODIN AUROC vs CE, real-image mean (points)")
    ax.set_title("What each loss buys, and what it costs (95 % CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--data-dir", default="../shared/data", help="folder of the CIFAR-10/OOD .npz files"
    )
    p.add_argument("--results-dir", default="docs/reproduction/study",
                   help="per-run JSON, report.md and the figure (small files, committed)")  # fmt: skip
    p.add_argument(
        "--cache-dir", default="runs/study", help="cached pre-trained weights (not committed)"
    )
    p.add_argument("--arch", default="small_cnn", choices=MODEL_NAMES)
    p.add_argument("--pretrain-epochs", type=int, default=5, help="CE epochs on the 50k split")
    p.add_argument("--pretrain-lr", type=float, default=0.1, help="OneCycle peak learning rate")
    p.add_argument("--ft-subset", type=int, default=2560, help="images of the fine-tuning subset")
    p.add_argument("--ft-epochs", type=int, default=1, help="fine-tuning epochs of every arm")
    p.add_argument("--ft-lr", type=float, default=0.02, help="fine-tuning lr (cosine to 0)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--ood-size", type=int, default=500, help="images per OOD set")
    p.add_argument(
        "--id-eval-size",
        type=int,
        default=2000,
        help="test images scored for detection (accuracy: all)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS),
                   help="arms to run (none: only pre-train and evaluate the CE baseline)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the JSON")
    p.add_argument("--measure-cost", action="store_true",
                   help="only (re)measure the step cost of every arm (step_costs.json), then report")  # fmt: skip
    p.add_argument("--smoke", action="store_true",
                   help="generated data, tiny model, 2 seeds, into a temporary folder unless "
                        "--results-dir/--cache-dir are given; under a minute")  # fmt: skip
    args = p.parse_args(argv)
    if args.smoke:
        tmp = tempfile.mkdtemp(prefix="gq_study_smoke_")
        if args.results_dir == p.get_default("results_dir"):
            args.results_dir = os.path.join(tmp, "results")
        if args.cache_dir == p.get_default("cache_dir"):
            args.cache_dir = os.path.join(tmp, "cache")
        args.arch, args.pretrain_epochs, args.ft_subset, args.ft_epochs = "tiny_cnn", 1, 32, 1
        args.batch_size, args.ood_size, args.seeds = 32, 32, args.seeds[:2]
        args.id_eval_size = 64
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.report_only or args.measure_cost):
        run_grid(args)
    if args.measure_cost:
        measure_step_costs(args)
    cost_path = os.path.join(args.results_dir, "step_costs.json")
    costs = json.load(open(cost_path)) if os.path.isfile(cost_path) else None
    text, head = report(load_runs(args.results_dir), costs)
    with open(os.path.join(args.results_dir, "report.md"), "w") as f:
        f.write("# GQ decision study: generated report\n\n" + text)
    fig = figure(head, os.path.join(args.results_dir, "delta_auroc_vs_cost.png"))
    print(text)
    print("report:", os.path.join(args.results_dir, "report.md"), "figure:", fig)
    return head


if __name__ == "__main__":
    main()
