"""The decision study (benchmarks/reproduce.py) on generated data: its --smoke setting end to end,
and the pieces its table rests on (LogitNorm, paired intervals)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"


@pytest.fixture(scope="module")
def reproduce() -> Iterator[Any]:
    # A benchmark imports its neighbours (benchmarks/_examples_path.py) as when it runs as a script.
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules["reproduce"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        yield module
    finally:
        sys.path.remove(str(SCRIPT.parent))
        sys.modules.pop("reproduce", None)


def test_logitnorm_is_cross_entropy_on_normalised_logits(reproduce: Any) -> None:
    logits, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    unit = logits / (logits.norm(dim=1, keepdim=True) + 1e-7)
    expected = F.cross_entropy(unit / 0.04, y)
    torch.testing.assert_close(reproduce.logitnorm_loss(logits, y), expected)
    # invariant to the scale of the logits (up to the 1e-7)
    torch.testing.assert_close(reproduce.logitnorm_loss(7 * logits, y), expected)


def test_paired_interval(reproduce: Any) -> None:
    mean, half = reproduce.paired([0.1, 0.3])  # sd 0.1414, n 2: t(1) * sd / sqrt(2)
    assert mean == pytest.approx(0.2) and half == pytest.approx(12.706 * 0.1, rel=1e-3)
    assert math.isnan(reproduce.paired([0.5])[1])


def test_arms_train_for_their_steps_across_epochs(reproduce: Any) -> None:
    x, y = torch.rand(40, 3, 8, 8), torch.arange(40) % 10
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10))
    log = reproduce.train(model, (x, y), arm=reproduce.ARMS["gq_1_k1"], steps=7, lr=0.01,
                          schedule="cosine", seed=0, batch_size=16, desc="t", show_progress=False)  # fmt: skip
    assert [r["steps"] for r in log] == [2, 2, 2, 1]  # 40 // 16 = 2 steps an epoch, cut at 7
    assert all(r["train_gq"] > 0 for r in log)


def test_grid_order_and_controls(reproduce: Any) -> None:
    args = reproduce.parse_args(["--seeds", "0", "1", "--few-seeds", "1",
                                 "--arms", "gq_1_s80", "gq_1_k1", "ce_s80"])  # fmt: skip
    assert reproduce.grid_jobs(args) == [
        ("pretrained", 0), ("gq_1_s80", 0), ("gq_1_k1", 0), ("ce_s80", 0),
        ("pretrained", 1), ("gq_1_s80", 1), ("ce_s80", 1),
    ]  # fmt: skip
    args.order = "arm"
    assert reproduce.grid_jobs(args) == [
        ("pretrained", 0), ("gq_1_s80", 0), ("pretrained", 1), ("gq_1_s80", 1), ("gq_1_k1", 0),
        ("ce_s80", 0), ("ce_s80", 1),
    ]  # fmt: skip
    controls = reproduce.CONTROLS
    assert controls["gq_1_s320"] == "ce_s320" and controls["gq_1_k3_s320"] == "ce_s320"
    assert controls["gq_1_k1"] == "ce" and controls["ce_s1600"] == "ce"
    assert controls["scratch_gq_1_k1"] == "pretrained"
    assert reproduce.ARMS["gq_1_k1_s320"].loss == reproduce.ARMS["gq_1_k1"]


@pytest.mark.slow
def test_smoke_grid_writes_resumable_runs_and_report(tmp_path: Path) -> None:
    args = [sys.executable, str(SCRIPT), "--smoke", "--no-progress", "--jobs", "2",
            "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = tmp_path / "res"
    arms = ("ce", "gq_0.1", "gq_1", "gq_10", "gq_reversed", "logitnorm", "reference_1",
            "ce_s80", "gq_1_s80", "ce_s320", "gq_1_s320", "ce_s1600",
            "gq_1_k1", "gq_1_k3", "gq_1_k1_s320", "gq_1_k3_s320", "scratch_gq_1_k1")  # fmt: skip
    for arm in (*arms, "pretrained"):
        for seed in (0, 1):
            run = json.loads((res / arm / f"seed{seed}.json").read_text())
            assert 0 <= run["accuracy"] <= 1
            assert set(run["ood"]) == {"other patterns", "photos", "uniform", "gaussian"}
    gq10 = json.loads((res / "gq_10" / "seed0.json").read_text())
    assert gq10["lam"] == 10.0 and gq10["train_log"][0]["train_gq"] > 0
    assert json.loads((res / "ce" / "seed0.json").read_text())["train_log"][0]["train_gq"] == 0
    long = json.loads((res / "ce_s1600" / "seed0.json").read_text())  # smoke: 1600 / 40 steps
    assert sum(r["steps"] for r in long["train_log"]) == 40 and len(long["train_log"]) == 5
    k1 = json.loads((res / "gq_1_k1_s320" / "seed1.json").read_text())
    assert (k1["estimator"], k1["num_sampled"], k1["steps"]) == ("sampled", 1, 8)  # 320 / 40
    # from scratch: the pre-training's recipe (1 epoch of 256 images in batches of 32), with GQ
    scratch = json.loads((res / "scratch_gq_1_k1" / "seed0.json").read_text())
    assert scratch["steps"] == 8 and scratch["train_log"][0]["train_gq"] > 0
    report = (res / "report.md").read_text()
    assert "## Which should I use?" in report and "| gq_reversed | 20 | ce | 2 |" in report
    for section in ("Does the effect grow", "The same compute", "The cheap estimator"):
        assert section in report
    assert "| gq_1_s320 | 320 | ce_s320 | 2 |" in report
    assert "| scratch_gq_1_k1 | 1950 | pretrained | 2 |" in report
    assert list((tmp_path / "cache" / "pretrain").glob("*.pt"))  # weights: cache only
    assert not list(res.rglob("*.pt"))
    costs = json.loads((res / "step_costs.json").read_text())
    assert set(costs["cost"]) == set(arms) and costs["cost"]["ce"] == 1.0
    assert "| gq_1 |" in report.split("Cost of one training step")[1]
    # resumes: nothing left to train, the report is rebuilt from the JSON alone
    (res / "report.md").unlink()
    again = subprocess.run([*args, "--report-only"], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (res / "report.md").read_text() == report
