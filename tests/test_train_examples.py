"""End-to-end and unit tests of the training examples (examples/train_cifar.py,
examples/finetune_imagenet30.py and their models/data/plumbing modules), on tiny generated data."""

from __future__ import annotations

import csv
import importlib.abc
import json
import math
import os
import re
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import data  # examples/ is on sys.path via tests/conftest.py
import finetune_imagenet30
import models
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import train_cifar
import train_utils

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

QUIET = ["--no-progress", "--num-workers", "0", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread (as the subprocesses get), deterministic flag restored afterwards."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _write_cifar(folder: Path, n_train: int, n_test: int) -> Path:
    """Tiny files in the format of the data pack: x uint8 (N, 32, 32, 3), y int64 (N,)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        np.savez(folder / f"cifar10_{split}.npz", x=x, y=(np.arange(n) % 10).astype(np.int64))
    return folder


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- train_cifar


def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train_cifar.main(
        ["--smoke", "--lam", "0.1", "--limit-train", "48", "--batch-size", "16", "--out-dir",
         str(out), *QUIET]
    )  # fmt: skip
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("final_train_acc", "final_test_acc", "final_train_loss", "mean_gq", "wall_time_s"):
        assert math.isfinite(on_disk[key]), key
    assert 0 < on_disk["mean_gq"] <= 1  # softmax operand: GQ_i <= 1
    assert on_disk["final_train_loss"] == pytest.approx(
        on_disk["final_train_ce"] + 0.1 * on_disk["mean_gq"], rel=1e-6
    )
    assert on_disk["epochs_completed"] == 2 and on_disk["global_steps"] == 6
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["lr"]) == pytest.approx(0.05)  # cosine, T_max = 2 epochs
    # The checkpoint rebuilds the model, whose test accuracy is the one reported.
    ckpt = _load(out / "model_final.pt")
    assert set("model arch num_classes dataset optimizer scheduler epoch rng args".split()) <= set(
        ckpt
    )
    model = models.build_model(ckpt["arch"], ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    x, y = data.synthetic_dataset(64, 10, seed=1).tensors
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == y).double().mean().item()
    assert acc == pytest.approx(on_disk["final_test_acc"])
    assert not list(out.glob(".tmp_*"))  # atomic writes left no temporary files


def test_kill_mid_epoch_and_resume_is_bit_identical(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path / "data", n_train=64, n_test=16)
    # The sampled estimator draws its classes from the global RNG, so resuming must restore it.
    opts = "--arch small_cnn --epochs 3 --batch-size 16 --lam 0.1 --estimator sampled"
    args = [*f"{opts} --num-sampled 2 --deterministic".split(), "--data-dir", str(folder), *QUIET]
    train_cifar.main([*args, "--out-dir", str(tmp_path / "a")])

    out_b = tmp_path / "b"
    proc = subprocess.run(  # 4 steps per epoch: step 6 is in the middle of epoch 2
        [sys.executable, str(EXAMPLES / "train_cifar.py"), *args, "--out-dir", str(out_b),
         "--kill-after-steps", "6"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _load(out_b / "checkpoint.pt")["epoch"] == 1
    assert not (out_b / "model_final.pt").exists()
    train_cifar.main([*args, "--out-dir", str(out_b), "--resume"])

    a, b = _load(tmp_path / "a" / "model_final.pt"), _load(out_b / "model_final.pt")
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different
    for sa, sb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    rows = [list(csv.DictReader((d / "log.csv").open())) for d in (tmp_path / "a", out_b)]
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in rs] for rs in rows]
    assert strip[0] == strip[1] and len(strip[0]) == 3


@pytest.mark.slow
@pytest.mark.parametrize("method", ["", "--gq-method recompute --chunk-size 4"])
def test_ddp_two_processes_match_single_process(tmp_path: Path, method: str) -> None:
    # GroupNorm: per-sample statistics, so splitting the batch over processes changes nothing
    # (train-mode BatchNorm would normalise each half with its own statistics). The recompute
    # method hands its parameter gradients to DDP through the step's single backward().
    folder = _write_cifar(tmp_path / "data", n_train=48, n_test=16)
    opts = f"--arch small_cnn_gn --epochs 1 --batch-size 16 --lam 0.5 {method}"
    args = [*opts.split(), "--data-dir", str(folder), *QUIET]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(EXAMPLES / "train_cifar.py"), *args, "--out-dir", str(tmp_path / "ddp")],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train_cifar.main([*args, "--out-dir", str(tmp_path / "one")])
    ddp = _load(tmp_path / "ddp" / "model_final.pt")
    one = _load(tmp_path / "one" / "model_final.pt")
    assert ddp["global_step"] == one["global_step"] == 3
    for key, value in one["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-6)
    s_ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    s_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert s_ddp["world_size"] == 2
    assert s_ddp["mean_gq"] == pytest.approx(s_one["mean_gq"], rel=1e-5)
    assert s_ddp["final_test_acc"] == s_one["final_test_acc"]


def test_batch_must_split_evenly_over_processes(tmp_path: Path) -> None:
    args = train_cifar.parse_args(["--smoke", "--batch-size", "10", "--out-dir", str(tmp_path)])
    info = train_utils.DistInfo(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="--batch-size 10 must be divisible by the 3 processes"):
        train_cifar.train(args, info)


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--lam", "-1"], "--lam must be >= 0"), (["--epochs", "0"], "--epochs must be >= 1"),
     (["--formulation", "eq7"], "invalid choice")],
)  # fmt: skip
def test_cli_rejects_bad_values(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        train_cifar.parse_args(argv)
    assert message in capsys.readouterr().err


def test_resume_rejects_other_architecture(tmp_path: Path) -> None:
    train_cifar.main(["--smoke", "--lam", "0", "--epochs", "1", "--out-dir", str(tmp_path), *QUIET])
    with pytest.raises(ValueError, match="holds tiny_cnn with 10 classes, not small_cnn_gn"):
        train_cifar.main(["--smoke", "--arch", "small_cnn_gn", "--lam", "0", "--out-dir",
                          str(tmp_path), "--resume", *QUIET])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_cifar.main(["--smoke", "--resume", str(tmp_path / "nope.pt"), "--out-dir",
                          str(tmp_path), *QUIET])  # fmt: skip


def test_resume_refuses_other_epochs_lam_or_lr(tmp_path: Path) -> None:
    # A finished 1-epoch run resumed with --epochs 3 used to train 2 more epochs at lr = 0: the
    # restored cosine schedule (T_max = 1) won over the new --epochs.
    base = ["--smoke", "--lam", "0", "--epochs", "1", "--out-dir", str(tmp_path), *QUIET]
    train_cifar.main(base)
    for flag, value, saved in (("--epochs", "3", "1"), ("--lam", "1.0", "0.0"),
                               ("--lr", "0.5", "0.1")):  # fmt: skip
        argv = [*base, "--resume", flag, value]
        with pytest.raises(ValueError, match=rf"{flag} {value} \(checkpoint: {saved}\)"):
            train_cifar.main(argv)
    summary = train_cifar.main([*base, "--resume"])  # the same settings resume (nothing left)
    assert summary["epochs_completed"] == 1 and summary["finished"]


# --------------------------------------------------------------------------- data


def test_crop_flip_matches_per_sample_loop() -> None:
    x = torch.rand(6, 3, 8, 8)
    offsets, flips = data.augmentation_params(6, seed=3, epoch=1)
    out = data.crop_flip(x, offsets, flips)
    for i in range(6):
        top, left = offsets[i].tolist()
        want = F.pad(x[i], (4, 4, 4, 4))[:, top : top + 8, left : left + 8]
        torch.testing.assert_close(out[i], want.flip(-1) if flips[i] else want, rtol=0, atol=0)
    again = data.augmentation_params(6, seed=3, epoch=1)
    assert torch.equal(again[0], offsets) and torch.equal(again[1], flips)
    assert int(offsets.min()) >= 0 and int(offsets.max()) <= 8


def test_npz_dataset_formats(tmp_path: Path) -> None:
    grey = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    np.savez(tmp_path / "g.npz", x=grey.astype(np.uint8))
    images, labels = data.npz_dataset(str(tmp_path / "g.npz")).tensors
    assert images.shape == (2, 1, 28, 28) and images.dtype == torch.float32
    assert torch.equal(images[1, 0], torch.from_numpy(grey[1]).float() / 255)
    assert labels.tolist() == [-1, -1]  # unlabelled OOD set
    rgb, _ = data.npz_dataset(str(tmp_path / "g.npz"), size=32, rgb=True).tensors
    assert rgb.shape == (2, 3, 32, 32)
    assert torch.equal(rgb[:, 0], rgb[:, 2]) and 0 <= float(rgb.min()) <= float(rgb.max()) <= 1
    colour = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", x=colour, y=np.array([2, 0, 1]))
    images, labels = data.npz_dataset(str(tmp_path / "c.npz")).tensors
    assert torch.equal(images[2, 1], torch.from_numpy(colour[2, :, :, 1]).float() / 255)
    assert labels.dtype == torch.int64 and labels.tolist() == [2, 0, 1]


def test_load_npz_validation(tmp_path: Path) -> None:
    np.savez(tmp_path / "nox.npz", y=np.zeros(2))
    with pytest.raises(ValueError, match="must hold an array 'x'"):
        data.load_npz(str(tmp_path / "nox.npz"))
    np.savez(tmp_path / "float.npz", x=np.zeros((2, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"must be uint8 \(N, H, W\[, C\]\), got float64"):
        data.load_npz(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "y.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"must have shape \(2,\), got \(3,\)"):
        data.load_npz(str(tmp_path / "y.npz"))


def test_load_cifar_sources_and_errors(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path, n_train=12, n_test=4)
    images, labels = data.load_cifar("cifar10", str(folder), "test").tensors
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"`name` must be one of \('cifar10', 'cifar100'\)"):
        data.load_cifar("svhn", str(folder), "test")
    with pytest.raises(ValueError, match="`split` must be one of"):
        data.load_cifar("cifar10", str(folder), "val")
    with pytest.raises(FileNotFoundError, match=r"cifar100_train\.npz"):
        data.load_cifar("cifar100", str(folder), "train")


def test_image_folder_dataset(tmp_path: Path) -> None:
    from PIL import Image

    for cls, value in (("b", 10), ("a", 200)):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (5, 3), (value, 0, 0)).save(tmp_path / cls / "0.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    ds = data.ImageFolderDataset(str(tmp_path), transform=finetune_imagenet30._to_tensor)
    assert ds.classes == ["a", "b"] and len(ds) == 2
    image, label = ds[1]
    assert (
        label == 1 and image.shape == (3, 3, 5) and float(image[0, 0, 0]) == pytest.approx(10 / 255)
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ImageFolderDataset(str(tmp_path / "missing"), transform=finetune_imagenet30._to_tensor)


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("name", "classes", "params"),
    # Published sizes: CIFAR ResNet-18/34 (10 classes) and torchvision's ResNet-18 (1000 classes).
    [("resnet18", 10, 11_173_962), ("resnet34", 10, 21_282_122),
     ("local_resnet18", 1000, 11_689_512)],
)  # fmt: skip
def test_resnet_parameter_counts(name: str, classes: int, params: int) -> None:
    model = models.build_model(name, classes)
    assert sum(p.numel() for p in model.parameters()) == params


def test_madry_resnet_is_preact_wrn_34_1() -> None:
    model = models.build_model("madry_resnet", 10)
    convs = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert len(convs) == 1 + 3 * 5 * 2  # stem + 3 stages of 5 blocks with 2 convs: depth 34 - 3
    assert [b.conv1.out_channels for b in (model.block1[0], model.block2[0], model.block3[0])] == [
        16, 32, 64,
    ]  # fmt: skip
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_cifar_models_map_images_to_logits(name: str) -> None:
    logits = models.build_model(name, 7).eval()(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


def test_build_model_validation() -> None:
    with pytest.raises(ValueError, match=r"`name` must be one of .*got 'vgg'"):
        models.build_model("vgg", 10)
    with pytest.raises(ValueError, match="`num_classes` must be a positive int, got 0"):
        models.build_model("small_cnn", 0)


# --------------------------------------------------------------------------- plumbing


def test_csv_log_truncates_redone_epochs(tmp_path: Path) -> None:
    log = train_utils.CSVLog(str(tmp_path / "log.csv"), ["epoch", "v"])
    for epoch in (1, 2, 3):
        log.append({"epoch": epoch, "v": epoch * 10})
    log.truncate_after(1)
    log.append({"epoch": 2, "v": 99})
    assert list(csv.DictReader((tmp_path / "log.csv").open())) == [
        {"epoch": "1", "v": "10"}, {"epoch": "2", "v": "99"},
    ]  # fmt: skip


def test_rng_state_round_trip_through_weights_only_load(tmp_path: Path) -> None:
    import random

    state = train_utils.rng_state()
    train_utils.atomic_save({"rng": state}, str(tmp_path / "s.pt"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    train_utils.set_rng_state(_load(tmp_path / "s.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


# --------------------------------------------------------------------------- finetune


def _image_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("acorn", "airliner", "ambulance"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(40, 70, 2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(
                    root / split / cls / f"{i}.{'png' if i % 2 else 'jpg'}"
                )
    return root


FT = ["--arch", "local_resnet18", "--image-size", "48", "--batch-size", "4", *QUIET]


def test_finetune_gq_alone_recipe_says_it_goes_against_the_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _image_folder(tmp_path / "in30")
    torch.manual_seed(1)
    start = models.build_model("local_resnet18", 1000).state_dict()
    torch.save(start, tmp_path / "w.pt")
    # lr 0 and no weight decay: weights stay put, but train-mode BatchNorm statistics move --
    # all that the authors' constant-1 loss could do.
    summary = finetune_imagenet30.main(
        ["--data-root", str(root), "--weights", str(tmp_path / "w.pt"), "--recipe", "gq_alone_against_advice",
         "--num-sampled", "4", "--lam", "1",
         "--lr", "0", "--weight-decay", "0", "--out-dir", str(tmp_path / "out"), *FT]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "equals 1 for every input" in printed and "about 1000 backward passes" in printed
    assert "advises against it" in printed and "72 % to 5 %" in printed
    assert summary["steps"] == 3 and summary["num_classes"] == 1000
    assert summary["estimator"] == "sampled" and 0 < summary["train_gq"] < 1
    ckpt = _load(tmp_path / "out" / "model_final.pt")
    assert ckpt["class_map"] == [988, 404, 407] and ckpt["classes"] == [
        "acorn",
        "airliner",
        "ambulance",
    ]
    assert torch.equal(ckpt["model"]["layer2.0.conv1.weight"], start["layer2.0.conv1.weight"])
    assert not torch.equal(ckpt["model"]["bn1.running_mean"], start["bn1.running_mean"])
    assert int(ckpt["model"]["bn1.num_batches_tracked"]) == 3  # one forward per step


def test_finetune_ce_gq_recipe_new_head(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "in30")
    summary = finetune_imagenet30.main(
        ["--data-root", str(root), "--weights", "none", "--lam", "0.1", "--num-sampled", "2",
         "--max-steps", "2", "--out-dir", str(tmp_path / "out"), *FT]
    )  # fmt: skip
    ckpt = _load(tmp_path / "out" / "model_final.pt")
    assert ckpt["recipe"] == "ce_gq"  # the default: the GQ-alone recipe is opt-in
    assert ckpt["num_classes"] == 3 and ckpt["model"]["fc.weight"].shape == (3, 512)
    assert summary["steps"] == 2 and summary["estimator"] == "exact"  # K >= N - 1: exact
    assert math.isfinite(summary["train_loss"]) and 0 <= summary["test"]["acc"] <= 1


def test_finetune_class_map_must_cover_folders(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "in30")
    (tmp_path / "map.json").write_text(json.dumps({"acorn": 988, "airliner": 404}))
    with pytest.raises(ValueError, match=r"no ImageNet index for class folders \['ambulance'\]"):
        finetune_imagenet30.main(["--data-root", str(root), "--weights", "none", "--lam", "1",
                                  "--recipe", "gq_alone_against_advice", "--class-map",
                                  str(tmp_path / "map.json"), *FT])  # fmt: skip
    with pytest.raises(ValueError, match="--weights imagenet needs a tv_\\* arch"):
        finetune_imagenet30.main(
            ["--data-root", str(root), "--weights", "imagenet", "--lam", "1", *FT]
        )


# --------------------------------------------------------------------------- torchvision states


class _BrokenTorchvision(importlib.abc.MetaPathFinder):
    """Imports of torchvision fail as the registry's wheel does against a local CPU torch."""

    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name.split(".")[0] == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")


def _fake_torchvision() -> types.ModuleType:
    """A working torchvision as far as the examples use it: ImageFolder and two ResNets."""
    tv = types.ModuleType("torchvision")
    calls: list[str] = []
    tv.calls = calls  # type: ignore[attr-defined]

    def image_folder(root: str, transform: object) -> data.ImageFolderDataset:
        calls.append("ImageFolder")
        return data.ImageFolderDataset(root, transform)  # type: ignore[arg-type]

    def resnet(weights: object = None, num_classes: int = 1000) -> torch.nn.Module:
        calls.append(f"resnet(weights={weights})")
        return models.build_model("local_resnet18", num_classes)

    tv.datasets = types.SimpleNamespace(ImageFolder=image_folder)  # type: ignore[attr-defined]
    tv.models = types.SimpleNamespace(resnet18=resnet, resnet101=resnet)  # type: ignore[attr-defined]
    return tv


@pytest.fixture(params=["absent", "broken", "present"])
def torchvision_state(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The three environments users have: no torchvision, one that raises on import (built for
    another torch), a working one. CI also runs these tests with a real broken torchvision."""
    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
        monkeypatch.delitem(sys.modules, name)
    if request.param == "absent":
        monkeypatch.setitem(sys.modules, "torchvision", None)  # import raises ModuleNotFoundError
    elif request.param == "broken":
        monkeypatch.setattr(sys, "meta_path", [_BrokenTorchvision(), *sys.meta_path])
    else:
        monkeypatch.setitem(sys.modules, "torchvision", _fake_torchvision())
    return request.param


def test_torchvision_or_reason_names_each_state(torchvision_state: str) -> None:
    tv, why = train_utils.torchvision_or_reason()
    if torchvision_state == "present":
        assert tv is sys.modules["torchvision"] and why == ""
        return
    assert tv is None
    if torchvision_state == "absent":
        assert why == "is not installed"
    else:
        assert why.startswith(f"is installed but does not import against torch {torch.__version__}")
        assert "RuntimeError: operator torchvision::nms does not exist" in why
    with pytest.raises(
        ImportError,
        match=r"model 'tv_resnet18' needs torchvision, which is .*--arch local_resnet18",
    ):
        models.build_model("tv_resnet18", 10)
    with pytest.raises(FileNotFoundError, match=f"not found and torchvision {why[:20]}"):
        data.load_cifar("cifar10", "/nonexistent", "test")


def test_finetune_without_torchvision_runs_on_local_resnet18(
    tmp_path: Path, torchvision_state: str
) -> None:
    root = _image_folder(tmp_path / "in30")
    summary = finetune_imagenet30.main(
        ["--data-root", str(root), "--weights", "none", "--lam", "1", "--max-steps", "1",
         "--out-dir", str(tmp_path / "out"), *FT]
    )  # fmt: skip
    assert summary["steps"] == 1
    if torchvision_state == "present":  # torchvision's ImageFolder when it works
        assert sys.modules["torchvision"].calls == ["ImageFolder", "ImageFolder"]  # type: ignore[attr-defined]


def test_finetune_default_arch_names_what_is_missing_and_the_flags_that_avoid_it(
    tmp_path: Path, torchvision_state: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _image_folder(tmp_path / "in30")
    argv = ["--data-root", str(root), "--lam", "1", "--max-steps", "1",
            "--out-dir", str(tmp_path / "out"), *QUIET]  # fmt: skip
    if torchvision_state == "present":  # the defaults: torchvision's ResNet-18, ImageNet weights
        finetune_imagenet30.main([*argv, "--image-size", "48", "--batch-size", "4"])
        calls = sys.modules["torchvision"].calls  # type: ignore[attr-defined]
        assert "resnet(weights=IMAGENET1K_V1)" in calls
        return
    with pytest.raises(SystemExit):
        finetune_imagenet30.main(argv)
    err = capsys.readouterr().err
    assert "--arch tv_resnet18 needs torchvision, which is" in err
    assert "--arch local_resnet18 with --weights PATH" in err


# --------------------------------------------------------------------------- command lines


@pytest.mark.parametrize("script", ["train_cifar", "finetune_imagenet30", "evaluate_ood", "demo"])
def test_help_shows_each_default_once(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = __import__(script)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out.split("options:", 1)[1]
    entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", text) if e.strip()]
    twice = [e for e in entries if e.count("default") > 1]
    assert not twice, twice
    assert any("(default: " in e for e in entries)  # the defaults are still shown


def test_finetune_has_threads() -> None:
    argv = ["--data-root", "x", "--lam", "1", "--arch", "local_resnet18"]
    assert finetune_imagenet30.parse_args([*argv, "--threads", "2"]).threads == 2
    with pytest.raises(SystemExit):
        finetune_imagenet30.parse_args([*argv, "--threads", "0"])


def test_hf_trainer_help_works_without_transformers() -> None:
    # transformers blocked: `--help` prints, and a run names the extra that installs it.
    code = (
        "import runpy, sys; sys.modules['transformers'] = None; sys.argv[0] = 'hf_trainer.py'; "
        f"sys.path.insert(0, {str(EXAMPLES)!r}); "
        f"runpy.run_path({str(EXAMPLES / 'hf_trainer.py')!r}, run_name='__main__')"
    )
    for args, rc, stream, text in (
        (["--help"], 0, "stdout", "--smoke"),
        (["--smoke"], 2, "stderr", "needs transformers and accelerate: pip install -e '.[hf]'"),
    ):
        proc = subprocess.run([sys.executable, "-c", code, *args], env=_env(), capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert proc.returncode == rc, proc.stderr
        assert text in getattr(proc, stream)
