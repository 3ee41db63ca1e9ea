"""A detector's state: what a setting assignment keeps or drops, the label of rejected inputs, and
the calibration saved without the model (`state_dict` / `load_state_dict`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _detectors import MAKERS, X, fitted, model_for, round_trip
from _models import mlp

from gq_loss import (
    MSPDetector,
    NotFittedError,
    ODINDetector,
)
from gq_loss._persistence import scored_settings

# --------------------------------------------------------------------------- same value


def test_tuning_results_are_dropped_by_a_setting_that_changes_the_grid():
    model = mlp()
    grid = {"temperatures": (1.0, 10.0), "epsilons": (0.0, 0.01)}
    changes = {
        "model": mlp(),
        "input_std": 0.5,
        "sign_of_zero": 1,
        "clamp": (-1.0, 1.0),
        "output": lambda out: 2 * out,
    }
    for setting, value in changes.items():
        detector = ODINDetector(model).tune(X, -X, **grid)
        assert len(detector.tuning_results_) == 4
        detector.temperature, detector.epsilon = 10.0, 0.01  # the grid's axes: results kept
        assert len(detector.tuning_results_) == 4
        setattr(detector, setting, value)
        assert detector.tuning_results_ == [], setting


# --------------------------------------------------------------------------- ood_label


# --------------------------------------------------------------------------- save and load


def test_state_dict_holds_only_what_weights_only_loads():
    """Tensors, numbers, strings, None, lists and dicts: no model, no callable."""
    allowed = (torch.Tensor, int, float, str, type(None), list, tuple, dict)

    def check(value: Any) -> None:
        assert isinstance(value, allowed), type(value)
        if isinstance(value, dict):
            for key, item in value.items():
                assert isinstance(key, str)
                check(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                check(item)

    for name in MAKERS:
        state = fitted(name, model_for(name)).state_dict()
        check(state)
        assert set(state["settings"]) == set(scored_settings(type(MAKERS[name](mlp()))))
        assert "model" not in state["settings"] and "ood_label" not in state["settings"]
    callable_state = fitted("feature_mahalanobis", mlp()).state_dict()
    assert set(callable_state["settings"]["feature_fn"]) == {"callable"}  # its name only


# setting -> a different value, for each detector


def test_load_state_dict_refuses_what_it_cannot_load():
    state = round_trip(fitted("mahalanobis", mlp()).state_dict())
    with pytest.raises(
        ValueError, match=r"holds the state of a 'MahalanobisDetector'.*'MSPDetector'"
    ):
        MSPDetector(mlp()).load_state_dict({**state, "settings": {"temperature": 1.0}})
    target = MAKERS["mahalanobis"](mlp())
    with pytest.raises(TypeError, match=r"`state_dict` must be a dict from `state_dict\(\)`"):
        target.load_state_dict([("threshold_", 1.0)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"missing \['precision_'\], unexpected \['extra'\]"):
        target.load_state_dict(
            {**{k: v for k, v in state.items() if k != "precision_"}, "extra": 1}
        )
    with pytest.raises(
        ValueError, match=r"\(version 2\); this is a 'MahalanobisDetector' \(version 1"
    ):
        target.load_state_dict({**state, "version": 2})
    with pytest.raises(ValueError, match=r"`threshold_` must not be NaN"):
        target.load_state_dict({**state, "threshold_": float("nan")})
    with pytest.raises(ValueError, match=r"float64 \(C, D\), \(D, D\), \(D, D\) and int64 \(C,\)"):
        target.load_state_dict({**state, "precision_": state["precision_"][:2]})
    with pytest.raises(ValueError, match=r"holds an invalid `ridge`: `ridge` must be finite"):
        target.load_state_dict({**state, "settings": {**state["settings"], "ridge": -1.0}})
    for name in ("means_", "covariance_", "precision_"):  # predict would reject every input
        for bad in (float("nan"), float("inf")):
            broken = state[name].clone()
            broken[0, -1] = bad
            with pytest.raises(ValueError, match=rf"holds NaN or inf in \['{name}'\]"):
                target.load_state_dict({**state, name: broken})
    with pytest.raises(ValueError, match=r"`state_dict\['class_counts_'\]` must be >= 1"):
        target.load_state_dict({**state, "class_counts_": state["class_counts_"] * 0})
    assert target.threshold_ is None and target.means_ is None  # nothing loaded
    # a state saved before fit and calibrate loads as not fitted
    empty = MAKERS["mahalanobis"](mlp()).state_dict()
    assert target.load_state_dict(round_trip(empty)).means_ is None
    with pytest.raises(NotFittedError):
        target.score(X)
