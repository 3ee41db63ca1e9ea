"""Baseline OOD scores against direct float64 formulas and a plain numpy Mahalanobis."""

from __future__ import annotations

import math

import pytest
import torch

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


# --------------------------------------------------------------------------- validation
