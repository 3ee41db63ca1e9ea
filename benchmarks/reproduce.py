"""Does GQ help ODIN? A seed-controlled reproduction at CPU scale.

Trains a grid of arms x seeds on the CIFAR-10 subset in ``--data-dir`` (``cifar10_train.npz``,
``cifar10_test.npz``), evaluates ODIN (T=1000, eps=0.001), MSP and energy against several OOD
sets, and writes a Markdown report with tables and figures. Every finished run is saved as JSON,
so an interrupted grid resumes where it stopped.

Arms: ``ce`` (lambda = 0); ``paper`` (Eq. 7, exact) and ``reference`` (the authors' batch-level
logit formulation), each at every ``--lams`` value.

    python benchmarks/reproduce.py --data-dir ../shared/data --out-dir runs/repro
    python benchmarks/reproduce.py --data-dir ../shared/data --out-dir runs/repro --report-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from data import augmentation_params, crop_flip, load_cifar, npz_dataset
from models import MODEL_NAMES, build_model

from gq_loss import GQLoss, ODINDetector, class_gradient_norms
from gq_loss.metrics import ood_metrics
from gq_loss.scores import energy_score, msp_score

METHODS = ("odin", "msp", "energy")
T_ODIN, EPS_ODIN = 1000.0, 0.001


def arms(lams: list[float]) -> list[tuple[str, str, float]]:
    """(arm name, formulation, lambda)."""
    out = [("ce", "none", 0.0)]
    for form in ("paper", "reference"):
        out += [(f"{form}_lam{lam:g}", form, lam) for lam in lams]
    return out


# ----------------------------------------------------------------------------- data
def ood_sets(data_dir: str, n: int, seed: int = 1234) -> dict[str, torch.Tensor]:
    """OOD inputs (M, 3, 32, 32) in [0, 1]: real sets where available, and the paper's noise."""
    gen = torch.Generator().manual_seed(seed)
    sets: dict[str, torch.Tensor] = {}
    for name in ("mnist_test", "textures"):
        path = os.path.join(data_dir, f"{name}.npz")
        if os.path.isfile(path):
            sets[name.split("_")[0]] = npz_dataset(path, size=32, rgb=True).tensors[0][:n]
    try:
        from sklearn.datasets import load_sample_images

        photos = [
            torch.from_numpy(im).permute(2, 0, 1).float() / 255
            for im in load_sample_images().images
        ]
        crops = []
        for k in range(n):
            im = photos[k % len(photos)]
            size = int(torch.randint(32, 97, (1,), generator=gen))
            i = int(torch.randint(0, im.shape[1] - size, (1,), generator=gen))
            j = int(torch.randint(0, im.shape[2] - size, (1,), generator=gen))
            crops.append(
                F.interpolate(im[None, :, i : i + size, j : j + size], size=32, mode="area")[0]
            )
        sets["photos"] = torch.stack(crops)
    except ImportError:
        pass
    sets["uniform"] = torch.rand(n, 3, 32, 32, generator=gen)
    sets["gaussian"] = (0.5 + torch.randn(n, 3, 32, 32, generator=gen)).clamp(0, 1)
    return sets


# ----------------------------------------------------------------------------- training
def grad_share(
    model: torch.nn.Module, criterion: GQLoss, x: torch.Tensor, y: torch.Tensor, lam: float
) -> tuple[float, float]:
    """(GQ value, ||lam * dGQ/dtheta|| / ||dCE/dtheta||) on one batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    gq, logits = criterion(model, x, y, return_logits=True)
    g_ce = torch.autograd.grad(
        F.cross_entropy(logits, y), params, retain_graph=True, allow_unused=True
    )
    g_gq = torch.autograd.grad(gq, params, allow_unused=True)
    norm = lambda gs: math.sqrt(sum(float(g.pow(2).sum()) for g in gs if g is not None))  # noqa: E731
    return float(gq.detach()), lam * norm(g_gq) / max(norm(g_ce), 1e-30)


def train_epochs(
    model: torch.nn.Module,
    train: Any,
    epochs: int,
    lr: float,
    seed: int,
    form: str,
    lam: float,
    batch_size: int,
) -> list[dict]:
    """SGD (momentum 0.9, weight decay 5e-4), cosine to 0 over the run, crop + flip augmentation."""
    x_all, y_all = train.tensors
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = len(x_all) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * steps_per_epoch, 1))
    criterion = GQLoss(formulation=form) if form != "none" and lam > 0 else None
    probe = GQLoss()  # Eq. 7 measured on every arm, for the "GQ" column
    log: list[dict] = []
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=gen)
        offsets, flips = augmentation_params(len(x_all), seed, epoch)
        ce_sum = gq_sum = 0.0
        for k in range(steps_per_epoch):
            idx = order[k * batch_size : (k + 1) * batch_size]
            x, y = crop_flip(x_all[idx], offsets[idx], flips[idx]), y_all[idx]
            if criterion is None:
                logits = model(x)
                ce = F.cross_entropy(logits, y)
                loss = ce
            else:  # one forward: the loss hands back the logits it computed
                gq, logits = criterion(model, x, y, return_logits=True)
                ce = F.cross_entropy(logits, y)
                loss = ce + lam * gq
                gq_sum += float(gq.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ce_sum += float(ce.detach())
        model.eval()  # GQ and the gradient share measured on the model as it is evaluated
        gq_probe, share = grad_share(model, probe, x_all[:64], y_all[:64], lam)
        log.append(dict(epoch=epoch, ce=ce_sum / steps_per_epoch, train_gq=gq_sum / steps_per_epoch,
                        gq_paper=gq_probe, grad_share=share, seconds=time.perf_counter() - start))  # fmt: skip
        print(f"    epoch {epoch}: ce {log[-1]['ce']:.3f} gq(Eq.7) {gq_probe:.3f} "
              f"lam*|dGQ|/|dCE| {share:.1e} ({log[-1]['seconds']:.0f}s)", flush=True)  # fmt: skip
    return log


def pretrained(args: argparse.Namespace, seed: int, train: Any, wait: bool = False) -> dict:
    """The CE pre-training shared by every arm of a seed (cached on disk; with ``wait``, another
    worker is computing it)."""
    path = os.path.join(args.out_dir, "pretrain", f"seed{seed}.pt")
    while wait and not os.path.isfile(path):
        time.sleep(5)
    if not os.path.isfile(path):
        print(f"pre-training seed {seed}: {args.pretrain_epochs} CE epochs", flush=True)
        torch.manual_seed(seed)
        model = build_model(args.arch, 10)
        start = time.perf_counter()
        log = train_epochs(model, train, args.pretrain_epochs, args.pretrain_lr, seed, "none", 0.0,
                           args.batch_size)  # fmt: skip
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(
            dict(model=model.state_dict(), log=log, seconds=time.perf_counter() - start),
            path + ".tmp",
        )
        os.replace(path + ".tmp", path)
    return torch.load(path)


def train_run(
    args: argparse.Namespace, form: str, lam: float, seed: int, train: Any
) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    model = build_model(args.arch, 10)
    base = pretrained(args, seed, train, wait=args.workers > 1) if args.pretrain_epochs else None
    if base is not None:
        model.load_state_dict(base["model"])
    start = time.perf_counter()
    # The arm's phase draws its own data order: same for every arm of a seed.
    log = train_epochs(model, train, args.epochs, args.lr, 1000 + seed, form, lam, args.batch_size)
    return model, dict(log=log, train_seconds=time.perf_counter() - start,
                       pretrain_seconds=base["seconds"] if base else 0.0)  # fmt: skip


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor, bs: int = 500) -> torch.Tensor:
    return torch.cat([model(x[i : i + bs]) for i in range(0, len(x), bs)])


def evaluate(model: torch.nn.Module, test: Any, oods: dict[str, torch.Tensor]) -> dict:
    model.eval()
    x_id, y_id = test.tensors
    detector = ODINDetector(model, temperature=T_ODIN, epsilon=EPS_ODIN, batch_size=500)

    def all_scores(x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = logits_of(model, x)
        return dict(odin=detector.score(x), msp=msp_score(logits), energy=energy_score(logits))

    id_scores = all_scores(x_id)
    acc = float((logits_of(model, x_id).argmax(1) == y_id).float().mean())
    results: dict[str, Any] = dict(accuracy=acc, ood={})
    for name, x in oods.items():
        s = all_scores(x)
        results["ood"][name] = {m: ood_metrics(id_scores[m], s[m]) for m in METHODS}
    return results


def figure_data(
    model: torch.nn.Module, test: Any, oods: dict[str, torch.Tensor], n: int = 500
) -> dict:
    """Per-sample quantities of the paper's Fig. 1 (input-gradient L1 norm of log-softmax at T for
    the predicted class) and Fig. 2 (top-1 minus top-2 logit)."""
    model.eval()
    out = {}
    for name, x in [("id", test.tensors[0][:n])] + [(k, v[:n]) for k, v in oods.items()]:
        logits = logits_of(model, x)
        pred = logits.argmax(1, keepdim=True)
        norms = class_gradient_norms(
            model, x, operand="log_softmax", temperature=T_ODIN, classes=pred
        )
        top2 = logits.topk(2, dim=1).values
        out[name] = dict(
            grad_norm=norms[:, 0].tolist(), logit_gap=(top2[:, 0] - top2[:, 1]).tolist()
        )
    return out


# ----------------------------------------------------------------------------- report
def t_critical(df: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:  # two-sided 95% quantiles for small df
        table = {
            1: 12.706,
            2: 4.303,
            3: 3.182,
            4: 2.776,
            5: 2.571,
            6: 2.447,
            7: 2.365,
            8: 2.306,
            9: 2.262,
        }
        return table.get(df, 1.96)


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std over seeds) in percent."""
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{100 * np.mean(values):.2f} ± {100 * std:.2f}"


def paired_ci(diffs: list[float]) -> str:
    """Mean of paired differences with a two-sided 95% t interval."""
    d = np.asarray(diffs)
    half = t_critical(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return f"{d.mean():+.2f} [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}]"


def mean_over_ood(run: dict, method: str, key: str) -> float:
    return float(np.mean([run["ood"][s][method][key] for s in run["ood"]]))


def write_report(args: argparse.Namespace, runs: dict[str, dict[int, dict]], arm_list: list) -> str:
    lines = [f"Model `{args.arch}`; {args.pretrain_epochs} CE pre-training epochs (lr {args.pretrain_lr}) "
             f"shared by the arms of a seed, then {args.epochs} epoch(s) of each arm's loss (lr {args.lr}); "
             f"batch {args.batch_size}; seeds {args.seeds}; ODIN T={T_ODIN:g}, eps={EPS_ODIN:g}.", ""]  # fmt: skip
    ood_names = sorted(next(iter(next(iter(runs.values())).values()))["ood"])
    lines += ["## Per arm: mean ± std over seeds (OOD metrics averaged over " + ", ".join(ood_names) + ")", "",
              "| arm | seeds | ID acc. | " + " | ".join(f"{m} AUROC | {m} FPR95" for m in METHODS) +
              " | GQ (Eq. 7) | grad share | train s/run |",
              "|---|---|---|" + "---|---|" * len(METHODS) + "---|---|---|"]  # fmt: skip
    for arm, _, _ in arm_list:
        rs = list(runs.get(arm, {}).values())
        if not rs:
            continue
        cols = [mean_std([r["accuracy"] for r in rs])]
        for m in METHODS:
            cols += [
                mean_std([mean_over_ood(r, m, "auroc") for r in rs]),
                mean_std([mean_over_ood(r, m, "fpr95") for r in rs]),
            ]
        cols += [f"{np.mean([r['train']['log'][-1]['gq_paper'] for r in rs]):.3f}",
                 f"{np.mean([r['train']['log'][-1]['grad_share'] for r in rs]):.1e}",
                 f"{np.mean([r['train']['train_seconds'] for r in rs]):.0f}"]  # fmt: skip
        lines.append(f"| {arm} | {len(rs)} | " + " | ".join(cols) + " |")
    lines += ["", "## Paired difference arm − CE per seed, mean and 95% CI (t), in points", "",
              "| arm | n | Δ ID acc. | Δ ODIN AUROC | Δ ODIN FPR95 | Δ MSP AUROC | Δ energy AUROC |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    ce = runs.get("ce", {})
    for arm, _, _ in arm_list[1:]:
        seeds = sorted(set(runs.get(arm, {})) & set(ce))
        if len(seeds) < 2:
            continue

        metrics = [
            lambda r: r["accuracy"],
            lambda r: mean_over_ood(r, "odin", "auroc"),
            lambda r: mean_over_ood(r, "odin", "fpr95"),
            lambda r: mean_over_ood(r, "msp", "auroc"),
            lambda r: mean_over_ood(r, "energy", "auroc"),
        ]
        cells = [paired_ci([100 * (f(runs[arm][s]) - f(ce[s])) for s in seeds]) for f in metrics]
        lines.append(f"| {arm} | {len(seeds)} | " + " | ".join(cells) + " |")
    lines += ["", "## ODIN per OOD set (AUROC / FPR95, mean over seeds, %)", "",
              "| arm | " + " | ".join(ood_names) + " |", "|---|" + "---|" * len(ood_names)]  # fmt: skip
    for arm, _, _ in arm_list:
        rs = list(runs.get(arm, {}).values())
        if rs:
            cells = [f"{100 * np.mean([r['ood'][s]['odin']['auroc'] for r in rs]):.1f} / "
                     f"{100 * np.mean([r['ood'][s]['odin']['fpr95'] for r in rs]):.1f}" for s in ood_names]  # fmt: skip
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_figures(
    args: argparse.Namespace, runs: dict[str, dict[int, dict]], arm_list: list
) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no figures")
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for form, marker in (("paper", "o"), ("reference", "s")):
        xs, ms, ss = [], [], []
        for arm, f, lam in arm_list:
            if f == form and runs.get(arm):
                v = [mean_over_ood(r, "odin", "auroc") * 100 for r in runs[arm].values()]
                (
                    xs.append(lam),
                    ms.append(np.mean(v)),
                    ss.append(np.std(v, ddof=1) if len(v) > 1 else 0),
                )
        if xs:
            ax.errorbar(xs, ms, yerr=ss, marker=marker, capsize=3, label=f"CE + λ·GQ ({form})")
    if runs.get("ce"):
        v = [mean_over_ood(r, "odin", "auroc") * 100 for r in runs["ce"].values()]
        ax.axhspan(
            np.mean(v) - np.std(v, ddof=1),
            np.mean(v) + np.std(v, ddof=1),
            color="grey",
            alpha=0.3,
            label="CE only (mean ± std)",
        )
    ax.set_xscale("log"), ax.set_xlabel("λ"), ax.set_ylabel("ODIN AUROC, mean over OOD sets (%)")
    ax.set_title("ODIN AUROC by λ (error bars: std over seeds)"), ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(args.out_dir, "auroc_by_lambda.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    data = {arm: json.load(open(os.path.join(args.out_dir, f"figure_data_{arm}.json")))
            for arm in ("ce", args.figure_arm)
            if os.path.isfile(os.path.join(args.out_dir, f"figure_data_{arm}.json"))}  # fmt: skip
    if data:
        for key, xlabel, name in (("grad_norm", "‖∇x log S_ŷ(x; T=1000)‖₁ (log scale)", "fig1_grad_norm.png"),
                                  ("logit_gap", "top-1 − top-2 logit", "fig2_logit_gap.png")):  # fmt: skip
            fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 3.5), sharey=False)
            for ax, (arm, sets) in zip(np.atleast_1d(axes), data.items()):
                for set_name, vals in sets.items():
                    v = np.asarray(vals[key])
                    v = np.log10(np.maximum(v, 1e-30)) if key == "grad_norm" else v
                    ax.hist(
                        v, bins=40, density=True, histtype="step", label=set_name, linewidth=1.5
                    )
                (
                    ax.set_title(arm),
                    ax.set_xlabel(("log10 " if key == "grad_norm" else "") + xlabel),
                    ax.set_ylabel("density"),
                )
                ax.legend(fontsize=7)
            fig.tight_layout()
            paths.append(os.path.join(args.out_dir, name))
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)
    return paths


def run_grid(args: argparse.Namespace, grid: list, train: Any, test: Any, oods: dict) -> None:
    """Trains and evaluates the grid items ``k`` with ``k % workers == worker``; skips finished ones."""
    t0 = time.perf_counter()
    for seed in args.seeds[args.worker :: args.workers] if args.pretrain_epochs else []:
        pretrained(args, seed, train)  # this worker's share of the pre-training
    for k, ((arm, form, lam), seed) in enumerate(grid):
        path = os.path.join(args.out_dir, arm, f"seed{seed}.json")
        if k % args.workers != args.worker or os.path.isfile(path):
            continue
        print(
            f"[{k + 1}/{len(grid)}] {arm} seed {seed} ({time.perf_counter() - t0:.0f}s elapsed)",
            flush=True,
        )
        model, info = train_run(args, form, lam, seed, train)
        result = evaluate(model, test, oods) | dict(
            train=info, arm=arm, seed=seed, lam=lam, formulation=form
        )
        if seed == args.seeds[0] and arm in ("ce", args.figure_arm):
            fig_path = os.path.join(args.out_dir, f"figure_data_{arm}.json")
            json.dump(figure_data(model, test, oods), open(fig_path, "w"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        json.dump(result, open(path + ".tmp", "w"))
        os.replace(path + ".tmp", path)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out-dir", default="runs/reproduce")
    p.add_argument("--arch", default="tiny_cnn", choices=MODEL_NAMES)
    p.add_argument(
        "--pretrain-epochs",
        type=int,
        default=6,
        help="CE epochs shared by all arms of a seed (0: from scratch)",
    )
    p.add_argument("--pretrain-lr", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=1, help="epochs of each arm's own loss")
    p.add_argument(
        "--lr", type=float, default=0.01, help="learning rate of the arm phase (cosine to 0)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--lams", type=float, nargs="+", default=[1e-6, 1e-3, 1e-1, 1.0])
    p.add_argument("--ood-size", type=int, default=1000)
    p.add_argument("--figure-arm", default="paper_lam1", help="arm compared with CE in Fig. 1/2")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (one thread each)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    arm_list = arms(args.lams)
    grid = [(a, s) for s in args.seeds for a in arm_list]  # seed-major: every arm gets seed 0 first
    if not args.report_only:
        train = load_cifar("cifar10", args.data_dir, "train")
        test = load_cifar("cifar10", args.data_dir, "test")
        if args.train_limit:
            train = torch.utils.data.TensorDataset(*(t[: args.train_limit] for t in train.tensors))
        if args.worker is not None:  # a child process of --workers
            torch.set_num_threads(1)
            run_grid(args, grid, train, test, ood_sets(args.data_dir, args.ood_size))
            return
        start = time.perf_counter()
        if args.workers == 1:
            args.worker = 0
            run_grid(args, grid, train, test, ood_sets(args.data_dir, args.ood_size))
        else:
            import subprocess

            children = [
                subprocess.Popen([sys.executable, *sys.argv, "--worker", str(w)])
                for w in range(args.workers)
            ]
            if any(c.wait() for c in children):
                raise SystemExit("a worker failed; rerun the same command to resume")
        with open(os.path.join(args.out_dir, "wall_time.txt"), "a") as f:
            f.write(f"{time.perf_counter() - start:.0f} s for the runs missing at start\n")
    runs: dict[str, dict[int, dict]] = {}
    for (arm, _, _), seed in grid:
        path = os.path.join(args.out_dir, arm, f"seed{seed}.json")
        if os.path.isfile(path):
            runs.setdefault(arm, {})[seed] = json.load(open(path))
    if not runs:
        raise SystemExit(f"no finished runs in {args.out_dir}")
    report = write_report(args, runs, arm_list)
    header = (f"# Reproduction report\n\nMachine: {platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}.\n\n")  # fmt: skip
    with open(os.path.join(args.out_dir, "report.md"), "w") as f:
        f.write(header + report)
    figs = write_figures(args, runs, arm_list)
    print(report)
    print("figures:", *figs)


if __name__ == "__main__":
    main()
