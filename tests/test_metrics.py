"""OOD metrics against scikit-learn and brute-force references."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from gq_loss.metrics import (
    aupr,
    auroc,
    detection_error,
    fpr_at_tpr,
    ood_metrics,
    roc_curve,
)

# --------------------------------------------------------------------------- references


def _labelled(id_s: np.ndarray, ood_s: np.ndarray, positive: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores for scikit-learn with the positive class scoring higher."""
    is_id = np.r_[np.ones(id_s.size), np.zeros(ood_s.size)]
    y = is_id if positive == "id" else 1 - is_id
    s = np.concatenate([id_s, ood_s]).astype(np.float64)
    return y, (s if positive == "id" else -s)


def _sk_roc(id_s: np.ndarray, ood_s: np.ndarray, positive: str) -> tuple[np.ndarray, ...]:
    y, s = _labelled(id_s, ood_s, positive)
    return skm.roc_curve(y, s, drop_intermediate=False)


def _sk_fpr(id_s: np.ndarray, ood_s: np.ndarray, tpr: float, positive: str, rule: str) -> float:
    fpr, tpr_c, _ = _sk_roc(id_s, ood_s, positive)
    k = int(np.flatnonzero(tpr_c >= tpr)[0])
    if rule == "first" or tpr_c[k] == tpr:  # documented: at an exact hit take the first point
        return float(fpr[k])
    return float(np.interp(tpr, tpr_c, fpr))


def _sk_all(id_s: np.ndarray, ood_s: np.ndarray, tpr: float, positive: str, rule: str) -> dict:
    y, s = _labelled(id_s, ood_s, "id")
    return {
        "auroc": skm.roc_auc_score(y, s),
        "fpr": _sk_fpr(id_s, ood_s, tpr, positive, rule),
        "aupr_in": skm.average_precision_score(y, s),
        "aupr_out": skm.average_precision_score(1 - y, -s),
    }


def _brute_detection_error(id_s: np.ndarray, ood_s: np.ndarray) -> float:
    """Loop over every threshold; 'accept as ID' means score > t (t = -inf accepts all)."""
    best = 0.5  # accept nothing
    for t in [-np.inf, *np.unique(np.concatenate([id_s, ood_s]))]:
        tpr = np.mean(id_s > t)
        fpr = np.mean(ood_s > t)
        best = min(best, 0.5 * (1 - tpr) + 0.5 * fpr)
    return float(best)


def _check_all(id_s: np.ndarray, ood_s: np.ndarray, tpr: float, positive: str, rule: str) -> None:
    got = ood_metrics(id_s, ood_s, positive=positive, tpr=tpr, rule=rule)
    key = f"fpr{round(100 * tpr, 6):g}"
    assert list(got) == ["auroc", key, "aupr_in", "aupr_out", "detection_error"]
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in got.values())
    want = _sk_all(id_s, ood_s, tpr, positive, rule)
    assert got["auroc"] == pytest.approx(want["auroc"], abs=1e-12)
    assert got[key] == pytest.approx(want["fpr"], abs=1e-12)
    assert got["aupr_in"] == pytest.approx(want["aupr_in"], abs=1e-12)
    assert got["aupr_out"] == pytest.approx(want["aupr_out"], abs=1e-12)
    assert got["detection_error"] == pytest.approx(_brute_detection_error(id_s, ood_s), abs=1e-12)


# --------------------------------------------------------------------------- against sklearn

CASES = {
    "random": lambda r: (r.normal(1.0, 1.0, 300), r.normal(0.0, 1.0, 200)),
    "ties_int_0_3": lambda r: (r.integers(0, 4, 257).astype(float), r.integers(0, 4, 131) * 1.0),
    "large_20": lambda r: (r.normal(40.0, 15.0, 100), r.normal(25.0, 15.0, 90)),
    "large_1e4": lambda r: (r.normal(3e4, 2e4, 100), r.normal(2e4, 2e4, 80)),
    "large_ties": lambda r: (1e5 * r.integers(-2, 3, 60), 1e5 * r.integers(-3, 2, 40)),
    "tiny_1_1": lambda r: (np.array([0.3]), np.array([0.7])),
    "tiny_all_tied": lambda r: (np.zeros(3), np.zeros(2)),
    "tiny_separated": lambda r: (np.array([5.0, 6.0]), np.array([1.0, 2.0, 3.0])),
    "tiny_mixed": lambda r: (np.array([2.0, 1.0, 1.0]), np.array([1.0, 0.0])),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("positive", ["id", "ood"])
@pytest.mark.parametrize("rule", ["first", "interpolate"])
@pytest.mark.parametrize("tpr", [0.95, 0.5, 0.8, 1.0])
def test_matches_sklearn(case: str, positive: str, rule: str, tpr: float) -> None:
    id_s, ood_s = CASES[case](np.random.default_rng(len(case)))
    _check_all(id_s, ood_s, tpr, positive, rule)


@pytest.mark.parametrize("positive", ["id", "ood"])
def test_roc_curve_matches_sklearn(positive: str) -> None:
    rng = np.random.default_rng(1)
    id_s, ood_s = rng.integers(0, 6, 50) * 1.5, rng.integers(0, 5, 40) * 1.5
    curve = roc_curve(id_s, ood_s, positive=positive)
    for t in curve:  # tensors, as every array the package returns; floats for scalars
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == "cpu"
    fpr, tpr, thr = (t.numpy() for t in curve)
    sk_fpr, sk_tpr, sk_thr = _sk_roc(id_s, ood_s, positive)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-15)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-15)
    # sklearn sees negated scores for "ood"; ours are in the caller's score space
    np.testing.assert_array_equal(thr[1:], sk_thr[1:] if positive == "id" else -sk_thr[1:])
    assert thr[0] == (np.inf if positive == "id" else -np.inf)


def test_building_blocks_match_ood_metrics() -> None:
    rng = np.random.default_rng(2)
    id_s, ood_s = rng.integers(0, 8, 99) * 1.0, rng.normal(3.0, 2.0, 77)
    for positive in ("id", "ood"):
        for rule in ("first", "interpolate"):
            m = ood_metrics(id_s, ood_s, positive=positive, tpr=0.9, rule=rule)
            assert m["fpr90"] == fpr_at_tpr(id_s, ood_s, tpr=0.9, positive=positive, rule=rule)
    m = ood_metrics(id_s, ood_s)
    assert m["auroc"] == auroc(id_s, ood_s)
    assert m["aupr_in"] == aupr(id_s, ood_s)
    assert m["aupr_out"] == aupr(id_s, ood_s, positive="ood")
    assert m["detection_error"] == detection_error(id_s, ood_s)


def test_known_values_by_hand() -> None:
    # 4 ID, 2 OOD. Accept score >= t: at t=2 three ID and one OOD are accepted.
    id_s, ood_s = [4.0, 3.0, 2.0, 1.0], [3.5, 0.5]
    assert fpr_at_tpr(id_s, ood_s, tpr=0.75) == 0.5
    # OOD positive: flag score <= t; both OOD flagged at t=3.5, which flags 3 of 4 ID
    assert fpr_at_tpr(id_s, ood_s, tpr=1.0, positive="ood") == 0.75
    assert fpr_at_tpr(id_s, ood_s, tpr=0.5, positive="ood") == 0.0
    # pairs ID > OOD: 4>3.5,4>.5,3>.5,2>.5,1>.5 = 5 of 8
    assert auroc(id_s, ood_s) == 5 / 8
    # target hits the horizontal run t=4 (tpr .25, fpr 0) -> t=3.5 (tpr .25, fpr .5): left end
    assert fpr_at_tpr(id_s, ood_s, tpr=0.25, rule="interpolate") == 0.0
    assert fpr_at_tpr(id_s, ood_s, tpr=0.25) == 0.0
    # ROC (0, 0) -> (fpr 0, tpr .5) -> (fpr 1, tpr 1): tpr .75 lies half way on the last segment
    assert fpr_at_tpr([2.0, 1.0], [1.0], tpr=0.75, rule="interpolate") == 0.5
    assert fpr_at_tpr([2.0, 1.0], [1.0], tpr=0.75) == 1.0


def test_accepts_tensors_arrays_and_lists_alike() -> None:
    id_t = torch.randn(50, dtype=torch.float32, requires_grad=True) + 1
    ood_t = torch.randn(40, dtype=torch.float16)
    expected = ood_metrics(id_t.detach().double().numpy(), ood_t.double().numpy())
    assert ood_metrics(id_t, ood_t) == expected
    assert ood_metrics(id_t.tolist(), ood_t.numpy()) == expected
    assert ood_metrics(np.arange(5), [True, False]) == ood_metrics(
        np.arange(5.0), np.array([1.0, 0.0])
    )


def test_no_sigmoid_squashing_of_large_scores() -> None:
    # a float32 sigmoid would map all of these to 1.0 and report AUROC 0.5
    id_s = np.array([1e4 + 3, 1e4 + 2, 2e4], dtype=np.float64)
    ood_s = np.array([1e4 + 1, 1e4], dtype=np.float64)
    assert auroc(id_s, ood_s) == 1.0
    assert ood_metrics(torch.tensor(id_s, dtype=torch.float32), ood_s)["fpr95"] == 0.0


def test_interpolate_never_exceeds_first() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        id_s, ood_s = rng.integers(0, 5, 30) * 1.0, rng.integers(0, 5, 20) * 1.0
        for tpr in (0.3, 0.9, 0.95):
            for positive in ("id", "ood"):
                first = fpr_at_tpr(id_s, ood_s, tpr=tpr, positive=positive)
                interp = fpr_at_tpr(id_s, ood_s, tpr=tpr, positive=positive, rule="interpolate")
                assert interp <= first


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
tied = st.integers(-3, 3).map(float)


@settings(max_examples=60, deadline=None)
@given(
    id_s=st.lists(st.one_of(finite, tied), min_size=1, max_size=25),
    ood_s=st.lists(st.one_of(finite, tied), min_size=1, max_size=25),
    tpr=st.floats(min_value=0.01, max_value=1.0),
    positive=st.sampled_from(["id", "ood"]),
    rule=st.sampled_from(["first", "interpolate"]),
)
def test_property_matches_sklearn(
    id_s: list[float], ood_s: list[float], tpr: float, positive: str, rule: str
) -> None:
    _check_all(np.array(id_s), np.array(ood_s), tpr, positive, rule)


@settings(max_examples=30, deadline=None)
@given(
    id_s=st.lists(tied, min_size=1, max_size=15),
    ood_s=st.lists(tied, min_size=1, max_size=15),
)
def test_property_symmetries(id_s: list[float], ood_s: list[float]) -> None:
    a, b = np.array(id_s), np.array(ood_s)
    # swapping roles and negating scores mirrors both conventions onto each other
    assert auroc(a, b) == pytest.approx(auroc(-b, -a), abs=1e-12)
    assert auroc(a, b) == pytest.approx(1.0 - auroc(b, a), abs=1e-12)
    assert aupr(a, b, positive="ood") == pytest.approx(aupr(-b, -a), abs=1e-12)
    assert fpr_at_tpr(a, b, tpr=0.9, positive="ood") == pytest.approx(fpr_at_tpr(-b, -a, tpr=0.9))
    assert detection_error(a, b) == pytest.approx(detection_error(-b, -a), abs=1e-12)


def test_million_scores_is_fast() -> None:
    rng = np.random.default_rng(4)
    id_s = rng.normal(1.0, 1.0, 500_000)
    ood_s = np.round(rng.normal(0.0, 1.0, 500_000), 3)  # many ties as well
    ood_metrics(id_s[:1000], ood_s[:1000])  # warm-up
    start = time.perf_counter()
    got = ood_metrics(id_s, ood_s)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"ood_metrics on 1e6 scores took {elapsed:.2f} s"  # ~0.2 s measured
    y, s = _labelled(id_s, ood_s, "id")
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


# --------------------------------------------------------------------------- validation


def test_validation_errors() -> None:
    good = [1.0, 2.0]
    with pytest.raises(ValueError, match=r"`id_scores` must not be empty"):
        ood_metrics([], good)
    with pytest.raises(ValueError, match=r"`ood_scores` must not be empty"):
        auroc(good, np.array([]))
    with pytest.raises(ValueError, match=r"`id_scores` must be 1-D, got shape \(2, 1\)"):
        ood_metrics(torch.ones(2, 1), good)
    with pytest.raises(ValueError, match=r"`ood_scores` must be 1-D, got shape \(\)"):
        aupr(good, 3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`id_scores` must be finite, got 1 NaN/inf"):
        fpr_at_tpr([1.0, float("nan")], good)
    with pytest.raises(ValueError, match=r"`ood_scores` must be finite, got 2 NaN/inf"):
        detection_error(good, torch.tensor([float("inf"), -float("inf"), 0.0]))
    with pytest.raises(ValueError, match=r"`ood_scores` must be finite"):
        roc_curve(good, [float("inf")])
    with pytest.raises(TypeError, match=r"`id_scores` must be a 1-D tensor, array or sequence"):
        ood_metrics(["a", "b"], good)
    with pytest.raises(TypeError, match=r"`ood_scores` must be a 1-D tensor, array or sequence"):
        ood_metrics(good, np.array([1 + 1j]))
    with pytest.raises(TypeError, match=r"`id_scores` must hold real numbers"):
        ood_metrics(torch.tensor([1 + 1j]), good)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"`tpr` must be in \(0, 1\]"):
            ood_metrics(good, good, tpr=bad)
        with pytest.raises(ValueError, match=r"`tpr` must be in \(0, 1\]"):
            fpr_at_tpr(good, good, tpr=bad)
    with pytest.raises(TypeError, match=r"`tpr` must be a real number"):
        fpr_at_tpr(good, good, tpr="0.95")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`tpr` must be a real number"):
        ood_metrics(good, good, tpr=True)
    for call in (
        lambda: ood_metrics(good, good, positive="in"),  # type: ignore[arg-type]
        lambda: fpr_at_tpr(good, good, positive="OOD"),  # type: ignore[arg-type]
        lambda: aupr(good, good, positive="out"),  # type: ignore[arg-type]
        lambda: roc_curve(good, good, positive=1),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match=r"`positive` must be one of \('id', 'ood'\), got"):
            call()
    with pytest.raises(ValueError, match=r"`rule` must be one of \('first', 'interpolate'\)"):
        fpr_at_tpr(good, good, rule="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`rule` must be one of \('first', 'interpolate'\)"):
        ood_metrics(good, good, rule="last")  # type: ignore[arg-type]


def test_one_vocabulary() -> None:
    """1.0: `rule=` and a keyword-only `tpr` in every metric; no old spelling survives."""
    good = [1.0, 2.0, 3.0]
    assert ood_metrics(good, [0.5], tpr=0.5, rule="interpolate")["fpr50"] == fpr_at_tpr(
        good, [0.5], tpr=0.5, rule="interpolate"
    )
    with pytest.raises(TypeError, match="fpr_rule"):
        ood_metrics(good, good, fpr_rule="first")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="positional"):
        fpr_at_tpr(good, good, 0.95)  # type: ignore[misc]


@pytest.mark.cuda
def test_cuda_tensors_are_accepted() -> None:
    id_s, ood_s = torch.randn(100, dtype=torch.float64) + 1, torch.randn(80, dtype=torch.float64)
    assert ood_metrics(id_s.cuda(), ood_s.cuda()) == ood_metrics(id_s, ood_s)
