"""One run: the SGD loop with per-epoch checkpoints, the cached CE pre-training, and an arm
fine-tuned (or trained from scratch) and evaluated."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from typing import Any

import fast_cifar
import torch
import torch.nn.functional as F
from data import augmentation_params, crop_flip
from models import build_model
from torch import Tensor, nn
from train_utils import progress

from gq_loss import GQLoss

from .arms import ARMS, CONTROLS, Arm
from .datasets import StudyData
from .evaluate import evaluate, quick_probe, test_accuracy
from .results import pretrain_path, result_path

LOGITNORM_TAU = 0.04


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
    precision: str = "float32",
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

    ``precision``: ``"float32"``, or ``"bf16"`` for the forward passes and GQ's under CPU bf16
    autocast (the losses are taken in float32).
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
    criterion = make_criterion(arm)
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
            with autocast(precision):
                if criterion is None:
                    logits, gq = model(x), None
                else:  # one forward: the loss hands back the logits it computed
                    gq, logits = criterion(model, x, y, generator=draws, return_logits=True)
            loss = base_loss(arm.base, logits.float(), y)
            if gq is not None:
                loss = loss + arm.lam * gq.float()
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
        if epochs > 1:  # a line per epoch of a long run, for logs without a progress bar
            print(f"  {desc} epoch {epoch + 1}/{epochs}: {log[-1]}", flush=True)
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


def autocast(precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_criterion(arm: Arm) -> GQLoss | None:
    # A fixed method, not "auto" (which times the methods): a resumed run must repeat the same
    # arithmetic. The reference formulation has no method to choose.
    if not arm.lam:
        return None
    method = "loop" if arm.formulation == "paper" else "auto"
    return GQLoss(formulation=arm.formulation, estimator=arm.estimator,
                  num_sampled=arm.num_sampled, method=method)  # fmt: skip


def train_fast(args: argparse.Namespace, arm: Arm, seed: int, data: StudyData, desc: str,
               checkpoint: str, probe: Any = None) -> tuple[nn.Module, list[dict[str, float]]]:  # fmt: skip
    """``fast_cnn``: the recipe of ``examples/fast_cifar.py`` for ``--pretrain-epochs`` on the
    whole training split, with the arm's loss (CE for the pre-training; the sampled
    estimator's draws come from torch's global generator, which the checkpoint saves)."""
    criterion = make_criterion(arm)

    def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:  # summed over the batch
        if criterion is None:
            logits, gq = model(x), None
        else:
            gq, logits = criterion(model, x, y, return_logits=True)
        loss = base_loss(arm.base, logits.float(), y) * len(y)
        return loss if gq is None else loss + arm.lam * len(y) * gq.float()

    recipe = fast_cifar.FastRecipe(epochs=args.pretrain_epochs)
    model, record = fast_cifar.train(
        *data.train, recipe, seed=seed, bf16=args.precision == "bf16", loss_fn=loss_fn,
        log=lambda line: print(f"  {desc}: {line}", flush=True), checkpoint=checkpoint,
        eval_fn=None if probe is None else lambda m, epoch: probe(m),
    )  # fmt: skip
    log = record["epochs"]
    for epoch in record.get("resumed_at_epochs", []):
        log[epoch]["resumed"] = True
    return model, log


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
    if args.arch == "fast_cnn":
        model, log = train_fast(args, ARMS["ce"], seed, data, f"pre-train seed {seed}",
                                path + ".epoch", probe=lambda m: quick_probe(m, data))  # fmt: skip
    else:
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


def arm_steps(args: argparse.Namespace, arm: Arm) -> int:
    """The arm's steps, scaled down in ``--smoke``."""
    return max(1, round(arm.steps * args.step_scale))


def run_one(args: argparse.Namespace, name: str, seed: int, data: StudyData) -> dict[str, Any]:
    arm = ARMS[name]
    checkpoint = os.path.join(args.cache_dir, "checkpoints", name, f"seed{seed}.pt")
    if arm.from_scratch:  # the pre-training's initial weights, batches and schedule
        with open(result_path(args, "pretrained", seed)) as f:  # its control
            pre_info = {"seconds": sum(r["seconds"] for r in json.load(f)["train_log"])}
        torch.manual_seed(seed)
        model = build_model(args.arch, 10)
        steps = args.pretrain_epochs * (len(data.train[0]) // args.batch_size)
        if args.arch == "fast_cnn":
            model, log = train_fast(args, arm, seed, data, f"{name} seed {seed}", checkpoint)
            steps = log[-1]["step"]
        else:
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
                    show_progress=args.progress, checkpoint=checkpoint,
                    precision=arm.precision or args.precision)  # fmt: skip
    seconds = sum(r["seconds"] for r in log)
    extra = {}
    if CONTROLS[name] == "pretrained" and not arm.from_scratch:
        # the weights it started from, evaluated here: its exact control, also where this
        # machine's pre-training differs from the stored one
        extra["start"] = evaluate(base, data, args.id_eval_size)
    return evaluate(model, data, args.id_eval_size) | extra | {
        "arm": name, "seed": seed, "model": args.arch, **asdict(arm),
        "precision": arm.precision or args.precision, "steps": steps, "train_log": log,
        "seconds_per_step": seconds / steps, "train_seconds": seconds,
        "settings": settings(args), "pretrain": {"seconds": pre_info["seconds"],
                                                 "reproduced": pre_info.get("reproduced")},
        "resumed_at_epochs": [r["epoch"] for r in log if r.get("resumed")],
    }  # fmt: skip


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("arch", "pretrain_epochs", "pretrain_lr", "ft_lr", "batch_size", "id_eval_size",
            "ood_size", "threads", "precision")  # fmt: skip
    return {k: getattr(args, k) for k in keys} | {"torch": torch.__version__}
