"""The decision study (benchmarks/reproduce.py) on generated data: its --smoke setting end to end,
and the pieces its table rests on (LogitNorm, paired intervals)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"


@pytest.fixture(scope="module")
def study() -> Iterator[Any]:
    """The study package, imported as the script imports it (benchmarks/ on sys.path)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        modules = {name: importlib.import_module(f"study.{name}")
                   for name in ("arms", "cli", "grid", "report", "results", "training")}  # fmt: skip
        yield SimpleNamespace(**modules)
    finally:
        sys.path.remove(str(SCRIPT.parent))
        for name in [m for m in sys.modules if m == "study" or m.startswith("study.")]:
            sys.modules.pop(name)


def test_logitnorm_is_cross_entropy_on_normalised_logits(study: Any) -> None:
    logits, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    unit = logits / (logits.norm(dim=1, keepdim=True) + 1e-7)
    expected = F.cross_entropy(unit / 0.04, y)
    torch.testing.assert_close(study.training.logitnorm_loss(logits, y), expected)
    # invariant to the scale of the logits (up to the 1e-7)
    torch.testing.assert_close(study.training.logitnorm_loss(7 * logits, y), expected)


def test_paired_interval(study: Any) -> None:
    mean, half = study.report.paired([0.1, 0.3])  # sd 0.1414, n 2: t(1) * sd / sqrt(2)
    assert mean == pytest.approx(0.2) and half == pytest.approx(12.706 * 0.1, rel=1e-3)
    assert math.isnan(study.report.paired([0.5])[1])


def test_absolute_values_show_no_spread_for_one_seed(study: Any) -> None:
    assert study.report.ms([0.5, 0.7]) == "60.0 ± 14.1"  # sample std, ddof = 1
    assert study.report.ms([0.854]) == "85.4"  # not "85.4 ± 0.0"


def test_arms_train_for_their_steps_across_epochs(study: Any) -> None:
    x, y = torch.rand(40, 3, 8, 8), torch.arange(40) % 10
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10))
    log = study.training.train(model, (x, y), arm=study.arms.ARMS["gq_1_k1"], steps=7, lr=0.01,
                          schedule="cosine", seed=0, batch_size=16, desc="t", show_progress=False)  # fmt: skip
    assert [r["steps"] for r in log] == [2, 2, 2, 1]  # 40 // 16 = 2 steps an epoch, cut at 7
    assert all(r["train_gq"] > 0 for r in log)


def test_an_interrupted_run_resumes_from_its_checkpoint_bit_for_bit(
    study: Any, tmp_path: Path
) -> None:
    x, y = torch.rand(40, 3, 8, 8), torch.arange(40) % 10

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                   torch.nn.Flatten(), torch.nn.Linear(144, 10))  # fmt: skip

    kw = dict(arm=study.arms.ARMS["gq_1_k1"], steps=7, lr=0.01, schedule="onecycle", seed=0,
              batch_size=16, desc="t", show_progress=False)  # fmt: skip
    whole = model()
    whole_log = study.training.train(whole, (x, y), **kw)

    class Killed(Exception):
        pass

    def kill_in_third_epoch(_: torch.nn.Module) -> dict:
        epochs.append(0)
        if len(epochs) == 3:
            raise Killed
        return {}

    epochs: list[int] = []
    checkpoint = tmp_path / "run.pt"
    with pytest.raises(Killed):
        study.training.train(model(), (x, y), probe=kill_in_third_epoch,
                             checkpoint=str(checkpoint), **kw)  # fmt: skip
    assert checkpoint.is_file()  # written after epochs 1 and 2
    resumed = model()  # a new process: fresh weights, the checkpoint on disk
    log = study.training.train(resumed, (x, y), checkpoint=str(checkpoint), **kw)
    assert [r.get("resumed", False) for r in log] == [False, False, True, False]
    assert [r["loss"] for r in log] == [r["loss"] for r in whole_log]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not checkpoint.exists()  # removed when the run ends


def test_report_covers_arms_without_a_ce_run(study: Any) -> None:
    def run(auroc: float, acc: float, **extra: Any) -> dict:
        ood = {s: {m: {"auroc": auroc, "fpr95": 1 - auroc, "aupr": auroc}
                   for m in ("ODIN", "MSP", "energy")} for s in ("MNIST", "uniform")}  # fmt: skip
        settings = {"arch": "tiny_cnn", "pretrain_epochs": 1, "pretrain_lr": 0.1, "ft_lr": 0.02,
                    "batch_size": 32, "id_eval_size": 64, "ood_size": 32, "threads": 1,
                    "torch": "x"}  # fmt: skip
        return {"accuracy": acc, "ood": ood, "settings": settings, "seconds_per_step": 1.0,
                "train_log": [{"seconds": 60.0}], **extra}  # fmt: skip

    runs = {
        "pretrained": {0: run(0.70, 0.60), 1: run(0.80, 0.70)},
        "scratch_gq_1_k1": {0: run(0.75, 0.50), 1: run(0.90, 0.60)},
        # GQ alone pairs with the weights it started from, not with the stored pre-training
        "gq_only_k1_s390": {
            0: run(0.60, 0.10, start=run(0.50, 0.65)),
            1: run(0.70, 0.20, start=run(0.60, 0.75)),
        },
    }
    text, head = study.report.report(runs)
    assert head["scratch_gq_1_k1"]["seeds"] == [0, 1]
    assert head["scratch_gq_1_k1"]["auroc"][0] == pytest.approx(0.075)
    assert head["gq_only_k1_s390"]["auroc"][0] == pytest.approx(0.10)
    assert head["gq_only_k1_s390"]["accuracy"][0] == pytest.approx(-0.55)
    assert "## The paper's regimes" in text
    assert "the pre-training's 1 epochs" in text  # the runs' own setting
    assert "| gq_only_k1_s390 | 2 | 70.0 | 15.0 | 55.0 | 65.0 |" in text
    assert "| scratch_gq_1_k1 | 2 | +7.5 ± " in text.split("per OOD set")[1]


def test_report_checks_precision_and_shows_noise_and_tuned_odin(study: Any) -> None:
    def run(auroc: float, noise: float, tuned: float, acc: float, precision: str = "bf16") -> dict:
        sets = {"MNIST": auroc, "uniform": noise}
        ood = {s: {m: {"auroc": a, "fpr95": 1 - a} for m in ("ODIN", "MSP", "energy")}
               for s, a in sets.items()}  # fmt: skip
        odin_tuned = {"temperature": 100.0, "epsilon": 0.002,
                      "ood": {s: {"auroc": tuned, "fpr95": 1 - tuned} for s in sets}}  # fmt: skip
        settings = {"arch": "fast_cnn", "pretrain_epochs": 1, "pretrain_lr": 0.1, "ft_lr": 0.02,
                    "batch_size": 32, "id_eval_size": 64, "ood_size": 32, "threads": 1,
                    "torch": "x", "precision": "bf16"}  # fmt: skip
        return {"accuracy": acc, "ood": ood, "odin_tuned": odin_tuned, "settings": settings,
                "seconds_per_step": 1.0, "train_log": [{"seconds": 60.0}],
                "precision": precision}  # fmt: skip

    runs = {
        "ce_s80": {0: run(0.90, 0.80, 0.91, 0.9), 1: run(0.92, 0.84, 0.93, 0.9)},
        "gq_1_k1_s80": {0: run(0.91, 0.90, 0.95, 0.8), 1: run(0.93, 0.94, 0.97, 0.9)},
        "gq_1_k1_s80_float32": {0: run(0.95, 0.90, 0.95, 0.8, "float32"),
                                1: run(0.97, 0.94, 0.97, 0.9, "float32")},
    }  # fmt: skip
    text, _ = study.report.report(runs)
    precision = text.split("## Precision check")[1].split("##")[0]
    assert "| gq_1_k1_s80 | bf16 | 2 | +1.0 ± 0.0 |" in precision
    assert "| gq_1_k1_s80_float32 | float32 | 2 | +5.0 ± 0.0 |" in precision
    assert "| gq_1_k1_s80_float32 − gq_1_k1_s80 (paired) | | 2 | +4.0 ± 0.0 |" in precision
    # a study run in float32 throughout: both rows say so (the label comes from the runs)
    for seed_runs in runs.values():
        for r in seed_runs.values():
            r["precision"] = "float32"
    flat = study.report.report(runs)[0].split("## Precision check")[1].split("##")[0]
    assert "| gq_1_k1_s80 | float32 | 2 |" in flat
    noise = text.split("## The noise sets")[1]
    # real mean +1, all sets (MNIST, uniform) mean (+1 + 10) / 2, tuned +4
    assert "| gq_1_k1_s80 | 2 | +1.0 ± 0.0 | +5.5 ± 0.0 | +4.0 ± 0.0 | -4.0 ± 0.0 |" in noise
    assert "(100, 0.002)" in noise


def test_grid_order_and_controls(study: Any) -> None:
    args = study.cli.parse_args(["--seeds", "0", "1", "--few-seeds", "1",
                                 "--arms", "gq_1_s80", "gq_1_k1", "ce_s80"])  # fmt: skip
    assert study.grid.grid_jobs(args) == [
        ("pretrained", 0), ("gq_1_s80", 0), ("gq_1_k1", 0), ("ce_s80", 0),
        ("pretrained", 1), ("gq_1_s80", 1), ("ce_s80", 1),
    ]  # fmt: skip
    args.order = "arm"
    assert study.grid.grid_jobs(args) == [
        ("pretrained", 0), ("gq_1_s80", 0), ("pretrained", 1), ("gq_1_s80", 1), ("gq_1_k1", 0),
        ("ce_s80", 0), ("ce_s80", 1),
    ]  # fmt: skip
    controls = study.arms.CONTROLS
    assert controls["gq_1_s320"] == "ce_s320" and controls["gq_1_k3_s320"] == "ce_s320"
    assert controls["gq_1_k1"] == "ce" and controls["ce_s1600"] == "ce"
    assert controls["scratch_gq_1_k1"] == "pretrained"
    assert study.arms.ARMS["gq_1_k1_s320"].loss == study.arms.ARMS["gq_1_k1"]
    arms = study.arms.ARMS  # the value of a non-zero λ does not change the cost of a step
    assert arms["scratch_gq_0.1_k1"].loss == arms["scratch_gq_1_k1"].loss == arms["gq_1_k1"]
    assert arms["gq_10"].loss == arms["gq_1"].loss != arms["ce"].loss
    assert arms["gq_1_k1_s80_float32"].loss != arms["gq_1_k1_s80"].loss == arms["gq_1_k1"].loss


def study_arms() -> list[str]:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return list(importlib.import_module("study.arms").ARMS)
    finally:
        sys.path.remove(str(SCRIPT.parent))


@pytest.mark.slow
def test_smoke_grid_writes_resumable_runs_and_report(tmp_path: Path) -> None:
    # the documented command's defaults (--jobs 1: every run in this process)
    args = [sys.executable, str(SCRIPT), "--smoke", "--no-progress",
            "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = tmp_path / "res"
    arms = ("ce", "gq_0.1", "gq_1", "gq_10", "gq_reversed", "logitnorm", "reference_1",
            "ce_s80", "gq_1_s80", "ce_s320", "gq_1_s320", "ce_s1600",
            "gq_1_k1", "gq_1_k3", "gq_1_k1_s320", "gq_1_k3_s320", "scratch_gq_1_k1",
            "scratch_gq_0.1_k1", "scratch_gq_1", "gq_only_k1_s390", "reference_only_s390",
            "gq_0.1_k1_s80", "gq_1_k1_s80", "gq_3_k1_s80", "gq_1_k1_s80_float32", "ce_s500")  # fmt: skip
    assert set(arms) == set(study_arms())
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
    twin = json.loads((res / "gq_1_k1_s80_float32" / "seed0.json").read_text())
    assert twin["precision"] == "float32"
    # from scratch: the pre-training's recipe (1 epoch of 256 images in batches of 32), with GQ
    scratch = json.loads((res / "scratch_gq_1_k1" / "seed0.json").read_text())
    assert scratch["steps"] == 8 and scratch["train_log"][0]["train_gq"] > 0
    report = (res / "report.md").read_text()
    assert "## Which should I use?" in report and "| gq_reversed | 20 | ce | 2 |" in report
    for section in ("Does the effect grow", "The same compute", "The cheap estimator"):
        assert section in report
    # the equal-compute table mixes spreads: absolute rows are std, the difference a t interval
    compute = report.split("## The same compute")[1].split("\n## ")[0]
    assert "mean ± std over seeds" in compute and "(mean ± std) |" in compute
    assert "(paired, 2 seeds, 95 % t interval) |" in compute
    assert "| gq_1_s320 | 320 | ce_s320 | 2 |" in report
    assert "| scratch_gq_1_k1 | 1950 | pretrained | 2 |" in report
    # GQ alone: no CE term, and its control is the evaluation of the weights it started from
    alone = json.loads((res / "gq_only_k1_s390" / "seed0.json").read_text())
    assert alone["base"] == "none" and alone["steps"] == 10 and "start" in alone
    assert alone["train_log"][0]["loss"] == pytest.approx(alone["train_log"][0]["train_gq"])
    assert "## The paper's regimes" in report
    if importlib.util.find_spec("matplotlib"):
        assert (res / "study.png").is_file() and (res / "regimes.png").is_file()
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


def test_jigsaw_shuffles_each_images_own_tiles() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from study.datasets import jigsaw
    finally:
        sys.path.remove(str(SCRIPT.parent))
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = jigsaw(images, seed=1, grid=4)

    def tiles(x: torch.Tensor) -> list[list[float]]:  # each 2x2 tile, as a sortable key
        return sorted(x[:, i : i + 2, j : j + 2].flatten().tolist()
                      for i in range(0, 8, 2) for j in range(0, 8, 2))  # fmt: skip

    for a, b in zip(images, out, strict=True):
        assert tiles(a) == tiles(b) and not torch.equal(a, b)


@pytest.mark.slow
def test_smoke_grid_of_the_fast_network(tmp_path: Path) -> None:
    """fast_cnn: pre-trained and trained from scratch with the fast recipe (bf16), fine-tuned
    by the study's loop, and ODIN also tuned on the validation pair."""
    res = tmp_path / "res"
    args = [sys.executable, str(SCRIPT), "--smoke", "--arch", "fast_cnn", "--no-progress",
            "--arms", "ce", "scratch_gq_1_k1", "gq_1_k1_s80_float32", "--seeds", "0",
            "--results-dir", str(res), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for arm in ("pretrained", "ce", "scratch_gq_1_k1"):
        run = json.loads((res / arm / "seed0.json").read_text())
        assert (run["model"], run["precision"]) == ("fast_cnn", "bf16")
        assert 0 <= run["accuracy"] <= 1
        tuned = run["odin_tuned"]
        assert tuned["temperature"] in (1.0, 10.0, 100.0, 1000.0)
        assert set(tuned["ood"]) == set(run["ood"])
    scratch = json.loads((res / "scratch_gq_1_k1" / "seed0.json").read_text())
    assert scratch["estimator"] == "sampled" and scratch["lam"] == 1.0
    twin = json.loads((res / "gq_1_k1_s80_float32" / "seed0.json").read_text())  # the override
    assert (twin["precision"], twin["settings"]["precision"]) == ("float32", "bf16")
    # a pre-training evaluated without the tuned rows gets them from its cached weights
    path = res / "pretrained" / "seed0.json"
    run = json.loads(path.read_text())
    tuned = run.pop("odin_tuned")
    path.write_text(json.dumps(run))
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(path.read_text())["odin_tuned"] == tuned
