"""Where runs live: one JSON file per finished run (committed), cached weights (not)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .arms import ARMS


def pretrain_path(args: argparse.Namespace, seed: int) -> str:
    name = f"{args.arch}_e{args.pretrain_epochs}_seed{seed}.pt"
    return os.path.join(args.cache_dir, "pretrain", name)


def result_path(args: argparse.Namespace, name: str, seed: int) -> str:
    return os.path.join(args.results_dir, name, f"seed{seed}.json")


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


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
