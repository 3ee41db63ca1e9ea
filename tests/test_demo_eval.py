"""End-to-end tests of examples/demo.py and examples/evaluate_ood.py on tiny data."""

from __future__ import annotations

import csv
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out")


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in (*METRICS, "id_accuracy"):
            row[key] = float(row[key])
    return rows


def check_values_and_means(rows: list[dict[str, Any]], group: tuple[str, ...]) -> None:
    """Every metric finite in [0, 1]; each group's "mean" row is the mean of its other rows."""
    for row in rows:
        for key in (*METRICS, "id_accuracy"):
            assert math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0, (key, row)
    keyfunc = lambda r: tuple(r[g] for g in group)  # noqa: E731
    for _, members in itertools.groupby(sorted(rows, key=keyfunc), key=keyfunc):
        members = list(members)
        mean = [r for r in members if r["ood_set"] == "mean"]
        per_set = [r for r in members if r["ood_set"] != "mean"]
        assert len(mean) == 1 and per_set
        for key in METRICS:
            assert mean[0][key] == pytest.approx(np.mean([r[key] for r in per_set]), abs=1e-12)


def check_pngs(folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        data = (folder / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


# --------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_quick_end_to_end_and_deterministic(tmp_path: Path) -> None:
    proc = run_script("demo.py", "--quick", "--no-progress", "--out-dir", "out", cwd=tmp_path)
    out = tmp_path / "out"
    rows = read_rows(out / "results.csv")
    ood_sets = ("digits 6-9", "photo patches", "uniform noise", "Gaussian noise", "mean")
    expected = set(itertools.product(("CE", "CE+GQ"), ("ODIN", "MSP", "energy"), ood_sets))
    assert {(r["model"], r["method"], r["ood_set"]) for r in rows} == expected
    assert len(rows) == len(expected)
    check_values_and_means(rows, ("model", "method"))
    by_model = {m: [r["auroc"] for r in rows if r["model"] == m] for m in ("CE", "CE+GQ")}
    assert by_model["CE"] != by_model["CE+GQ"]  # the GQ term changed the trained weights
    check_pngs(out, ("odin_scores.png", "fig1_gradient_norms.png", "fig2_logit_gap.png"))
    md = (out / "results.md").read_text()
    assert "| digits 6-9 | ODIN |" in md and "| **mean** | energy |" in md
    assert "lambda = 1e-06" in md  # the note on the paper's lambda
    assert md.count("Bottom line:") == 3  # every figure's caption, also in results.md
    assert "wall time:" in proc.stdout

    # the same seed in another process gives byte-identical results
    import demo

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        demo.main(
            ["--quick", "--no-figures", "--no-progress", "--out-dir", str(tmp_path / "again")]
        )
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert (tmp_path / "again" / "results.csv").read_bytes() == (out / "results.csv").read_bytes()


def test_demo_figures_show_detector_scores_with_captions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    import demo
    import plots

    rng = np.random.default_rng(0)
    sets = (demo.ID_NAME, *demo.OOD_NAMES)
    odin = {k: 1 / 6 + rng.uniform(0, 1e-3, 5) for k in sets}  # what detector.score() returns
    norms = {k: rng.uniform(0.01, 0.1, 5) for k in sets}
    norms[demo.ID_NAME] = np.full(5, 1e-3)  # ID smallest: against ODIN's premise
    ev = demo.Evaluation(0.9, {"ODIN": odin}, norms, {k: rng.uniform(0, 1, 5) for k in sets}, {})
    results = {"CE": ev, "CE+GQ": ev}
    rows = [{"model": m, "method": "ODIN", "ood_set": "mean", "auroc": a}
            for m, a in (("CE", 0.9), ("CE+GQ", 0.8))]  # fmt: skip
    args = argparse.Namespace(temperature=1000.0, epsilon=0.002, lam=1.0, out_dir=str(tmp_path))
    captions = demo.figure_captions(results, rows, args)
    assert "GQ did not improve ODIN here" in captions["odin_scores.png"]
    assert "our measurement disagrees with the paper" in captions["fig1_gradient_norms.png"]
    seen: dict[str, Any] = {}

    def capture(panels: Any, path: str, **kwargs: Any) -> str:
        seen[os.path.basename(path)] = (panels, kwargs)
        return path

    for name in ("histogram_panels",):
        monkeypatch.setattr(plots, name, capture)
    demo.figures(results, captions, args)
    panels, kwargs = seen["odin_scores.png"]
    assert panels["CE"][demo.ID_NAME] is odin[demo.ID_NAME]  # the scores themselves, unrescaled
    assert "detector.score(x)" in kwargs["xlabel"]
    assert {k: v[1]["caption"] for k, v in seen.items()} == captions


def test_premise_caption_agrees_when_id_is_largest() -> None:
    import plots

    panels = {"CE": {"ID": np.array([5.0, 6.0]), "noise": np.array([1.0, 2.0])}}
    assert plots.premise_caption(panels, "gap").startswith("Bottom line: as the premise predicts")


def test_demo_photo_patches_match_digit_levels() -> None:
    import demo

    patches = demo.photo_patches(20, seed=0)
    assert patches.shape == (20, 8, 8)
    np.testing.assert_array_equal(patches * 16, np.round(patches * 16))  # the 17 digit levels
    assert patches.min() == 0.0 and patches.max() == 1.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "--epochs, --batch-size and --threads must be >= 1"),
        (["--threads", "0"], "--epochs, --batch-size and --threads must be >= 1"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--lam", "-1"], "--epsilon and --lam >= 0"),
    ],
)
def test_demo_rejects_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    import demo

    with pytest.raises(SystemExit):
        demo.parse_args(argv)
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- evaluate_ood


def make_checkpoint(path: Path) -> torch.nn.Module:
    from models import build_model

    torch.manual_seed(1)
    model = build_model("small_cnn", 10)
    ckpt = {"model": model.state_dict(), "arch": "small_cnn", "num_classes": 10}
    torch.save({**ckpt, "dataset": "cifar10", "epoch": 0}, path)
    return model.eval()


@pytest.mark.slow
def test_evaluate_ood_end_to_end(tmp_path: Path) -> None:
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    model = make_checkpoint(tmp_path / "ckpt.pt")
    rng = np.random.default_rng(0)
    x_test = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    y_test = np.arange(30) % 10
    np.savez(tmp_path / "id_test.npz", x=x_test, y=y_test)
    x_fit = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "id_train.npz", x=x_fit, y=np.arange(40) % 10)
    x_rgb = (rng.random((24, 32, 32, 3)) ** 3 * 255).astype(np.uint8)  # darker than ID
    np.savez(tmp_path / "dark.npz", x=x_rgb)
    np.savez(tmp_path / "grey.npz", x=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(3):
        image = rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / "imgs" / "sub" / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / "imgs/g.png")

    args = ["ckpt.pt", "--id", "npz:id_test.npz", "--fit-data", "npz:id_train.npz"]
    args += ["--ood", "npz:dark.npz", "npz:grey.npz", "folder:imgs", "noise:uniform"]
    args += ["noise:gaussian", "--noise-count", "12", "--limit", "25", "--batch-size", "64"]
    run_script("evaluate_ood.py", *args, "--no-progress", "--out-dir", "out", cwd=tmp_path)
    out = tmp_path / "out"
    rows = read_rows(out / "results.csv")
    sets = ("dark", "grey", "imgs", "uniform noise", "Gaussian noise", "mean")
    methods = ("ODIN", "MSP", "energy", "Mahalanobis")
    assert [(r["method"], r["ood_set"]) for r in rows] == list(itertools.product(methods, sets))
    check_values_and_means(rows, ("method",))
    n_ood = {r["ood_set"]: int(r["n_ood"]) for r in rows if r["method"] == "MSP"}
    assert n_ood == {"dark": 24, "grey": 20, "imgs": 4, "uniform noise": 12,
                     "Gaussian noise": 12, "mean": 72}  # fmt: skip
    assert {int(r["n_id"]) for r in rows} == {25}  # --limit 25 of 30 ID images

    # independent check: MSP AUROC and ID accuracy from the checkpoint's model directly
    def to_input(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0

    with torch.no_grad():
        logits_id = model(to_input(x_test[:25]))
        logits_ood = model(to_input(x_rgb))
    msp = torch.cat([logits_id, logits_ood]).softmax(1).amax(1).numpy()
    labels = np.r_[np.ones(25), np.zeros(24)]
    msp_dark = next(r for r in rows if r["method"] == "MSP" and r["ood_set"] == "dark")
    assert msp_dark["auroc"] == pytest.approx(roc_auc_score(labels, msp), abs=1e-9)
    accuracy = (logits_id.argmax(1).numpy() == y_test[:25]).mean()
    assert all(r["id_accuracy"] == pytest.approx(accuracy) for r in rows)

    md = (out / "results.md").read_text()
    for method in methods:
        assert f"## {method}" in md
    assert "ε = 0.001" in md  # the paper's value for a cifar10 checkpoint
    check_pngs(out, ("odin_scores.png", "fig1_gradient_norms.png", "fig2_logit_gap.png"))


def test_ood_images_are_converted_to_the_id_shape() -> None:
    import data

    grey = torch.full((2, 1, 28, 28), 0.25)
    rgb = data.convert_images(grey, (3, 32, 32))
    assert rgb.shape == (2, 3, 32, 32)
    torch.testing.assert_close(rgb, torch.full_like(rgb, 0.25))
    colour = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1).expand(1, 3, 40, 40)
    back = data.convert_images(colour, (1, 8, 8))
    assert back.shape == (1, 1, 8, 8)
    expected = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6
    torch.testing.assert_close(back, torch.full_like(back, expected))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mnist.npz", "dataset spec must be one of"),
        ("bogus:x", "dataset spec must be one of"),
        ("npz:", "dataset spec must be one of"),
        ("noise:pink", "noise spec must be one of"),
    ],
)
def test_evaluate_ood_rejects_bad_specs(spec: str, message: str) -> None:
    import evaluate_ood

    with pytest.raises(ValueError, match=message):
        evaluate_ood.parse_spec(spec, evaluate_ood.SPEC_KINDS)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--limit", "0"], "--limit must be >= 1"),
        (["--noise-count", "0"], "--noise-count must be >= 1"),
        (["--temperature", "-1"], "--temperature must be > 0"),
        (["--ood", "noise:pink"], "noise spec must be one of"),
    ],
)
def test_evaluate_ood_rejects_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    import evaluate_ood

    base = ["ckpt.pt", "--ood", "noise:uniform"]
    with pytest.raises(SystemExit):
        evaluate_ood.parse_args(base + argv)
    assert message in capsys.readouterr().err


def test_evaluate_ood_needs_fit_data_for_a_non_cifar_id_set(tmp_path: Path) -> None:
    import evaluate_ood

    model = make_checkpoint(tmp_path / "ckpt.pt")
    args = evaluate_ood.parse_args(["ckpt.pt", "--ood", "noise:uniform"])
    with pytest.raises(SystemExit, match="--fit-data train needs a CIFAR ID set"):
        evaluate_ood.fit_mahalanobis(model, {"num_classes": 10}, "npz:x.npz", args)


def test_penultimate_features_are_the_head_input() -> None:
    import evaluate_ood
    from models import build_model

    model = build_model("small_cnn", 10).eval()
    x = torch.rand(3, 3, 32, 32)
    feats = evaluate_ood.penultimate(model, "fc")(x)
    with torch.no_grad():
        torch.testing.assert_close(model.fc(feats), model(x))
    assert not model.fc._forward_pre_hooks  # the hook is removed


def test_logit_gap() -> None:
    import plots

    logits = np.random.default_rng(0).normal(size=(7, 5))
    expected = [sorted(row)[-1] - sorted(row)[-2] for row in logits]
    np.testing.assert_allclose(plots.logit_gap(logits), expected)
    with pytest.raises(ValueError, match="`logits` must have shape"):
        plots.logit_gap(np.zeros((3, 1)))
