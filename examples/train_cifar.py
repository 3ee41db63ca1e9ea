"""Train a CIFAR classifier from scratch with cross-entropy + lambda * GQ (Learning ODIN, Sec. 4).

Defaults are the paper's: SGD (lr 0.1, momentum 0.9, weight decay 5e-4), cosine schedule with
T_max = epochs, 200 epochs, batch 64, random crop (pad 4) + horizontal flip, no input
normalisation. ``--lam`` has no default: the paper's 1e-6 was measured as a no-op that costs
9-25x a CE step (docs/benchmarks.md, "Cost in CE steps"; README, "Choosing lambda"); ``--lam 0``
trains with plain cross-entropy (the paper's baseline).

Data (never downloaded): ``<data-dir>/<dataset>_{train,test}.npz`` with ``x`` uint8 (N, 32, 32, 3)
and ``y`` int64 (N,), or torchvision's extracted CIFAR files in ``--data-dir``.

``--recipe fast`` trains the study's strong network instead (``examples/fast_cifar.py``: an
airbench-style net and schedule, 89.6 % test accuracy in 10 epochs of the data pack's whole JPEG
training split, bf16 autocast on CPU and CUDA): batch 1024, 10 epochs, the whole 50k/10k splits.

Examples::

    python examples/train_cifar.py --smoke     # a few seconds of compute, synthetic data
    python examples/train_cifar.py --recipe fast --lam 0 --data-dir ../shared/data \
        --out-dir runs/fast                    # 89.6 %: 10 epochs, ~15 min of one CPU core
    python examples/train_cifar.py --lam 1 --dataset cifar10 --arch resnet18 --data-dir data \
        --out-dir runs/r18
    python examples/train_cifar.py --lam 1 --out-dir runs/r18 --resume   # continue after a crash
    torchrun --nproc_per_node 4 examples/train_cifar.py --lam 1 --out-dir runs/r18_ddp  # 4 GPUs

Multi-GPU: ``--batch-size`` is the global batch, split evenly over processes. Each process
passes the DDP-wrapped model to ``GQLoss`` and calls ``backward()`` once per step, so gradients
(including the double-backward part of GQ) are all-reduced by DDP. With the per-sample paper
formulation the result equals single-process training on the same global batch; the authors'
``reference`` formulation (one ratio per batch) becomes one ratio per process. BatchNorm keeps
per-process batch statistics (SyncBatchNorm has no double backward).

Outputs in ``--out-dir``: ``checkpoint.pt`` (every epoch, written atomically; ``--resume``
continues bit-exactly, and refuses an ``--epochs``, ``--lr``, ``--lam`` or other setting that
differs from the checkpoint's), ``model_best_train.pt`` (best train accuracy, the authors' choice),
``model_final.pt``, ``log.csv``, ``summary.json``, TensorBoard events if installed. Checkpoints
hold ``model`` (state dict), ``arch``, ``num_classes``, ``dataset``, ``optimizer``,
``scheduler``, ``epoch`` (completed), ``rng`` and ``args``; they load with
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import time
from typing import Any

import torch
import torch.nn.functional as F
from data import (
    CIFAR_NUM_CLASSES,
    WithIndex,
    augmentation_params,
    crop_flip,
    load_cifar,
    synthetic_dataset,
)
from models import MODEL_NAMES, build_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from train_utils import (
    CSVLog,
    DistInfo,
    HelpFormatter,
    all_reduce_sum,
    atomic_save,
    cleanup_distributed,
    gather_objects,
    progress,
    rng_state,
    set_rng_state,
    setup_distributed,
    summary_writer,
)

from gq_loss import GQLoss
from gq_loss.kernels import GRADIENT_METHODS
from gq_loss.loss import ESTIMATORS, FORMULATIONS

CSV_FIELDS = [
    "epoch",
    "lr",
    "train_loss",
    "train_ce",
    "train_gq",
    "train_acc",
    "test_acc",
    "seconds",
]
SMOKE_DEFAULTS = {"arch": "tiny_cnn", "epochs": 2, "batch_size": 16, "lam": 1.0, "num_workers": 0,
                  "threads": 1}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--recipe", choices=("paper", "fast"), default="paper", help=(
        "'paper': the paper's schedule on --arch; 'fast': the strong airbench-style network and "
        "schedule of examples/fast_cifar.py (defaults: 10 epochs, batch 1024, the whole splits, "
        "bf16 autocast)"
    ))  # fmt: skip
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="CE label smoothing (--recipe fast only; changes what ODIN reads)")  # fmt: skip
    p.add_argument("--dataset", choices=tuple(CIFAR_NUM_CLASSES), default="cifar10")
    p.add_argument("--arch", choices=MODEL_NAMES, default="resnet18")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (all processes)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lam", type=float, default=None, help=(
        "weight of GQ in CE + lam * GQ; 0 trains plain CE. Required (no default): the paper's "
        "1e-6 was measured as a no-op (GQ's parameter gradient ~2e-7 of CE's; an earlier study "
        "whose JSON is not committed) at 9-25x the cost of a CE step (docs/benchmarks.md); see "
        "'Choosing lambda' in the README"
    ))  # fmt: skip
    p.add_argument("--formulation", choices=FORMULATIONS, default="paper")
    p.add_argument("--gq-method", choices=GRADIENT_METHODS, default="auto", help="GQLoss `method`")
    p.add_argument("--chunk-size", type=int, default=None, help="GQLoss `chunk_size`")
    p.add_argument("--estimator", choices=ESTIMATORS, default="exact")
    p.add_argument("--num-sampled", type=int, default=None, help="classes K for 'sampled'")
    p.add_argument("--temperature", type=float, default=1.0, help="GQ's softmax temperature T")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="data")
    p.add_argument(
        "--full-split",
        action="store_true",
        help="read <dataset>_{train,test}_full.npz (the whole splits, stored as JPEG bytes) "
        "instead of <dataset>_{train,test}.npz",
    )
    p.add_argument("--out-dir", default="runs/train_cifar")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="checkpoint to resume (default: <out-dir>/checkpoint.pt)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--limit-train", type=int, default=None, help="use the first N train images")
    p.add_argument("--limit-test", type=int, default=None, help="use the first N test images")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for --recipe fast, on CPU and CUDA; the "
                        "paper recipe uses it on CUDA only)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="in-memory synthetic 32x32 data (64 train, 64 test images), tiny_cnn, lam 1, no loader "
        "workers, one thread, 2 epochs of 4 steps of 16 images (a few seconds on an idle core)",
    )
    p.add_argument("--kill-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.recipe == "fast":  # its own defaults, where the user left the paper's
        fast = {"epochs": 10, "batch_size": 1024, "full_split": True, "amp": True}
        if args.smoke:
            fast |= {"epochs": 2, "batch_size": 64, "threads": 1}
        for key, value in fast.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    elif args.label_smoothing:
        p.error("--label-smoothing is for --recipe fast only")
    if args.smoke:  # smoke defaults only replace values the user left at their defaults
        for key, value in SMOKE_DEFAULTS.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    for key in ("epochs", "batch_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.lam is None:
        p.error(
            "--lam is required (0 = plain CE); see its help and 'Choosing lambda' in the README"
        )
    if args.lam < 0:
        p.error(f"--lam must be >= 0, got {args.lam}")
    return args


def make_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    if args.smoke:
        n_train = args.limit_train or (256 if args.recipe == "fast" else 64)
        n_test = args.limit_test or 64
        return (
            synthetic_dataset(n_train, 10, seed=args.seed),
            synthetic_dataset(n_test, 10, seed=args.seed + 1),
            10,
        )
    suffix = "_full" if args.full_split else ""
    train: Dataset = load_cifar(args.dataset, args.data_dir, "train" + suffix)
    test: Dataset = load_cifar(args.dataset, args.data_dir, "test" + suffix)
    if args.limit_train:
        train = Subset(train, range(min(args.limit_train, len(train))))  # type: ignore[arg-type]
    if args.limit_test:
        test = Subset(test, range(min(args.limit_test, len(test))))  # type: ignore[arg-type]
    return train, test, CIFAR_NUM_CLASSES[args.dataset]


def make_criterion(args: argparse.Namespace) -> GQLoss | None:
    if args.lam == 0:
        return None
    # Built before training so that a bad option fails at once, with the library's message.
    return GQLoss(
        temperature=args.temperature,
        formulation=args.formulation,
        estimator=args.estimator,
        num_sampled=args.num_sampled,
        method=args.gq_method,
        chunk_size=args.chunk_size,
    )


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, info: DistInfo, batch_size: int) -> float:
    """Accuracy on ``dataset``; each process scores an interleaved shard, counts are summed."""
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))  # type: ignore[arg-type]
    loader = DataLoader(shard, batch_size=batch_size, generator=torch.Generator())
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    try:
        for x, y in loader:
            x, y = x.to(info.device), y.to(info.device)
            counts[0] += (model(x).argmax(1) == y).sum().item()
            counts[1] += len(y)
    finally:
        model.train(was_training)
    counts = all_reduce_sum(counts, info)
    return float(counts[0] / counts[1].clamp(min=1))


def checkpoint(
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    args: argparse.Namespace,
    num_classes: int,
    state: dict[str, Any],
    rng: list[Any],
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "arch": args.arch,
        "num_classes": num_classes,
        "dataset": "synthetic" if args.smoke else args.dataset,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": state["epoch"],
        "global_step": state["global_step"],
        "rng": {"world_size": len(rng), "per_rank": rng},
        "args": vars(args),
        "metrics": dict(state["metrics"]),
        "best_train_acc": state["best_train_acc"],
        "wall_time_s": state["wall_time_s"],
    }


# What a checkpoint's schedule, loss and batches were built from. Resuming with other values
# would mix two runs silently: the restored cosine schedule keeps its T_max, so a larger
# --epochs trains on at lr = 0, and the restored optimiser ignores a new --lr.
RESUME_MUST_MATCH = ("epochs", "lr", "lam", "batch_size", "momentum", "weight_decay",
                     "formulation", "estimator", "num_sampled", "temperature")  # fmt: skip


def check_resume_args(path: str, saved: dict[str, Any], args: argparse.Namespace) -> None:
    """Refuse to resume ``path`` with settings other than those it was trained with."""
    changed = [
        f"--{k.replace('_', '-')} {getattr(args, k)!r} (checkpoint: {saved[k]!r})"
        for k in RESUME_MUST_MATCH
        if k in saved and saved[k] != getattr(args, k)
    ]
    if changed:
        raise ValueError(
            f"--resume {path!r} was trained with other settings: {', '.join(changed)}. A resumed "
            "run continues the checkpoint's schedule and loss, which these would silently "
            "contradict (a larger --epochs would train on at the finished schedule's lr = 0). "
            "Pass the checkpoint's values to finish that run, or start a new run in another "
            "--out-dir to train with these."
        )


def train(args: argparse.Namespace, info: DistInfo) -> dict[str, Any]:
    main = info.is_main
    if args.batch_size % info.world_size:
        raise ValueError(
            f"--batch-size {args.batch_size} must be divisible by the {info.world_size} processes"
        )
    local_batch = args.batch_size // info.world_size
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    use_amp = bool(args.amp) and info.device.type == "cuda"
    if args.amp and not use_amp and main:
        print("--amp ignored: bf16 autocast is used on CUDA only")

    train_set, test_set, num_classes = make_datasets(args)
    torch.manual_seed(args.seed)  # same initial weights on every process
    model = build_model(args.arch, num_classes).to(info.device)
    criterion = make_criterion(args)
    torch.manual_seed(args.seed + info.rank)  # per-process stream (e.g. the sampled estimator)
    net: nn.Module = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
        if main and criterion is not None and args.formulation == "reference":
            print(
                "note: under DDP the reference formulation is one GQ ratio per process "
                "(not one over the global batch); the paper formulation is unaffected"
            )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)

    sampler: DistributedSampler = DistributedSampler(
        WithIndex(train_set),
        num_replicas=info.world_size,
        rank=info.rank,
        shuffle=True,
        seed=args.seed,
    )
    loader_gen = torch.Generator().manual_seed(args.seed + info.rank)
    loader = DataLoader(
        WithIndex(train_set),
        batch_size=local_batch,
        sampler=sampler,
        num_workers=args.num_workers,
        generator=loader_gen,
        pin_memory=info.device.type == "cuda",
    )
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    log = CSVLog(os.path.join(args.out_dir, "log.csv"), CSV_FIELDS)
    state: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "best_train_acc": -1.0,
        "wall_time_s": 0.0,
        "metrics": {},
    }

    resume = ckpt_path if args.resume == "auto" else args.resume
    if resume is not None and os.path.exists(resume):
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        if (ckpt["arch"], ckpt["num_classes"]) != (args.arch, num_classes):
            raise ValueError(
                f"checkpoint {resume!r} holds {ckpt['arch']} with "
                f"{ckpt['num_classes']} classes, not {args.arch} with {num_classes}"
            )
        check_resume_args(resume, ckpt["args"], args)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        for key in ("epoch", "global_step", "best_train_acc", "wall_time_s", "metrics"):
            state[key] = ckpt[key]
        per_rank = ckpt["rng"]["per_rank"]
        if len(per_rank) == info.world_size:
            set_rng_state(per_rank[info.rank]["global"])
            loader_gen.set_state(per_rank[info.rank]["loader"])
        elif main:
            print(
                f"warning: checkpoint saved by {len(per_rank)} processes, running "
                f"{info.world_size}: RNG streams restart (resume is not bit-exact)"
            )
        if main:
            log.truncate_after(state["epoch"])
            print(f"resumed from {resume} after epoch {state['epoch']}")
    elif resume is not None and args.resume != "auto":
        raise FileNotFoundError(f"--resume checkpoint {resume!r} does not exist")
    elif resume is not None and main:
        print(f"no checkpoint at {resume}: starting from scratch")

    writer = summary_writer(os.path.join(args.out_dir, "tb")) if main else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    started = time.perf_counter() - state["wall_time_s"]
    n_train = len(train_set)  # type: ignore[arg-type]
    finished = state["epoch"] >= args.epochs
    for epoch in range(state["epoch"], args.epochs):
        if args.max_steps is not None and state["global_step"] >= args.max_steps:
            break
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        offsets, flips = augmentation_params(n_train, args.seed, epoch)
        lr = optimizer.param_groups[0]["lr"]
        net.train()
        # loss*b, ce*b, gq*b, correct, count: summed on the device, synchronised once per epoch
        sums = torch.zeros(5, dtype=torch.float64, device=info.device)
        bar = progress(
            loader, enabled=args.progress and main, desc=f"epoch {epoch + 1}", leave=False
        )
        complete, shown_loss = True, None
        for x, y, idx in bar:
            if args.max_steps is not None and state["global_step"] >= args.max_steps:
                complete = False
                break
            x = x.to(info.device, non_blocking=True)
            y = y.to(info.device, non_blocking=True)
            if args.augment:
                x = crop_flip(x, offsets[idx], flips[idx])
            with autocast:
                if criterion is not None:
                    gq, logits = criterion(net, x, y, return_logits=True)
                else:
                    gq, logits = None, net(x)
            ce = F.cross_entropy(logits.float(), y)
            loss = ce if gq is None else ce + args.lam * gq.float()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["global_step"] += 1
            with torch.no_grad():
                b = len(y)
                gq_b = (
                    gq.detach().float() * b if gq is not None else torch.zeros((), device=x.device)
                )
                correct = (logits.argmax(1) == y).sum()
                parts = (loss.detach() * b, ce.detach() * b, gq_b, correct, torch.tensor(b))
                sums += torch.stack([t.to(sums) for t in parts])
            if shown_loss is None or state["global_step"] % 20 == 0:  # step 1 too: short runs
                shown_loss = loss.item()
                bar.set_postfix(loss=f"{shown_loss:.4f}")
            if args.kill_after_steps is not None and state["global_step"] == args.kill_after_steps:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: die without any cleanup
        bar.close()
        totals = all_reduce_sum(sums.cpu(), info)
        count = max(float(totals[4]), 1.0)
        metrics = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": float(totals[0]) / count,
            "train_ce": float(totals[1]) / count,
            "train_gq": float(totals[2]) / count if criterion is not None else "",
            "train_acc": float(totals[3]) / count,
            "test_acc": evaluate(model, test_set, info, max(256, local_batch)),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        state["metrics"] = metrics
        state["wall_time_s"] = time.perf_counter() - started
        if main:
            log.append(metrics)
            if writer is not None:
                for key in CSV_FIELDS[1:]:
                    if metrics[key] != "":
                        writer.add_scalar(key, metrics[key], epoch + 1)
            print(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in metrics.items()
                ),
                flush=True,
            )
        if not complete:
            break
        scheduler.step()
        state["epoch"] = epoch + 1
        rng = gather_objects({"global": rng_state(), "loader": loader_gen.get_state()}, info)
        is_best = metrics["train_acc"] > state["best_train_acc"]
        if is_best:
            state["best_train_acc"] = metrics["train_acc"]
        if main:
            ckpt = checkpoint(model, optimizer, scheduler, args, num_classes, state, rng)
            atomic_save(ckpt, ckpt_path)  # the resumable state first, then the extra copy
            if is_best:
                atomic_save(ckpt, os.path.join(args.out_dir, "model_best_train.pt"))
        finished = state["epoch"] >= args.epochs

    state["wall_time_s"] = time.perf_counter() - started
    rng = gather_objects({"global": rng_state(), "loader": loader_gen.get_state()}, info)
    summary: dict[str, Any] = {}
    if main:
        atomic_save(
            checkpoint(model, optimizer, scheduler, args, num_classes, state, rng),
            os.path.join(args.out_dir, "model_final.pt"),
        )
        m = state["metrics"]
        summary = {
            "final_train_acc": m.get("train_acc"),
            "final_test_acc": m.get("test_acc"),
            "final_train_loss": m.get("train_loss"),
            "final_train_ce": m.get("train_ce"),
            "mean_gq": m.get("train_gq") if criterion is not None else None,
            "best_train_acc": state["best_train_acc"],
            "epochs_completed": state["epoch"],
            "finished": finished,
            "global_steps": state["global_step"],
            "wall_time_s": round(state["wall_time_s"], 3),
            "world_size": info.world_size,
            "device": str(info.device),
            "torch": torch.__version__,
            "args": vars(args),
        }
        with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if writer is not None:
            writer.close()
    return summary


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """A (possibly subset) TensorDataset's images and labels as two tensors."""
    indices = None
    while isinstance(dataset, Subset):
        indices = torch.as_tensor(dataset.indices) if indices is None else torch.as_tensor(
            dataset.indices)[indices]  # fmt: skip
        dataset = dataset.dataset
    assert isinstance(dataset, TensorDataset), type(dataset)
    x, y = dataset.tensors
    return (x, y) if indices is None else (x[indices], y[indices])


def train_fast(args: argparse.Namespace, info: DistInfo) -> dict[str, Any]:
    """``--recipe fast``: :func:`fast_cifar.train` on the whole split, one process."""
    import fast_cifar

    if info.distributed:
        raise ValueError("--recipe fast runs in one process (it is fast enough): no torchrun")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train_set, test_set, num_classes = make_datasets(args)
    x_train, y_train = _tensors(train_set)
    x_test, y_test = _tensors(test_set)
    criterion = make_criterion(args)
    recipe = fast_cifar.FastRecipe(epochs=args.epochs, batch_size=args.batch_size,
                                   label_smoothing=args.label_smoothing)  # fmt: skip

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # the recipe's loss is summed over the batch; GQ's draws use torch's global generator,
        # which the checkpoint saves
        if criterion is None:
            logits, gq = model(x), None
        else:
            gq, logits = criterion(model, x, y, return_logits=True)
        ce = F.cross_entropy(logits.float(), y, reduction="sum",
                             label_smoothing=args.label_smoothing)  # fmt: skip
        return ce if gq is None else ce + args.lam * len(y) * gq.float()

    os.makedirs(args.out_dir, exist_ok=True)
    ckpt = os.path.join(args.out_dir, "checkpoint.pt")
    if args.resume is None and os.path.isfile(ckpt):
        os.remove(ckpt)  # a new run: no stale state

    def eval_fn(model: nn.Module, epoch: int) -> dict[str, float]:
        return {"test_acc": fast_cifar.accuracy(model, x_test, y_test, bf16=bool(args.amp))}

    model, record = fast_cifar.train(
        x_train, y_train, recipe, seed=args.seed, device=info.device, bf16=bool(args.amp),
        loss_fn=loss_fn, eval_fn=eval_fn, checkpoint=ckpt,
    )  # fmt: skip
    summary = {
        "recipe": "fast",
        "final_test_acc": record["epochs"][-1]["test_acc"],
        "test_images": len(x_test),
        "train_images": len(x_train),
        "epochs": record["epochs"],
        "wall_time_s": record["train_seconds"],
        "threads": torch.get_num_threads(),
        "device": str(info.device),
        "torch": torch.__version__,
        "args": vars(args),
    }
    atomic_save({"model": model.state_dict(), "arch": "fast_cnn", "num_classes": num_classes,
                 "args": vars(args)}, os.path.join(args.out_dir, "model_final.pt"))  # fmt: skip
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.deterministic:  # cuBLAS needs this before CUDA starts to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    info = setup_distributed(args.device)
    try:
        summary = (train_fast if args.recipe == "fast" else train)(args, info)
    except BaseException:
        cleanup_distributed(wait=False)
        raise
    cleanup_distributed()
    return summary


if __name__ == "__main__":
    main()
