"""The command line of ``benchmarks/reproduce.py``."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

import torch
from models import MODEL_NAMES
from train_utils import HelpFormatter

import study

from .arms import ARMS
from .figure import figure, regimes_figure
from .grid import measure_step_costs, run_grid
from .report import report
from .results import load_runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=study.__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--data-dir", default="../shared/data", help="folder of the CIFAR-10/OOD .npz files"
    )
    p.add_argument("--results-dir", default="docs/reproduction/study_long",
                   help="per-run JSON, report.md and the figure (small files, committed); the "
                        "20-step study of every loss is in docs/reproduction/study")  # fmt: skip
    p.add_argument(
        "--cache-dir", default="runs/study", help="cached pre-trained weights (not committed)"
    )
    p.add_argument("--arch", default="small_cnn", choices=MODEL_NAMES, help=(
        "the network; fast_cnn pre-trains (and trains from scratch) with the recipe of "
        "examples/fast_cifar.py, into --results-dir docs/reproduction/study_fast by default"
    ))  # fmt: skip
    p.add_argument("--precision", choices=("float32", "bf16"), default=None,
                   help="forward and GQ passes in float32 or under CPU bf16 autocast "
                        "(default: bf16 for fast_cnn, float32 otherwise)")  # fmt: skip
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="CE epochs on the 50k split (default: 10 for fast_cnn, 5 otherwise)")  # fmt: skip
    p.add_argument("--pretrain-lr", type=float, default=0.1, help="OneCycle peak learning rate")
    p.add_argument("--ft-lr", type=float, default=0.02, help="fine-tuning lr (cosine to 0)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--ood-size", type=int, default=500, help="images per OOD set")
    p.add_argument(
        "--id-eval-size",
        type=int,
        default=2000,
        help="test images scored for detection (accuracy: all)",
    )
    p.add_argument("--tune-odin", action=argparse.BooleanOptionalAction, default=None,
                   help="also report ODIN with (T, eps) tuned on a validation pair (default: "
                        "on for fast_cnn)")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS),
                   help="arms to run, in this order within a seed (none: only pre-train and "
                        "evaluate the CE baseline)")  # fmt: skip
    p.add_argument("--few-seeds", type=int, default=3,
                   help="the sampled-estimator arms run on this many of the seeds")  # fmt: skip
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one process each")
    p.add_argument("--order", choices=("seed", "arm"), default="seed",
                   help="seed-major or arm-major start order (see grid_jobs)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the JSON")
    p.add_argument("--measure-cost", action="store_true",
                   help="only (re)measure the step cost of every arm (step_costs.json), then report")  # fmt: skip
    p.add_argument("--smoke", action="store_true",
                   help="generated data, tiny model, 2 seeds, into a temporary folder unless "
                        "--results-dir/--cache-dir are given; under a minute")  # fmt: skip
    args = p.parse_args(argv)
    args.step_scale = 1.0
    fast = args.arch == "fast_cnn"
    if args.precision is None:
        args.precision = "bf16" if fast else "float32"
    if args.tune_odin is None:
        args.tune_odin = fast
    if args.pretrain_epochs is None:
        args.pretrain_epochs = 10 if fast else 5
    if fast and args.results_dir == p.get_default("results_dir"):
        args.results_dir = "docs/reproduction/study_fast"
    if args.smoke:
        tmp = tempfile.mkdtemp(prefix="gq_study_smoke_")
        if args.results_dir == p.get_default("results_dir"):
            args.results_dir = os.path.join(tmp, "results")
        if args.cache_dir == p.get_default("cache_dir"):
            args.cache_dir = os.path.join(tmp, "cache")
        if not fast:
            args.arch = "tiny_cnn"
        args.pretrain_epochs, args.step_scale = 1, 0.025
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
    runs = load_runs(args.results_dir)
    text, head = report(runs, costs)
    with open(os.path.join(args.results_dir, "report.md"), "w") as f:
        f.write("# GQ decision study: generated report\n\n" + text)
    fig = figure(head, os.path.join(args.results_dir, "study.png"))
    regimes = regimes_figure(runs, head, os.path.join(args.results_dir, "regimes.png"))
    print(text)
    print("report:", os.path.join(args.results_dir, "report.md"), "figures:", fig, regimes)
    return head
