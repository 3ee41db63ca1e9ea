"""The GPU check's dry run: the same pipeline, tiny, on CPU, so the script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path: object) -> None:
    out = os.path.join(str(tmp_path), "gpu")
    # Allowances far above the work (x50): a shared or loaded machine must not turn a stage into
    # "skipped: budget" (the budget logic itself is exercised by every stage reading its
    # allowance); the dry run takes the time its work takes.
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "gpu_check.py"),
        "--dry-run",
        "--budget-scale",
        "50",
        "--out-dir",
        out,
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stage 4" in done.stdout  # progress is printed
    report = open(os.path.join(out, "report.md")).read()
    for section in ("## 1. CUDA tests", "## 2. Kernel table", "## 3. ODIN", "## 4. "):
        assert section in report, report
    stages = json.load(open(os.path.join(out, "report.json")))["stages"]
    assert stages["pytest_cuda"]["status"] == "ok" and "counts" in stages["pytest_cuda"]
    rows = stages["kernels"]["rows"]
    # The attention model (SDPA) and the CNN, every method on each.
    assert {r["model"] for r in rows} == {"vit_tiny", "tiny_cnn"}
    for model in ("vit_tiny", "tiny_cnn"):
        steps = {r["step"] for r in rows if r["model"] == model}
        assert steps >= {"ce", "auto", "loop", "batched", "jacrev", "reference", "recompute_c10"}, (
            model
        )
        assert "sampled_k10" in steps, model
    assert "| vit_tiny | 12 | fp32 | loop |" in report
    for r in rows:
        assert r["status"] == "ok", r  # jacrev included, under bf16 autocast too
    assert stages["kernels"]["fastest_exact"]
    # auto's choice is reported in every setting, and never a method that failed there
    for key, best in stages["kernels"]["fastest_exact"].items():
        failed = {
            r["step"]
            for r in rows
            if r["status"] != "ok"
            and key == f"{r['model']} N={r['N']} {'bf16' if r['amp'] else 'fp32'}"
        }
        assert best["auto"] in ("loop", "batched", "jacrev") and best["auto"] not in failed, key
    assert "`auto` chose" in report
    assert stages["odin"]["status"] == "ok" and stages["odin"]["ratio_to_floor"] > 0
    train = stages["train_amp"]
    assert train["status"] == "ok" and train["finite"] is True
    assert train["bf16_vs_fp32"]["agrees"] is True
    # every method and the sampled estimator, bf16 and fp16 (GradScaler), on both models
    amp = stages["amp"]
    assert amp["status"] == "ok", amp
    done = {(r["model"], r["step"], r["dtype"]) for r in amp["rows"] if r["status"] == "ok"}
    for model in ("vit_tiny", "tiny_cnn"):
        for step in ("loop", "batched", "jacrev", "recompute_c5", "auto", "sampled_k1"):
            assert {(model, step, "bf16"), (model, step, "fp16")} <= done, (model, step)
    assert "## 5. AMP" in report
