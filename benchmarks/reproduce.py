"""When is GQ worth its cost? A seed-paired decision study on CIFAR-10 (CPU scale).

For every seed: one CE pre-training on the whole CIFAR-10 training split (cached), then every arm
fine-tunes a copy of those weights for its number of steps on the first ``steps x batch`` images
of a seed-fixed permutation of the training split (cycled when the steps need more), with the
same batch order and augmentation as every other arm of the same length. Each arm is evaluated on
the 10,000 test images and on real-image OOD sets (MNIST, textures, photo crops) and ODIN's noise
sets (kept out of the mean): ODIN (T = 1000, eps = 0.001), MSP and energy. Every finished run is
one JSON file, so the grid resumes where it stopped; ``--report-only`` rebuilds the tables and the
figures from them.

Arms (20 steps unless the name says ``_s<steps>``):

- ``ce`` (continued CE, the control); ``gq_0.1``, ``gq_1``, ``gq_10`` (CE + lambda * GQ, Eq. 7
  exact); ``gq_reversed`` (lambda = -1: GQ maximised); ``logitnorm`` (Wei et al. 2022, CE on
  ``f / (tau * (||f|| + 1e-7))``, tau = 0.04); ``reference_1`` (the authors' formulation on
  logits);
- dose-response: ``ce_s80``, ``ce_s320``, ``gq_1_s80``, ``gq_1_s320``;
- equal compute: ``ce_s1600``, CE given the measured compute of ``gq_1_s80`` (80 steps x 20.4);
- the cheap estimator: ``gq_1_k1``, ``gq_1_k3``, ``gq_1_k1_s320``, ``gq_1_k3_s320``
  (``estimator="sampled"`` with K = 1 or 3 of the 9 other classes), on the first
  ``--few-seeds`` seeds.

    python benchmarks/reproduce.py --data-dir ../shared/data --jobs 2 --order arm \
        --arms ce gq_1 ce_s80 ce_s320 gq_1_k1 ce_s1600 gq_1_s80 gq_1_s320 gq_1_k1_s320 \
               gq_1_k3 gq_1_k3_s320              # the longer-training grid; resumes
    python benchmarks/reproduce.py --report-only                   # tables + figures from JSON
    python benchmarks/reproduce.py --report-only --results-dir docs/reproduction/study
                                                   # the 20-step study of every loss
    python benchmarks/reproduce.py --measure-cost --arms ...       # step cost of every arm
    python benchmarks/reproduce.py --smoke                         # generated data, < 1 min

The committed runs pair with the pre-training of the machine that ran them (cached under
``--cache-dir``, not committed). Resuming on a machine without that cache pre-trains again and
says whether the test accuracy equals the stored one; CPU pre-training is not bit-identical
across machines, so a mismatch means the new runs of that seed pair only with each other.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
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
    """One fine-tuning run: ``base`` ("ce", "logitnorm" or "none") + ``lam`` * GQ(``formulation``,
    ``estimator`` with ``num_sampled`` = K), for ``steps`` optimiser steps."""

    base: str = "ce"
    lam: float = 0.0
    formulation: str = "paper"
    estimator: str = "exact"
    num_sampled: int | None = None
    steps: int = 20
    from_scratch: bool = False  # the CE pre-training's recipe, seed and batches, with this loss

    @property
    def loss(self) -> Arm:
        """The same loss at the default length: arms that share it share one step cost."""
        return Arm(self.base, self.lam, self.formulation, self.estimator, self.num_sampled)


ARMS = {
    "ce": Arm(),
    "gq_0.1": Arm(lam=0.1),
    "gq_1": Arm(lam=1.0),
    "gq_10": Arm(lam=10.0),
    "gq_reversed": Arm(lam=-1.0),
    "logitnorm": Arm(base="logitnorm"),
    "reference_1": Arm(lam=1.0, formulation="reference"),
    # dose-response: does the effect grow with training?
    "ce_s80": Arm(steps=80),
    "gq_1_s80": Arm(lam=1.0, steps=80),
    "ce_s320": Arm(steps=320),
    "gq_1_s320": Arm(lam=1.0, steps=320),
    # equal compute: gq_1_s80 costs 80 x 20.4 CE steps (step_costs.json, --measure-cost)
    "ce_s1600": Arm(steps=1600),
    # the cheap estimator: the target and K of the 9 other classes
    "gq_1_k1": Arm(lam=1.0, estimator="sampled", num_sampled=1),
    "gq_1_k3": Arm(lam=1.0, estimator="sampled", num_sampled=3),
    "gq_1_k1_s320": Arm(lam=1.0, estimator="sampled", num_sampled=1, steps=320),
    "gq_1_k3_s320": Arm(lam=1.0, estimator="sampled", num_sampled=3, steps=320),
    # the paper's regime: from random weights, 5 epochs (its control is the CE pre-training)
    "scratch_gq_1_k1": Arm(
        lam=1.0, estimator="sampled", num_sampled=1, steps=1950, from_scratch=True
    ),
    "scratch_gq_0.1_k1": Arm(
        lam=0.1, estimator="sampled", num_sampled=1, steps=1950, from_scratch=True
    ),
    "scratch_gq_1": Arm(lam=1.0, steps=1950, from_scratch=True),
    # the paper's Table 3: the GQ term alone (no CE) for one epoch, from the CE weights
    "gq_only_k1_s390": Arm(base="none", lam=1.0, estimator="sampled", num_sampled=1, steps=390),
}
FEW_SEED_ARMS = (
    "gq_1_k1",
    "gq_1_k3",
    "gq_1_k1_s320",
    "gq_1_k3_s320",
    "scratch_gq_0.1_k1",
    "scratch_gq_1",
    "gq_only_k1_s390",
)
DOSE_STEPS = (20, 80, 320)
# Each arm's control: CE of the same length; a longer CE arm is compared with the 20-step one.
CONTROLS = {
    name: "pretrained"
    if arm.from_scratch or arm.base == "none"
    else "ce"
    if arm.steps == 20 or arm.lam == 0
    else f"ce_s{arm.steps}"
    for name, arm in ARMS.items()
}
EQUAL_COMPUTE = ("gq_1_s80", "ce_s1600")


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


def base_loss(base: str, logits: Tensor, y: Tensor) -> Tensor:
    """The arm's loss before the GQ term: CE, LogitNorm, or none (GQ alone)."""
    if base == "logitnorm":
        return logitnorm_loss(logits, y)
    if base == "none":
        return logits.new_zeros(())
    return F.cross_entropy(logits, y)


def train(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    *,
    arm: Arm,
    steps: int,
    lr: float,
    schedule: str,
    seed: int,
    batch_size: int,
    desc: str,
    show_progress: bool,
    probe: Any = None,
    checkpoint: str | None = None,
) -> list[dict[str, float]]:
    """``steps`` SGD steps (nesterov momentum 0.9, weight decay 5e-4) with reflect-pad crop + flip,
    in epochs over ``data`` (the last one cut short when ``steps`` ends inside it).

    ``schedule``: ``"onecycle"`` (to ``lr``, for pre-training) or ``"cosine"`` (from ``lr`` to 0).
    The batch order, the augmentation and the sampled estimator's draws are a function of
    ``seed`` alone, so every arm of a seed with the same data sees the same batches. Returns one
    log row per epoch (loss, GQ, seconds, steps).

    ``checkpoint``: a file written after every epoch (weights, optimiser, schedule, random
    states, log) and resumed from when it exists, so that an interrupted run continues where its
    last epoch ended and gives the numbers of an uninterrupted one. A resumed epoch's log row
    says ``"resumed": True``. The file is removed when the run ends.
    """
    x_all, y_all = data
    per_epoch = len(x_all) // batch_size
    if per_epoch < 1 or steps < 1:
        raise ValueError(f"need >= 1 step and >= {batch_size} images, got {steps}, {len(x_all)}")
    epochs = math.ceil(steps / per_epoch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if schedule == "onecycle":
        sched: Any = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    criterion = (
        GQLoss(formulation=arm.formulation, estimator=arm.estimator, num_sampled=arm.num_sampled)
        if arm.lam
        else None
    )
    gen = torch.Generator().manual_seed(seed)
    draws = torch.Generator().manual_seed(seed + 1) if arm.estimator == "sampled" else None
    log: list[dict[str, float]] = []
    first = 0
    if checkpoint is not None and os.path.isfile(checkpoint):
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["order_rng"])
        if draws is not None:
            draws.set_state(state["draws_rng"])
        torch.set_rng_state(state["torch_rng"])
        log = json.loads(state["log"])
        first = len(log)
        print(f"  {desc}: resumed after epoch {first} from {checkpoint}", flush=True)
    for epoch in range(first, epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=gen)
        offsets, flips = augmentation_params(len(x_all), seed, epoch)
        sums = {"loss": 0.0, "gq": 0.0}
        start = time.perf_counter()
        n = min(per_epoch, steps - epoch * per_epoch)
        bar = progress(range(n), enabled=show_progress, desc=f"{desc} ep {epoch + 1}/{epochs}",
                       leave=False, mininterval=5)  # fmt: skip
        for k in bar:
            idx = order[k * batch_size : (k + 1) * batch_size]
            x = crop_flip(x_all[idx], offsets[idx], flips[idx], padding_mode="reflect")
            y = y_all[idx]
            if criterion is None:
                logits, gq = model(x), None
            else:  # one forward: the loss hands back the logits it computed
                gq, logits = criterion(model, x, y, generator=draws, return_logits=True)
            loss = base_loss(arm.base, logits, y)
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
        log.append({"epoch": epoch, "loss": sums["loss"] / n, "train_gq": sums["gq"] / n,
                    "seconds": time.perf_counter() - start, "steps": n})  # fmt: skip
        if epoch == first > 0:
            log[-1]["resumed"] = True
        if probe is not None:
            log[-1] |= probe(model)
            print(f"  {desc} epoch {epoch + 1}: {log[-1]}", flush=True)
        if checkpoint is not None and epoch + 1 < epochs:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "order_rng": gen.get_state(),
                     "torch_rng": torch.get_rng_state(), "log": json.dumps(log)}  # fmt: skip
            if draws is not None:
                state["draws_rng"] = draws.get_state()
            os.makedirs(os.path.dirname(checkpoint) or ".", exist_ok=True)
            torch.save(state, checkpoint + ".tmp")
            os.replace(checkpoint + ".tmp", checkpoint)
    if checkpoint is not None and os.path.isfile(checkpoint):
        os.remove(checkpoint)
    return log


def pretrained(args: argparse.Namespace, seed: int, data: StudyData) -> tuple[nn.Module, dict]:
    """The CE pre-training shared by every arm of ``seed``, cached under ``--cache-dir``.

    When the cache is missing but the seed's ``pretrained`` JSON exists (a new machine resuming a
    committed grid), the pre-training runs again and its test accuracy is compared with the
    stored one: equal means the new arms pair with the stored runs of that seed."""
    path = pretrain_path(args, seed)
    torch.manual_seed(seed)
    model = build_model(args.arch, 10)
    if os.path.isfile(path):
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        return model, json.loads(state["info"])
    steps = args.pretrain_epochs * (len(data.train[0]) // args.batch_size)
    log = train(model, data.train, arm=ARMS["ce"], steps=steps, lr=args.pretrain_lr,
                schedule="onecycle", seed=seed, batch_size=args.batch_size,
                desc=f"pre-train seed {seed}", show_progress=args.progress,
                probe=lambda m: quick_probe(m, data), checkpoint=path + ".epoch")  # fmt: skip
    info: dict[str, Any] = {"log": log, "seconds": sum(r["seconds"] for r in log)}
    stored = os.path.join(args.results_dir, "pretrained", f"seed{seed}.json")
    if os.path.isfile(stored):
        with open(stored) as f:
            expected = json.load(f)["accuracy"]
        info["reproduced"] = test_accuracy(model, data) == expected
        print(f"pre-training seed {seed} {'reproduced' if info['reproduced'] else 'DIFFERS FROM'}"
              f" the stored run (test accuracy {test_accuracy(model, data)} vs {expected})")  # fmt: skip
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": model.state_dict(), "info": json.dumps(info)}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return model, info


def pretrain_path(args: argparse.Namespace, seed: int) -> str:
    name = f"{args.arch}_e{args.pretrain_epochs}_seed{seed}.pt"
    return os.path.join(args.cache_dir, "pretrain", name)


def arm_steps(args: argparse.Namespace, arm: Arm) -> int:
    """The arm's steps, scaled down in ``--smoke``."""
    return max(1, round(arm.steps * args.step_scale))


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


def test_accuracy(model: nn.Module, data: StudyData) -> float:
    model.eval()
    return float((logits_in_batches(model, data.test[0]).argmax(1) == data.test[1]).float().mean())


def run_one(args: argparse.Namespace, name: str, seed: int, data: StudyData) -> dict[str, Any]:
    arm = ARMS[name]
    checkpoint = os.path.join(args.cache_dir, "checkpoints", name, f"seed{seed}.pt")
    if arm.from_scratch:  # the pre-training's initial weights, batches and schedule
        with open(result_path(args, "pretrained", seed)) as f:  # its control
            pre_info = {"seconds": sum(r["seconds"] for r in json.load(f)["train_log"])}
        torch.manual_seed(seed)
        model = build_model(args.arch, 10)
        steps = args.pretrain_epochs * (len(data.train[0]) // args.batch_size)
        log = train(model, data.train, arm=arm, steps=steps, lr=args.pretrain_lr,
                    schedule="onecycle", seed=seed, batch_size=args.batch_size,
                    desc=f"{name} seed {seed}", show_progress=args.progress,
                    checkpoint=checkpoint)  # fmt: skip
    else:
        base, pre_info = pretrained(args, seed, data)
        model = build_model(args.arch, 10)
        model.load_state_dict(base.state_dict())
        # The fine-tuning images and the batch order depend on the seed and the length only:
        # arms of equal length see the same batches, and a longer arm's images extend a
        # shorter one's.
        steps = arm_steps(args, arm)
        n = min(steps * args.batch_size, len(data.train[0]))
        perm = torch.randperm(len(data.train[0]), generator=torch.Generator().manual_seed(seed))
        subset = perm[:n]
        log = train(model, (data.train[0][subset], data.train[1][subset]), arm=arm, steps=steps,
                    lr=args.ft_lr, schedule="cosine", seed=10_000 + seed,
                    batch_size=args.batch_size, desc=f"{name} seed {seed}",
                    show_progress=args.progress, checkpoint=checkpoint)  # fmt: skip
    seconds = sum(r["seconds"] for r in log)
    extra = {}
    if CONTROLS[name] == "pretrained" and not arm.from_scratch:
        # the weights it started from, evaluated here: its exact control, also where this
        # machine's pre-training differs from the stored one
        extra["start"] = evaluate(base, data, args.id_eval_size)
    return evaluate(model, data, args.id_eval_size) | extra | {
        "arm": name, "seed": seed, **asdict(arm), "steps": steps, "train_log": log,
        "seconds_per_step": seconds / steps, "train_seconds": seconds,
        "settings": settings(args), "pretrain": {"seconds": pre_info["seconds"],
                                                 "reproduced": pre_info.get("reproduced")},
        "resumed_at_epochs": [r["epoch"] for r in log if r.get("resumed")],
    }  # fmt: skip


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("arch", "pretrain_epochs", "pretrain_lr", "ft_lr", "batch_size", "id_eval_size",
            "ood_size", "threads")  # fmt: skip
    return {k: getattr(args, k) for k in keys} | {"torch": torch.__version__}


def grid_jobs(args: argparse.Namespace) -> list[tuple[str, int]]:
    """``(arm, seed)`` in the order they start; ``FEW_SEED_ARMS`` on the first ``--few-seeds``.

    ``--order seed``: seed-major, each seed's pre-training first, so each finished seed is a
    complete paired comparison. ``--order arm``: arm-major in the order of ``--arms``, so the
    first arms reach every seed before the last arms start; a seed's pre-training comes just
    before the first arm that starts from its weights. Arms from scratch need no pre-trained
    weights, only the pre-training's JSON (their control): a seed whose JSON exists is not
    pre-trained for them."""
    seeds = {
        a: args.seeds[: args.few_seeds] if a in FEW_SEED_ARMS else args.seeds for a in args.arms
    }
    if args.order == "arm":
        arms = [(a, s) for a in args.arms for s in seeds[a]]
    else:
        arms = [(a, s) for s in args.seeds for a in args.arms if s in seeds[a]]
    jobs: list[tuple[str, int]] = []
    for name, seed in arms:
        needs = not ARMS[name].from_scratch or not os.path.isfile(
            result_path(args, "pretrained", seed)
        )
        if (needs or args.order == "seed") and ("pretrained", seed) not in jobs:
            jobs.append(("pretrained", seed))
        jobs.append((name, seed))
    jobs += [("pretrained", s) for s in args.seeds if ("pretrained", s) not in jobs]
    return jobs


def result_path(args: argparse.Namespace, name: str, seed: int) -> str:
    return os.path.join(args.results_dir, name, f"seed{seed}.json")


def run_job(args: argparse.Namespace, name: str, seed: int, data: StudyData) -> None:
    torch.set_num_threads(args.threads)
    if name == "pretrained":
        model, info = pretrained(args, seed, data)
        if not os.path.isfile(result_path(args, name, seed)):
            write_json(result_path(args, name, seed), evaluate(model, data, args.id_eval_size)
                       | {"seed": seed, "train_log": info["log"], "settings": settings(args)})  # fmt: skip
    else:
        write_json(result_path(args, name, seed), run_one(args, name, seed, data))


def run_grid(args: argparse.Namespace) -> None:
    """Runs the missing jobs, ``--jobs`` at a time: each in a forked process (one torch thread
    each) that shares the loaded data; an arm waits for its seed's pre-training."""
    data = load_data(args)
    t0 = time.perf_counter()

    def done(job: tuple[str, int]) -> bool:
        name, seed = job
        cached = name != "pretrained" or os.path.isfile(pretrain_path(args, seed))
        return cached and os.path.isfile(result_path(args, name, seed))

    todo = [job for job in grid_jobs(args) if not done(job)]
    # Every optimizer imports torch._dynamo (seconds): once here, not in every forked run.
    import torch._dynamo  # noqa: F401

    running: dict[Any, tuple[str, int]] = {}
    failed: list[tuple[str, int]] = []
    context = multiprocessing.get_context("fork")
    while todo or running:
        for proc in [p for p in running if not p.is_alive()]:
            job = running.pop(proc)
            if proc.exitcode != 0:
                failed.append(job)
            print(f"{'FAILED' if proc.exitcode else 'finished'} {job[0]} seed {job[1]} "
                  f"({time.perf_counter() - t0:.0f} s elapsed)", flush=True)  # fmt: skip
        todo = [j for j in todo if not done(j)]  # another process may have finished it
        busy = {seed for name, seed in running.values() if name == "pretrained"}

        def ready(job: tuple[str, int], busy: set[int] = busy) -> bool:
            name, seed = job
            if name == "pretrained":
                return seed not in busy
            if ARMS[name].from_scratch:  # needs the pre-training's JSON only
                return os.path.isfile(result_path(args, "pretrained", seed))
            return seed not in busy and done(("pretrained", seed))

        startable = [j for j in todo if ready(j)]
        if startable and len(running) < args.jobs:
            job = startable[0]
            todo.remove(job)
            print(f"start {job[0]} seed {job[1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if args.jobs == 1:  # in this process; the next round looks again at what is ready
                try:
                    run_job(args, *job, data)
                except Exception as error:  # reported with the failed jobs
                    print(f"FAILED {job[0]} seed {job[1]}: {error!r}", flush=True)
                    failed.append(job)
                continue
            proc = context.Process(target=run_job, args=(args, *job, data))
            proc.start()
            running[proc] = job
            continue
        if running:
            time.sleep(1)
        elif todo:  # nothing runs and nothing can start: a seed whose pre-training failed
            failed += todo
            break
    print(f"grid done in {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"failed jobs: {failed}")
    if not os.path.isfile(os.path.join(args.results_dir, "step_costs.json")) and "ce" in args.arms:
        measure_step_costs(args)


def measure_step_costs(args: argparse.Namespace, rounds: int = 3, steps: int = 3) -> dict:
    """Seconds per training step of every loss among ``--arms``, same model and batches, losses
    interleaved over ``rounds`` (the first is warm-up) so that a busy machine slows them alike;
    and their ratio to the CE step. Arms of one loss (``Arm.loss``) share its measurement.
    Written to ``step_costs.json``; the report's cost column comes from it."""
    side = 16 if args.smoke else 32
    if args.smoke:
        rounds, steps = 2, 1
    data = synthetic_dataset(steps * args.batch_size, 10, image_size=side, seed=5).tensors
    names = ["ce", *args.arms]
    losses = {ARMS[name].loss: name for name in reversed(names)}  # first name of each loss
    times: dict[str, list[float]] = {name: [] for name in losses.values()}
    for r in range(rounds):
        for loss, name in losses.items():
            torch.manual_seed(0)
            log = train(build_model(args.arch, 10), data, arm=loss, steps=steps, lr=args.ft_lr,
                        schedule="cosine", seed=0, batch_size=args.batch_size, desc=name,
                        show_progress=False)  # fmt: skip
            if r:
                times[name].append(log[0]["seconds"] / steps)
    sec = {name: float(np.median(times[losses[ARMS[name].loss]])) for name in dict.fromkeys(names)}
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
    if math.isnan(mean):  # no seed to compare
        return "-"
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
                    if "epoch_seconds" in run:  # written before arms had a length: 20 steps
                        run["steps"] = 20
                        run["seconds_per_step"] = run.pop("epoch_seconds") / 20
                    runs.setdefault(name, {})[int(f[4:-5])] = run
    return runs


def odin_auroc(run: dict, real: list[str]) -> float:
    return metric(run, "ODIN", "auroc", real)


def compare(
    runs: dict[str, dict[int, dict]], name: str, control: str, fn: Any
) -> tuple[list[int], tuple[float, float]]:
    """Seeds both arms finished, and the paired difference ``fn(name) - fn(control)``."""
    seeds = sorted(set(runs.get(name, {})) & set(runs.get(control, {})))
    return seeds, paired([fn(runs[name][s]) - fn(runs[control][s]) for s in seeds])


def report(
    runs: dict[str, dict[int, dict]], costs: dict | None = None
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Markdown tables of the paired differences arm - control (CE of the same length); also
    returns the headline numbers per arm.

    ``costs``: what :func:`measure_step_costs` wrote; without it an arm's step cost is the median
    over seeds of its seconds per step / the 20-step CE arm's, measured inside the grid."""
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
        f"fine-tunes for its number of steps (20 unless the name says `_s<steps>`), batch "
        f"{st['batch_size']}, cosine from lr {st['ft_lr']}, on the first steps × batch images of "
        "a seed-fixed permutation of the training split (cycled when 1600 steps need more than "
        "the 50k); arms of the same length see the same batches. "
        f"ODIN T = {T_ODIN:g}, eps = {EPS_ODIN:g}. Accuracy on the 10,000 test images; detection: "
        f"the first {st['id_eval_size']} test images against "
        f"{st['ood_size']} images per set. Headline mean over the real-image sets "
        f"({', '.join(real)}); noise sets only in their own columns. Differences are arm − "
        "control per seed, in points: mean ± half-width of the 95 % t interval over seeds. "
        "The control is CE of the same length; for a longer CE arm, the 20-step CE.",
        "",
    ]
    ce_step = {s: r["seconds_per_step"] for s, r in ce.items()}
    head: dict[str, dict[str, Any]] = {}
    lines += ["## Which should I use?", "",
              "| arm | steps | control | seeds | Δ ODIN AUROC | Δ ODIN FPR95 | Δ ID accuracy "
              "| × cost of a CE step | compute (CE steps) |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, arm in ARMS.items():
        arm_runs = runs.get(name, {})
        seeds = sorted(set(arm_runs) & set(ce))
        if not seeds:
            continue
        in_grid = float(np.median([arm_runs[s]["seconds_per_step"] / ce_step[s] for s in seeds]))
        cost = costs["cost"].get(name, in_grid) if costs else in_grid
        control = CONTROLS[name]
        cells = {}
        for key, f in (("auroc", lambda r: odin_auroc(r, real)),
                       ("fpr95", lambda r: metric(r, "ODIN", "fpr95", real)),
                       ("accuracy", lambda r: r["accuracy"])):  # fmt: skip
            paired_seeds, cells[key] = compare(runs, name, control, f)
        head[name] = {"seeds": paired_seeds, "cost": cost, "in_grid_cost": in_grid,
                      "steps": arm.steps, "control": control, **cells}  # fmt: skip
        if name == "ce" or not paired_seeds:
            continue
        lines.append(f"| {name} | {arm.steps} | {control} | {len(paired_seeds)} | "
                     f"{fmt_ci(*cells['auroc'])} | {fmt_ci(*cells['fpr95'])} | "
                     f"{fmt_ci(*cells['accuracy'])} | {cost:.1f} | {arm.steps * cost:,.0f} |")  # fmt: skip

    lines += dose_response(runs, real, head) + equal_compute(runs, real, head)
    lines += cheap_estimator(runs, real, head)

    lines += ["", "## Paired differences from the control (real-image mean), points", "",
              "| arm | control | seeds | Δ ID acc. | Δ ODIN AUROC | Δ ODIN FPR95 | Δ MSP AUROC | "
              "Δ MSP FPR95 | Δ energy AUROC | Δ energy FPR95 |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    fns = [lambda r: r["accuracy"]] + [
        (lambda r, m=m, k=k: metric(r, m, k, real))
        for m in DETECTION_METHODS
        for k in ("auroc", "fpr95")
    ]
    for name in list(ARMS)[1:]:
        seeds, _ = compare(runs, name, CONTROLS[name], fns[0])
        if seeds:
            cells = [fmt_ci(*compare(runs, name, CONTROLS[name], f)[1]) for f in fns]
            lines.append(
                f"| {name} | {CONTROLS[name]} | {len(seeds)} | " + " | ".join(cells) + " |"
            )
    for key, label in (("auroc", "AUROC"), ("fpr95", "FPR95")):
        lines += ["", f"## ODIN {label} per OOD set: difference from the control, points", "",
                  "| arm | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]  # fmt: skip
        for name in list(ARMS)[1:]:
            if compare(runs, name, CONTROLS[name], fns[0])[0]:
                cells = [fmt_ci(*compare(runs, name, CONTROLS[name],
                                         lambda r, o=o, k=key: r["ood"][o]["ODIN"][k])[1])
                         for o in sets]  # fmt: skip
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
    pre = [r["pretrain"]["seconds"] for r in ce.values()]
    lines += ["", f"Measured: CE pre-training {np.mean(pre) / 60:.1f} min per seed. Machine: "
              f"{platform.machine()}, {os.cpu_count()} cores, {st['threads']} torch thread(s) "
              f"per run, torch {st['torch']}."]  # fmt: skip
    lines += ["", "Cost of one training step, per arm: in-grid seconds per step / the 20-step CE "
              "arm's (median over seeds; the machine was shared, so these move with its load)"
              + (f", and a controlled measurement (`--measure-cost`: batch {costs['batch_size']}, "
                 "losses interleaved, median of rounds)" if costs else "") + ":", "",
              "| arm | in-grid × CE | s per step (controlled) | × CE (controlled) |", "|---|---|---|---|"]  # fmt: skip
    for name, h in head.items():
        sec = costs["seconds_per_step"].get(name) if costs else None
        cells = [f"{h['in_grid_cost']:.1f}", "-" if sec is None else f"{sec:.3f}",
                 "-" if sec is None else f"{costs['cost'][name]:.1f}"]  # type: ignore[index]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", head


def ms(values: list[float]) -> str:
    """``mean ± std`` in percent."""
    sd = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{100 * np.mean(values):.1f} ± {100 * sd:.1f}"


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
    """``gq_1_s80`` against CE trained for the same measured compute (``ce_s1600``)."""
    gq, ce_long = EQUAL_COMPUTE
    if not (head.get(gq) and head.get(ce_long)):
        return []
    lines = ["", "## The same compute: GQ, or CE for longer?", "",
             f"`{gq}` and `{ce_long}`, paired over seeds; compute in CE steps "
             "(steps × measured cost of a step).", "",
             "| arm | steps | compute (CE steps) | ODIN AUROC | ODIN FPR95 | ID accuracy |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    seeds = sorted(set(runs[gq]) & set(runs[ce_long]))
    fns = (lambda r: odin_auroc(r, real), lambda r: metric(r, "ODIN", "fpr95", real),
           lambda r: r["accuracy"])  # fmt: skip
    for name in ("ce_s80", gq, ce_long):
        if set(seeds) <= set(runs.get(name, {})):
            cells = [ms([f(runs[name][s]) for s in seeds]) for f in fns]
            h = head[name]
            lines.append(f"| {name} | {h['steps']} | {h['steps'] * h['cost']:,.0f} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    diffs = [fmt_ci(*compare(runs, gq, ce_long, f)[1]) for f in fns]
    lines.append(
        f"| {gq} − {ce_long} ({len(seeds)} seeds, paired) | | | " + " | ".join(diffs) + " |"
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


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--data-dir", default="../shared/data", help="folder of the CIFAR-10/OOD .npz files"
    )
    p.add_argument("--results-dir", default="docs/reproduction/study_long",
                   help="per-run JSON, report.md and the figure (small files, committed); the "
                        "20-step study of every loss is in docs/reproduction/study")  # fmt: skip
    p.add_argument(
        "--cache-dir", default="runs/study", help="cached pre-trained weights (not committed)"
    )
    p.add_argument("--arch", default="small_cnn", choices=MODEL_NAMES)
    p.add_argument("--pretrain-epochs", type=int, default=5, help="CE epochs on the 50k split")
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
    if args.smoke:
        tmp = tempfile.mkdtemp(prefix="gq_study_smoke_")
        if args.results_dir == p.get_default("results_dir"):
            args.results_dir = os.path.join(tmp, "results")
        if args.cache_dir == p.get_default("cache_dir"):
            args.cache_dir = os.path.join(tmp, "cache")
        args.arch, args.pretrain_epochs, args.step_scale = "tiny_cnn", 1, 0.025
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
    fig = figure(head, os.path.join(args.results_dir, "study.png"))
    print(text)
    print("report:", os.path.join(args.results_dir, "report.md"), "figure:", fig)
    return head


if __name__ == "__main__":
    main()
