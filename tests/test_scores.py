"""Baseline OOD scores against direct float64 formulas and a plain numpy Mahalanobis."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gq_loss import MahalanobisDetector, NotFittedError
from gq_loss.mahalanobis import PINV_RTOL
from gq_loss.scores import energy_score, msp_score

# --------------------------------------------------------------------------- MSP and energy


def _msp_ref(row: list[float], t: float) -> float:
    exps = [math.exp((v - max(row)) / t) for v in row]
    return max(exps) / math.fsum(exps)


def _energy_ref(row: list[float], t: float) -> float:
    m = max(row)
    return m + t * math.log(math.fsum(math.exp((v - m) / t) for v in row))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0, 1000.0])
def test_msp_and_energy_match_direct_formulas(temperature: float) -> None:
    logits = torch.randn(7, 5, dtype=torch.float64) * 20.0
    msp, energy = (
        msp_score(logits, temperature=temperature),
        energy_score(logits, temperature=temperature),
    )
    assert msp.shape == energy.shape == (7,)
    assert msp.dtype == energy.dtype == torch.float64
    rows = logits.tolist()
    want_msp = torch.tensor([_msp_ref(r, temperature) for r in rows], dtype=torch.float64)
    want_energy = torch.tensor([_energy_ref(r, temperature) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(msp, want_msp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(energy, want_energy, rtol=1e-12, atol=1e-12)


def test_scores_order_in_distribution_higher() -> None:
    confident, flat = [10.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    logits = torch.tensor([confident, flat])
    assert msp_score(logits)[0] > msp_score(logits)[1]
    assert energy_score(logits)[0] > energy_score(logits)[1]


def test_scores_are_float64_from_any_logits() -> None:
    logits = torch.randn(4, 3).half()
    for fn in (msp_score, energy_score):
        out = fn(logits, temperature=2.0)
        assert out.dtype == torch.float64
        # the same as from float64 logits
        assert torch.equal(out, fn(logits.double(), temperature=2.0))


def test_empty_batch() -> None:
    assert msp_score(torch.zeros(0, 3)).shape == (0,)
    assert energy_score(torch.zeros(0, 3)).shape == (0,)


@pytest.mark.parametrize("fn", [msp_score, energy_score])
def test_logit_score_validation(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match=r"`logits` must be a torch.Tensor \(B, N\), got list"):
        fn([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"`logits` must be .*shape \(B, N\).*got shape \(3,\)"):
        fn(torch.zeros(3))
    for n in (0, 1):  # one class: every softmax score would be 1
        with pytest.raises(ValueError, match=rf"`logits` must have N >= 2 classes, got N = {n}"):
            fn(torch.zeros(2, n))
    with pytest.raises(ValueError, match=r"`logits` must be floating-point.*dtype torch.int64"):
        fn(torch.zeros(2, 3, dtype=torch.long))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"`temperature` must be finite and > 0"):
            fn(torch.zeros(2, 3), temperature=bad)
    for bad_type in (True, "1.0", None):
        with pytest.raises(TypeError, match=r"`temperature` must be a real number"):
            fn(torch.zeros(2, 3), temperature=bad_type)


# --------------------------------------------------------------------------- Mahalanobis


def _maha_ref(
    train: np.ndarray, labels: np.ndarray, test: np.ndarray, ridge: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means, tied MLE covariance and scores, one class and one sample at a time."""
    classes = np.unique(labels)
    means = np.stack([train[labels == c].mean(axis=0) for c in classes])
    dim = train.shape[1]
    cov = np.zeros((dim, dim))
    for f, c in zip(train, labels, strict=True):
        d = f - means[c]
        cov += np.outer(d, d)
    cov /= len(train)
    ridged = cov + ridge * np.eye(dim)
    if np.linalg.matrix_rank(ridged) == dim:
        prec = np.linalg.inv(ridged)
    else:
        prec = np.linalg.pinv(ridged, PINV_RTOL, hermitian=True)  # rcond: numpy 1.x and 2.x
    scores = [-min((f - mu) @ prec @ (f - mu) for mu in means) for f in test]
    return means, cov, np.array(scores)


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


# --------------------------------------------------------------------------- validation


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
