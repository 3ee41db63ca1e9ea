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


@pytest.mark.slow
def test_smoke_grid_writes_resumable_runs_and_report(tmp_path: Path) -> None:
    args = [sys.executable, str(SCRIPT), "--smoke", "--no-progress",
            "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = tmp_path / "res"
    arms = ("ce", "gq_0.1", "gq_1", "gq_10", "gq_reversed", "logitnorm", "reference_1")
    for arm in (*arms, "pretrained"):
        for seed in (0, 1):
            run = json.loads((res / arm / f"seed{seed}.json").read_text())
            assert 0 <= run["accuracy"] <= 1
            assert set(run["ood"]) == {"other patterns", "photos", "uniform", "gaussian"}
    gq10 = json.loads((res / "gq_10" / "seed0.json").read_text())
    assert gq10["lam"] == 10.0 and gq10["train_log"][0]["train_gq"] > 0
    assert json.loads((res / "ce" / "seed0.json").read_text())["train_log"][0]["train_gq"] == 0
    report = (res / "report.md").read_text()
    assert "## Which should I use?" in report and "| gq_reversed | 2 |" in report
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
