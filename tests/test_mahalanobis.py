"""MahalanobisDetector: its statistics against numpy, its features (layer capture, feature_fn,
output=), its fit over batches and its errors; and its two helpers, the streaming class-Gaussian
estimator (`gq_loss._gaussians`) and the thread-filtered layer capture (`gq_loss._capture`),
each on its own."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch
from _detectors import LABELLED
from _detectors import maha_ref as _maha_ref
from _models import mlp
from _threads import ROLE, InTurn, Release, run_threads
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gq_loss import MahalanobisDetector, NotFittedError
from gq_loss.scores import energy_score, msp_score


def _blobs(n: int = 60, dim: int = 4, classes: int = 3) -> tuple[Tensor, Tensor]:
    y = torch.arange(n) % classes
    x = torch.randn(n, dim, dtype=torch.float64) + 3.0 * torch.randn(classes, dim)[y].double()
    return x, y


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_mahalanobis_is_minus_2n_times_the_scatter_form() -> None:
    """The conventions table: pytorch-ood's ``Mahalanobis(encoder, eps)`` scores features (B, D)
    as ``½ min_c dᵀ (S + eps·I)⁻¹ d`` with the scatter ``S`` (not divided by n), higher = more
    OOD; ours is ``−2n`` times that at ``ridge = eps / n``. The right side is that formula, in
    numpy, not their code."""
    x, y = _blobs(n=90, dim=5)
    n, eps = x.shape[0], 1e-6
    ours = MahalanobisDetector(feature_fn=lambda t: t, ridge=eps / n).fit((x, y))
    x_test = torch.randn(12, 5, dtype=torch.float64) * 3.0
    feats, labels = x.numpy(), y.numpy()
    means = np.stack([feats[labels == c].mean(0) for c in range(3)])
    scatter = sum(
        (feats[labels == c] - means[c]).T @ (feats[labels == c] - means[c]) for c in range(3)
    )
    precision = np.linalg.inv(scatter + eps * np.eye(5))
    d = x_test.numpy()[:, None, :] - means[None]  # (B, C, D)
    theirs = 0.5 * np.einsum("bcd,de,bce->bc", d, precision, d).min(1)
    np.testing.assert_allclose(ours.score(x_test).numpy(), -2 * n * theirs, rtol=1e-9)


@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_mahalanobis_feature_fn_matches_numpy(ridge: float) -> None:
    model = _mlp()
    x, y = _blobs()
    x_test = torch.randn(15, 4, dtype=torch.float64) * 3.0

    def body(t: Tensor) -> Tensor:
        return model[1](model[0](t))

    # uneven batches exercise the streaming mean/scatter merge
    batches = [(x[:7], y[:7]), (x[7:8], y[7:8]), (x[8:40], y[8:40]), (x[40:], y[40:])]
    maha = MahalanobisDetector(feature_fn=body, ridge=ridge).fit(batches)
    with torch.no_grad():
        feats, feats_test = body(x).numpy(), body(x_test).numpy()
    means, cov, want = _maha_ref(feats, y.numpy(), feats_test, ridge)
    assert maha.means_ is not None and maha.covariance_ is not None
    np.testing.assert_allclose(maha.means_.numpy(), means, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(maha.covariance_.numpy(), cov, rtol=1e-10, atol=1e-13)
    got = maha.score(x_test)
    assert got.shape == (15,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)
    assert maha.class_counts_ is not None and maha.class_counts_.tolist() == [20, 20, 20]
    # same fit from one (inputs, labels) tuple and from a DataLoader
    one = MahalanobisDetector(feature_fn=body, ridge=ridge).fit((x, y))
    loader = DataLoader(TensorDataset(x, y), batch_size=9)
    np.testing.assert_allclose(one.score(x_test).numpy(), want, rtol=1e-9, atol=1e-9)
    from_loader = MahalanobisDetector(feature_fn=body, ridge=ridge).fit(loader)
    np.testing.assert_allclose(from_loader(x_test).numpy(), want, rtol=1e-9, atol=1e-9)


def test_mahalanobis_singular_covariance_uses_pseudo_inverse() -> None:
    # 5 samples in 8 dimensions: covariance rank <= 3
    x = torch.randn(5, 8, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1])
    x_test = torch.randn(6, 8, dtype=torch.float64)
    got = MahalanobisDetector(feature_fn=lambda t: t).fit((x, y)).score(x_test)
    *_, want = _maha_ref(x.numpy(), y.numpy(), x_test.numpy())
    assert np.isfinite(got.numpy()).all()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-8, atol=1e-8)


def test_mahalanobis_labels_growing_across_batches() -> None:
    x, y = _blobs(n=30)
    order = torch.argsort(y, stable=True)  # first batches only see class 0
    x, y = x[order], y[order]
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 30, 4)]
    got = MahalanobisDetector(feature_fn=lambda t: t).fit(batches).score(x[:5])
    *_, want = _maha_ref(x.numpy(), y.numpy(), x[:5].numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Dropout(0.5))
        self.avgpool = nn.Identity()
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.avgpool(self.body(x).view(-1, 5, 1)).flatten(1))


def test_mahalanobis_layer_hook_matches_numpy_and_leaves_no_trace() -> None:
    net = _Net().double()
    with torch.no_grad():  # non-trivial running stats: eval-mode BN must use them
        net.body[1].running_mean.uniform_(-1, 1)
        net.body[1].running_var.uniform_(0.5, 2)
    net.train()
    net.body[1].eval()  # mixed modes must come back exactly
    modes = {name: m.training for name, m in net.named_modules()}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = _blobs()
    x_test = torch.randn(9, 4, dtype=torch.float64)

    maha = MahalanobisDetector(net, layer="avgpool").fit(DataLoader(TensorDataset(x, y), 16))
    got = maha.score(DataLoader(TensorDataset(x_test, torch.zeros(9, dtype=torch.long)), 4))

    assert {name: m.training for name, m in net.named_modules()} == modes
    assert all(not m._forward_hooks for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():  # eval mode: BN statistics untouched
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    net.eval()
    with torch.no_grad():
        feats, feats_test = net.body(x).numpy(), net.body(x_test).numpy()
    *_, want = _maha_ref(feats, y.numpy(), feats_test)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(maha.score(x_test), got, rtol=1e-12, atol=1e-12)


def test_mahalanobis_restores_mode_and_hook_when_forward_fails() -> None:
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feat = nn.Linear(2, 2)

        def forward(self, x: Tensor) -> Tensor:
            self.feat(x)
            raise RuntimeError("boom")

    net = Failing().train()
    with pytest.raises(RuntimeError, match="boom"):
        MahalanobisDetector(net, layer="feat").fit((torch.randn(3, 2), torch.tensor([0, 1, 0])))
    assert net.training and net.feat.training
    assert not net.feat._forward_hooks


def test_mahalanobis_validation_errors() -> None:
    net, x, y = _mlp(), *_blobs()
    ident = lambda t: t  # noqa: E731
    with pytest.raises(ValueError, match=r"pass exactly one of `feature_fn` or `layer`"):
        MahalanobisDetector(net)
    with pytest.raises(ValueError, match=r"pass exactly one of `feature_fn` or `layer`"):
        MahalanobisDetector(net, layer="0", feature_fn=ident)
    with pytest.raises(ValueError, match=r"`layer='0'` needs `model`, got model=None"):
        MahalanobisDetector(layer="0")
    with pytest.raises(ValueError, match=r"`layer` 'fc' is not a submodule of `model`"):
        MahalanobisDetector(net, layer="fc")
    with pytest.raises(TypeError, match=r"`layer` must be a submodule name \(str\) or None, got 0"):
        MahalanobisDetector(net, layer=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module or a callable"):
        MahalanobisDetector("net", feature_fn=ident)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`layer='0'` needs `model` to be a torch.nn.Module"):
        MahalanobisDetector(lambda t: net(t), layer="0")
    with pytest.raises(TypeError, match=r"`feature_fn` must be callable or None, got int"):
        MahalanobisDetector(feature_fn=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`ridge` must be finite and >= 0, got -0.1"):
        MahalanobisDetector(feature_fn=ident, ridge=-0.1)
    with pytest.raises(TypeError, match=r"`ridge` must be a real number, got bool True"):
        MahalanobisDetector(feature_fn=ident, ridge=True)
    with pytest.raises(ValueError, match=r"`num_classes` must be >= 1, got 0"):
        MahalanobisDetector(feature_fn=ident, num_classes=0)
    for bad in (2.0, True):
        with pytest.raises(TypeError, match=r"`num_classes` must be an int or None"):
            MahalanobisDetector(feature_fn=ident, num_classes=bad)  # type: ignore[arg-type]

    maha = MahalanobisDetector(feature_fn=ident)
    for method in (maha.score, maha.calibrate, maha.predict):
        with pytest.raises(NotFittedError, match=r"not fitted: call `fit\(id_train_data\)` first"):
            method(x)
    with pytest.raises(ValueError, match=r"classes \[1\] have none"):
        maha.fit((x[:4], torch.tensor([0, 2, 2, 0])))
    with pytest.raises(ValueError, match=r"classes \[3\] have none"):
        MahalanobisDetector(feature_fn=ident, num_classes=4).fit((x, y))
    with pytest.raises(ValueError, match=r"`labels` must be < num_classes=2, got 2"):
        MahalanobisDetector(feature_fn=ident, num_classes=2).fit((x, y))
    with pytest.raises(TypeError, match=r"`labels` must be an integer tensor \(B,\), got list"):
        maha.fit([(x, [0] * len(x))])
    with pytest.raises(TypeError, match=r"`labels` must be an integer tensor.*torch.float64"):
        maha.fit([(x, y.double())])
    with pytest.raises(ValueError, match=r"`labels` must have shape \(60,\), got \(59,\)"):
        maha.fit((x, y[1:]))
    # one (inputs, labels) pair whose labels are not int (B,): the labels are named, not the pair
    with pytest.raises(TypeError, match=r"`labels` must be an integer.*float32.*labels\.long\(\)"):
        maha.fit((x, y.float()))
    with pytest.raises(ValueError, match=r"must have shape \(60,\), got \(60, 1\).*squeeze"):
        maha.fit((x, y[:, None]))
    with pytest.raises(ValueError, match=r"`labels` must have shape \(60,\), got \(60, 1\)"):
        maha.fit([x, y[:, None]])  # a list works as the pair too
    with pytest.raises(ValueError, match=r"`labels` must be >= 0, got -1"):
        maha.fit((x[:2], torch.tensor([0, -1])))
    with pytest.raises(TypeError, match=r"`id_train_data` needs labels: pass \(inputs, labels\)"):
        maha.fit(x)
    with pytest.raises(TypeError, match=r"each batch of `id_train_data` must be \(inputs, label"):
        maha.fit([x])
    with pytest.raises(ValueError, match=r"`id_train_data` must contain at least one sample"):
        maha.fit([])
    with pytest.raises(ValueError, match=r"features changed size from 4 to 3"):
        maha.fit([(x[:5], y[:5]), (x[5:, :3], y[5:])])
    with pytest.raises(TypeError, match=r"`inputs` batches must be tensors, got ndarray"):
        maha.fit((x, y)).score(x.numpy())
    with pytest.raises(ValueError, match=r"features have size 3, but the score was fitted on 4"):
        maha.score(x[:, :3])
    with pytest.raises(ValueError, match=r"`inputs` yielded no samples"):
        maha.score([])

    for fn, msg in (
        (
            lambda t: t[:, 0],
            r"`feature_fn` must produce features \(B, D\) with B=60, got shape \(60,\)",
        ),
        (
            lambda t: t[1:],
            r"`feature_fn` must produce features \(B, D\) with B=60, got shape \(59, 4\)",
        ),
    ):
        with pytest.raises(ValueError, match=msg):
            MahalanobisDetector(feature_fn=fn).fit((x, y))
    with pytest.raises(TypeError, match=r"`feature_fn` must produce a Tensor, got tuple"):
        MahalanobisDetector(feature_fn=lambda t: (t,)).fit((x, y))  # type: ignore[arg-type,return-value]

    class TupleOut(nn.Module):
        def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
            return t, t

    tuple_net = nn.Sequential(TupleOut())
    with pytest.raises(TypeError, match=r"`layer` '0' must produce a Tensor, got tuple; name"):
        MahalanobisDetector(tuple_net, layer="0").fit((x, y))
    unused = nn.ModuleDict({"used": nn.Linear(4, 2), "unused": nn.Linear(4, 2)})
    unused.forward = lambda t: unused["used"](t)
    with pytest.raises(RuntimeError, match=r"`layer` 'unused' did not run in model\(inputs\)"):
        MahalanobisDetector(unused, layer="unused").fit((x.float(), y))
    assert not unused["unused"]._forward_hooks


@pytest.mark.cuda
def test_mahalanobis_and_logit_scores_on_cuda_match_cpu() -> None:
    net = _Net().double().eval()
    x, y = _blobs()
    cpu = MahalanobisDetector(net, layer="avgpool").fit((x, y)).score(x[:10])
    gpu_net = _Net().double().eval()
    gpu_net.load_state_dict(net.state_dict())
    gpu_net.cuda()
    # CPU batches are moved to the model's device; statistics live on the feature device
    gpu = MahalanobisDetector(gpu_net, layer="avgpool").fit((x, y)).score(x[:10])
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-9)
    logits = torch.randn(6, 4, dtype=torch.float64)
    for fn in (msp_score, energy_score):
        torch.testing.assert_close(fn(logits.cuda(), 2.0).cpu(), fn(logits, 2.0))


def test_mahalanobis_fit_refuses_non_finite_features_at_their_batch() -> None:
    """One NaN image used to be read with the rest of the data, and the fit then failed in the
    eigendecomposition with torch's ``_LinAlgError``, also with ``ridge > 0``."""
    x, y = _blobs()
    seen: list[int] = []

    def batches(bad: float):  # a generator: the batches after the bad one must not be read
        for i in range(0, 60, 10):
            seen.append(i)
            xb = x[i : i + 10].clone()
            if i == 20:
                xb[3] = bad
            yield xb, y[i : i + 10]

    for bad in (float("nan"), float("inf")):
        seen.clear()
        maha = MahalanobisDetector(nn.Sequential(nn.Linear(4, 6)), layer="0", ridge=0.1)
        with pytest.raises(
            ValueError,
            match=r"`id_train_data` batch 2 \(counting from 0\) gives non-finite features \(NaN "
            r"or inf\) for 1 of its 10 samples, first at position 3",
        ):
            maha.fit(batches(bad))
        assert seen == [0, 10, 20]  # refused where it appeared
        assert maha.means_ is None and maha.precision_ is None


def test_mahalanobis_predicts_the_nearest_class_mean():
    x = torch.tensor([[0.0, 0], [2, 0], [0, 2], [2, 2], [10, 10], [12, 10], [10, 12], [12, 12]])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    maha = MahalanobisDetector(feature_fn=lambda t: t, ood_label=9).fit((x, y))
    query = torch.tensor([[1.0, 1.0], [11.0, 11.0], [5.0, 5.0], [7.0, 7.0]])
    maha.threshold_ = -10.0
    assert maha.predict(query).tolist() == [0, 1, 9, 9]  # scores 0, 0, -32, -32
    maha.threshold_ = -40.0
    assert maha.predict(query).tolist() == [0, 1, 0, 1]


class ResidualBlock(nn.Module):
    """Linear -> BatchNorm -> (+= skip) -> ReLU(inplace) -> Linear: after the hooked BatchNorm
    the residual `+=` and the in-place ReLU overwrite its output, as in a torchvision ResNet."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.skip = nn.Linear(4, 6)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.fc(x))
        out += self.skip(x)
        return self.head(self.relu(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mahalanobis_hook_copies_the_layer_output_before_in_place_operations(dtype):
    torch.manual_seed(0)
    model = ResidualBlock().to(dtype)
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    model.train()
    x, y = torch.randn(40, 4, dtype=dtype), torch.arange(40) % 2
    with torch.no_grad():
        true = model.eval().bn(model.fc(x)).double()  # the layer's output itself
    model.train()
    assert true.min() < -1.0  # what the in-place ReLU would zero
    detector = MahalanobisDetector(model, layer="bn")
    torch.testing.assert_close(detector.features(x), true, rtol=0, atol=0)
    detector.fit((x, y))
    means = torch.stack([true[y == c].mean(0) for c in (0, 1)])
    torch.testing.assert_close(detector.means_, means, rtol=1e-12, atol=1e-12)
    assert all(m.training for m in model.modules())  # mode restored
    assert not model.bn._forward_hooks
    # in the working dtype: a float32 model's features are copied as float64
    assert detector.features(x).dtype == torch.float64


def test_mahalanobis_takes_what_the_others_take():
    x, y = LABELLED
    net = mlp()
    by_keyword = MahalanobisDetector(net, layer="1").fit(id_train_data=(x, y))
    # a plain callable, as the other detectors accept: no eval mode, no placement
    seen = []

    def spy(t: Tensor) -> Tensor:
        seen.append(t.dtype)
        return net(t)

    plain = MahalanobisDetector(spy, feature_fn=lambda t: net[1](net[0](t.double())))
    plain.fit((x.float(), y))
    torch.testing.assert_close(plain.means_, by_keyword.means_, rtol=1e-6, atol=1e-6)
    assert seen == []  # the model is not called with feature_fn
    with pytest.raises(TypeError, match=r"needs `model` to be a torch.nn.Module"):
        MahalanobisDetector(spy, layer="1")
    import gq_loss

    assert not hasattr(gq_loss, "MahalanobisScore")


def test_mahalanobis_output_names_the_features_in_the_layer_output():
    class Encoder(nn.Module):  # returns a tuple, like a Hugging Face encoder layer
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 6)

        def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
            h = self.fc(t.flatten(1))
            return h, h.sum(1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = Encoder()
            self.head = nn.Linear(6, 5)

        def forward(self, t: Tensor) -> Tensor:
            return self.head(self.encoder(t)[0])

    net = Net().double()
    x, y = LABELLED
    with pytest.raises(TypeError, match=r"`layer` 'encoder' must produce a Tensor, got tuple"):
        MahalanobisDetector(net, layer="encoder").fit((x, y))
    by_layer = MahalanobisDetector(net, layer="encoder", output=0).fit((x, y))
    by_fn = MahalanobisDetector(net, layer="encoder.fc").fit((x, y))
    assert torch.equal(by_layer.means_, by_fn.means_)
    assert "output=0" in repr(by_layer)


def test_mahalanobis_layer_records_only_its_own_thread():
    """Each thread's hook sits on the shared layer; all layers run while all hooks are placed,
    thread 0 first: a hook that recorded every forward would give every thread the features of
    the last one."""
    n = 4
    torch.manual_seed(0)
    gate = InTurn(n)
    model = nn.Sequential(nn.Linear(6, 8), gate, nn.Linear(8, 8), Release(gate), nn.Linear(8, 3))
    model = model.double()
    train = torch.randn(60, 6, dtype=torch.float64)
    detector = MahalanobisDetector(model, layer="2", ridge=1e-3).fit((train, torch.arange(60) % 3))
    inputs = [torch.randn(5, 6, dtype=torch.float64) for _ in range(n)]
    serial = [detector.score(x) for x in inputs]
    assert all(not torch.equal(serial[0], s) for s in serial[1:])  # distinct batches
    got: dict[int, Tensor] = {}

    def worker(i: int) -> Callable[[], None]:
        def work() -> None:
            ROLE.index = i
            got[i] = detector.score(inputs[i])

        return work

    run_threads([worker(i) for i in range(n)])
    for i in range(n):
        assert torch.equal(got[i], serial[i]), i
    assert not any(m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------- the helpers alone


def test_class_gaussians_match_numpy_on_the_concatenated_data() -> None:
    """The streaming estimator, batch by batch (uneven batches; classes first seen in later
    ones), equals numpy's means and ``np.cov`` of the within-class deviations of all the data."""
    from gq_loss._gaussians import ClassGaussians

    rng = np.random.default_rng(0)
    labels = np.concatenate([rng.integers(0, 2, 7), rng.integers(0, 4, 30), [4, 4, 0]])
    feats = rng.normal(size=(len(labels), 5)) * 3.0 + 10.0 * labels[:, None]  # far from 0
    stats = ClassGaussians()
    for lo, hi in ((0, 7), (7, 8), (8, 30), (30, len(labels))):
        stats.update(torch.from_numpy(feats[lo:hi]), torch.from_numpy(labels[lo:hi]))
    counts, means, covariance = stats.result()
    classes = np.arange(5)
    want_means = np.stack([feats[labels == c].mean(axis=0) for c in classes])
    deviations = feats - want_means[labels]
    assert counts.dtype == torch.int64 and counts.tolist() == np.bincount(labels).tolist()
    assert means.dtype == covariance.dtype == torch.float64
    np.testing.assert_allclose(means.numpy(), want_means, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(
        covariance.numpy(), np.cov(deviations.T, bias=True), rtol=1e-12, atol=1e-12
    )
    bounded = ClassGaussians(num_classes=3)
    with pytest.raises(ValueError, match=r"`labels` must be < num_classes=3, got 4"):
        bounded.update(torch.from_numpy(feats), torch.from_numpy(labels))
    bounded.update(torch.from_numpy(feats[:7]), torch.from_numpy(labels[:7]))
    with pytest.raises(ValueError, match=r"features changed size from 5 to 2"):
        bounded.update(torch.from_numpy(feats[:7, :2]), torch.from_numpy(labels[:7]))
    with pytest.raises(ValueError, match=r"classes \[2\] have none"):
        bounded.result()
    with pytest.raises(ValueError, match=r"must contain at least one sample, got none"):
        ClassGaussians().result()


def test_capture_records_only_the_calling_thread() -> None:
    """Another thread's forward of the hooked module, while the hook is placed, is not
    recorded; the caller's is, copied when the module returns; the hook is gone afterwards."""
    from gq_loss._capture import capture_output

    layer = nn.Linear(3, 2)
    net = nn.Sequential(layer, nn.ReLU(inplace=True))
    x = torch.randn(4, 3)
    with capture_output(layer, lambda out: out.clone()) as captured:
        other = threading.Thread(target=lambda: net(torch.randn(6, 3)))
        other.start()
        other.join()
        assert captured == []  # the other thread's forward ran, and was not recorded
        out = net(x)
        assert len(captured) == 1 and captured[0].shape == (4, 2)
    with torch.no_grad():
        torch.testing.assert_close(captured[0], layer(x))  # before the in-place ReLU
    assert (out >= 0).all() and (captured[0] < 0).any()
    assert not layer._forward_hooks
    with pytest.raises(RuntimeError, match="boom"), capture_output(layer, lambda out: out):
        raise RuntimeError("boom")
    assert not layer._forward_hooks  # removed on an error too
