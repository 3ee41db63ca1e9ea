"""Which runs, in which order, and how many at once: the resumable grid and the step costs."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from typing import Any

import numpy as np
import torch
from data import synthetic_dataset
from models import build_model

from .arms import ARMS, FEW_SEED_ARMS
from .datasets import StudyData, load_data
from .evaluate import evaluate, tuned_odin
from .results import pretrain_path, result_path, write_json
from .training import pretrained, run_one, settings, train


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


def run_job(args: argparse.Namespace, name: str, seed: int, data: StudyData) -> None:
    torch.set_num_threads(args.threads)
    if name == "pretrained":
        model, info = pretrained(args, seed, data)
        if not os.path.isfile(result_path(args, name, seed)):
            write_json(result_path(args, name, seed), evaluate(model, data, args.id_eval_size)
                       | {"seed": seed, "model": args.arch, "precision": args.precision,
                          "train_log": info["log"], "settings": settings(args)})  # fmt: skip
    else:
        write_json(result_path(args, name, seed), run_one(args, name, seed, data))


def add_tuned_odin(args: argparse.Namespace, data: StudyData) -> None:
    """Pre-trainings evaluated before ``--tune-odin`` existed get its rows from their cached
    weights (the other numbers of their JSON are kept)."""
    for seed in args.seeds:
        path = result_path(args, "pretrained", seed)
        if not (os.path.isfile(path) and os.path.isfile(pretrain_path(args, seed))):
            continue
        with open(path) as f:
            run = json.load(f)
        if "odin_tuned" not in run:
            model, _ = pretrained(args, seed, data)
            run["odin_tuned"] = tuned_odin(model.eval(), data, args.id_eval_size, 500)
            write_json(path, run)
            print(f"pretrained seed {seed}: added tuned ODIN {run['odin_tuned']['temperature']}, "
                  f"{run['odin_tuned']['epsilon']}", flush=True)  # fmt: skip


def run_grid(args: argparse.Namespace) -> None:
    """Runs the missing jobs, ``--jobs`` at a time: each in a forked process (one torch thread
    each) that shares the loaded data; an arm waits for its seed's pre-training."""
    data = load_data(args)
    t0 = time.perf_counter()
    if data.validation is not None:
        add_tuned_odin(args, data)

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
    Written to ``step_costs.json`` (arms measured before and not now keep their entries, each
    a ratio to the CE step of its own measurement); the report's cost column comes from it."""
    side = 16 if args.smoke and args.arch != "fast_cnn" else 32
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
                        show_progress=False, precision=loss.precision or args.precision)  # fmt: skip
            if r:
                times[name].append(log[0]["seconds"] / steps)
    sec = {name: float(np.median(times[losses[ARMS[name].loss]])) for name in dict.fromkeys(names)}
    path = os.path.join(args.results_dir, "step_costs.json")
    out = {"seconds_per_step": {}, "cost": {}}
    if os.path.isfile(path):
        with open(path) as f:
            out = json.load(f)
    out["seconds_per_step"] |= sec
    out["cost"] |= {k: v / sec["ce"] for k, v in sec.items()}
    out |= {"batch_size": args.batch_size, "arch": args.arch, "threads": args.threads}
    write_json(path, out)
    return out
