"""The fast CIFAR recipe (examples/fast_cifar.py, ``train_cifar.py --recipe fast``) on generated
data: the whitening layer against numpy, the augmentation against a per-image loop, resuming,
and a smoke run of the script."""

from __future__ import annotations

import json
from pathlib import Path

import fast_cifar  # examples/ is on sys.path via tests/conftest.py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import train_cifar
from data import synthetic_dataset


def test_whitening_layer_whitens_the_patches() -> None:
    """The first 12 filters map the normalised 2x2 patches to uncorrelated unit-variance
    outputs (eigenvalue / (eigenvalue + eps) ~ 1); the other 12 are their negatives."""
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(64, 3, 8, 8, generator=gen)
    images = (0.6 * base + 0.4 * base.roll(1, dims=1)).clamp(0, 1)  # correlated channels
    model = fast_cifar.FastNet()
    fast_cifar.init_whitening(model, images, eps=0.0)
    x = ((images - model.mean) / model.std).double().numpy()
    # independent patch extraction: every 2x2 window in (c, dy, dx) order
    patches = np.stack([x[:, :, i : i + 2, j : j + 2].reshape(len(x), -1)
                        for i in range(7) for j in range(7)], 1).reshape(-1, 12)  # fmt: skip
    w = model.whiten.weight.detach().double().numpy()
    out = patches @ w[:12].reshape(12, 12).T
    np.testing.assert_allclose(out.T @ out / len(out), np.eye(12), atol=1e-5)
    np.testing.assert_array_equal(w[12:], -w[:12])
    conv = F.conv2d(torch.from_numpy(x), torch.from_numpy(w[:12]))  # the layer's own arithmetic
    np.testing.assert_allclose(conv.permute(0, 2, 3, 1).reshape(-1, 12).numpy(), out, atol=1e-9)


def test_augment_translates_and_flips_each_image() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(40, 3, 6, 6, generator=gen)
    flip = torch.rand(40, generator=gen) < 0.5
    out = fast_cifar.augment(x, torch.Generator().manual_seed(2), flip, pad=2)
    draws = torch.Generator().manual_seed(2)
    dx = torch.randint(0, 5, (40,), generator=draws)
    dy = torch.randint(0, 5, (40,), generator=draws)
    for k in range(40):
        img = x[k].flip(2) if flip[k] else x[k]
        padded = F.pad(img[None], (2, 2, 2, 2), mode="reflect")[0]
        expected = padded[:, dy[k] : dy[k] + 6, dx[k] : dx[k] + 6]
        torch.testing.assert_close(out[k], expected, rtol=0, atol=0)
    assert len({(int(a), int(b)) for a, b in zip(dx, dy, strict=True)}) > 5  # offsets vary


def _data(n: int = 192) -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic_dataset(n, 10, seed=3).tensors  # type: ignore[return-value]


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    x, y = _data(96)
    recipe = fast_cifar.FastRecipe(epochs=3, batch_size=48, whiten_bias_epochs=1)
    ref, ref_record = fast_cifar.train(x, y, recipe, seed=5, log=None)

    class Stop(Exception):
        pass

    def stop_after_two(model: torch.nn.Module, epoch: int) -> dict[str, float]:
        if epoch == 2:
            raise Stop
        return {}

    ckpt = str(tmp_path / "ckpt.pt")
    with pytest.raises(Stop):
        fast_cifar.train(x, y, recipe, seed=5, log=None, checkpoint=ckpt, eval_fn=stop_after_two)
    resumed, record = fast_cifar.train(x, y, recipe, seed=5, log=None, checkpoint=ckpt)
    assert record["resumed_at_epochs"] == [1]
    assert not Path(ckpt).exists()
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [r["train_loss"] for r in record["epochs"]] == [
        r["train_loss"] for r in ref_record["epochs"]
    ]


def test_training_learns_and_freezes_what_the_recipe_freezes() -> None:
    x, y = _data(128)
    model, record = fast_cifar.train(
        x, y, fast_cifar.FastRecipe(epochs=5, batch_size=32), seed=0, log=None
    )
    losses = [r["train_loss"] for r in record["epochs"]]
    assert losses[-1] < 0.75 * losses[0]
    xt, yt = synthetic_dataset(128, 10, seed=4).tensors
    assert fast_cifar.accuracy(model, xt, yt) > 0.3  # 10 classes: chance is 0.1
    assert not model.whiten.weight.requires_grad and not model.whiten.bias.requires_grad
    assert not model.training


def test_script_smoke_run(tmp_path: Path) -> None:
    summary = train_cifar.main(["--recipe", "fast", "--smoke", "--lam", "0.5", "--estimator",
                                "sampled", "--num-sampled", "1", "--out-dir", str(tmp_path),
                                "--no-progress", "--device", "cpu"])  # fmt: skip
    assert summary["recipe"] == "fast" and summary["train_images"] == 256
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["final_test_acc"] == summary["final_test_acc"]
    assert len(saved["epochs"]) == 2 and all(np.isfinite(r["train_loss"]) for r in saved["epochs"])
    ckpt = torch.load(tmp_path / "model_final.pt", weights_only=True)
    assert ckpt["arch"] == "fast_cnn"


def test_label_smoothing_is_for_the_fast_recipe_only(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        train_cifar.parse_args(["--smoke", "--lam", "0", "--label-smoothing", "0.2"])
    args = train_cifar.parse_args(["--recipe", "fast", "--lam", "0"])
    assert (args.epochs, args.batch_size, args.full_split, args.amp) == (10, 1024, True, True)
