"""A detector's state: what a setting assignment keeps or drops, the label of rejected inputs, and
the calibration saved without the model (`state_dict` / `load_state_dict`)."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
import torch
from torch import nn

from gq_loss import (
    Detector,
    EnergyDetector,
    MahalanobisDetector,
    MSPDetector,
    NotFittedError,
    ODINDetector,
)
from gq_loss._persistence import scored_settings


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).double()


LABELLED = (torch.randn(80, 3, 2, 2, dtype=torch.float64), torch.arange(80) % 4)
X = torch.randn(30, 3, 2, 2, dtype=torch.float64)

# every detector with a non-default value of each setting that changes scores
MAKERS = {
    "odin": lambda m, **kw: ODINDetector(
        m,
        **{
            "temperature": 3.0,
            "epsilon": 0.02,
            "input_std": (0.5, 0.25, 2.0),
            "sign_of_zero": 1,
            "clamp": (-2.0, (2.0, 3.0, 4.0)),
            "output": 0,
            **kw,
        },
    ),
    "msp": lambda m, **kw: MSPDetector(m, **{"temperature": 2.0, **kw}),
    "energy": lambda m, **kw: EnergyDetector(m, **{"temperature": 0.5, "output": 0, **kw}),
    "mahalanobis": lambda m, **kw: MahalanobisDetector(
        m, **{"layer": "1", "ridge": 1e-3, "num_classes": 4, **kw}
    ),
    "feature_mahalanobis": lambda m, **kw: MahalanobisDetector(
        m, **{"feature_fn": lambda t: t.flatten(1), "ridge": 1e-3, **kw}
    ),
}


class TupleOut(nn.Module):
    """``mlp`` returning ``(logits, logits)``, for the detectors that name ``output=0``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return out, out


def model_for(name: str) -> nn.Module:
    return TupleOut() if name in ("odin", "energy") else mlp()


def fitted(name: str, model: nn.Module, **settings: Any) -> Detector:
    detector = MAKERS[name](model, **settings)
    return detector.fit(LABELLED).calibrate(X, tpr=0.8)


# --------------------------------------------------------------------------- same value


@pytest.mark.parametrize("name", list(MAKERS))
def test_assigning_a_setting_its_current_value_keeps_the_fitted_state(name):
    detector = fitted(name, model_for(name))
    threshold = detector.threshold_
    means = getattr(detector, "means_", None)
    for setting in ["model", *scored_settings(type(detector))]:
        setattr(detector, setting, getattr(detector, setting))
        assert detector.threshold_ == threshold, setting
        assert getattr(detector, "means_", None) is means, setting
    if name == "odin":  # an equal value of another type, as it is checked: kept as well
        detector.input_std = [0.5, 0.25, 2.0]
        detector.clamp = [-2, [2, 3, 4]]
        detector.temperature = 3  # int: checked to 3.0
        assert detector.threshold_ == threshold
    detector.fit(LABELLED)  # a new fit (Mahalanobis) still drops the threshold
    assert (detector.threshold_ is None) == name.endswith("mahalanobis")


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


@pytest.mark.parametrize("name", list(MAKERS))
def test_an_ood_label_that_is_a_class_is_refused(name):
    message = r"`ood_label`=0 is a class of this model \(classes 0 to [34]\)"
    detector = fitted(name, model_for(name))  # 5 logits; Mahalanobis: 4 classes
    classes = 4 if name.endswith("mahalanobis") else 5
    threshold = detector.threshold_
    detector.threshold_ = float("inf")  # rejects every input
    for label in (-1, classes, 100):
        detector.ood_label = label
        assert (detector.predict(X) == label).all()
    detector.threshold_ = threshold
    if name.endswith("mahalanobis"):  # the number of classes is known: refused on assignment
        with pytest.raises(ValueError, match=message):
            detector.ood_label = 0
        with pytest.raises(ValueError, match=message):
            MAKERS[name](mlp(), ood_label=0).fit(LABELLED)
        if name == "mahalanobis":  # num_classes=4
            with pytest.raises(ValueError, match=message):
                MAKERS[name](mlp(), ood_label=0)
        return
    detector.ood_label = 0  # the classes are known from the logits only
    with pytest.raises(ValueError, match=message):
        detector.predict(X)
    with pytest.raises(ValueError, match=message):
        detector.calibrate(X)
    with pytest.raises(ValueError, match=r"`ood_label`=4 is a class.*use a label outside \[0, 5\)"):
        MAKERS[name](model_for(name), ood_label=4).calibrate(X)


# --------------------------------------------------------------------------- save and load


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_dict_round_trip_scores_and_predicts_bit_for_bit(name):
    torch.manual_seed(0)
    model = model_for(name)
    detector = fitted(name, model)
    if name == "odin":
        detector.tune(X, -X, temperatures=(3.0,), epsilons=(0.0, 0.02))
        detector.epsilon = 0.02  # the grid's axis: the tuning results stay
        detector.calibrate(X, tpr=0.8)
        assert len(detector.tuning_results_) == 2
    state = round_trip(detector.state_dict())
    assert state["detector"] == type(detector).__name__ and state["version"] == 1

    settings: dict[str, Any] = {}
    if name == "feature_mahalanobis":  # a callable is not saved: the same function is passed
        settings["feature_fn"] = detector.feature_fn
    fresh = MAKERS[name](model, ood_label=7, batch_size=4, **settings)  # these may differ
    with pytest.raises(NotFittedError):
        fresh.predict(X)
    assert fresh.load_state_dict(state) is fresh
    assert fresh.threshold_ == detector.threshold_
    for attribute in ("tuning_results_", "means_", "covariance_", "precision_", "class_counts_"):
        if hasattr(detector, attribute):
            value = getattr(fresh, attribute)
            want = getattr(detector, attribute)
            assert torch.equal(value, want) if isinstance(want, torch.Tensor) else value == want
    probe = torch.cat([X, 3 * torch.randn_like(X)])
    assert torch.equal(fresh.score(probe), detector.score(probe))
    detector.ood_label = 7
    assert torch.equal(fresh.predict(probe), detector.predict(probe))
    # the saved tensors are copies: changing the source does not change the loaded detector
    if name.endswith("mahalanobis"):
        state["means_"].add_(1.0)
        assert not torch.equal(fresh.means_, state["means_"])


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
DIFFERENT = {
    "odin": {
        "temperature": 1000.0,
        "epsilon": 0.0,
        "input_std": None,
        "sign_of_zero": 0,
        "clamp": None,
        "output": lambda out: out[0],
    },
    "msp": {"temperature": 1.0, "output": "logits"},
    "energy": {"temperature": 1.0, "output": 1},
    "mahalanobis": {"layer": "2", "ridge": 0.0, "num_classes": None, "output": 0},
    "feature_mahalanobis": {"ridge": 1.0, "num_classes": 4, "output": lambda out: out},
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_state_saved_with_other_settings_is_refused(name):
    model = model_for(name)
    detector = fitted(name, model)
    state = round_trip(detector.state_dict())
    source = {"feature_fn", "layer"} if name == "feature_mahalanobis" else {"feature_fn"}
    assert set(DIFFERENT[name]) == set(scored_settings(type(detector))) - source
    for setting, value in DIFFERENT[name].items():
        other = MAKERS[name](model, **{setting: value})
        saved = state["settings"][setting]
        saved_text = f"a callable {saved['callable']!r}" if isinstance(saved, dict) else repr(saved)
        current = f"a callable {value.__qualname__!r}" if callable(value) else repr(value)
        message = (
            f"`state_dict` was saved with {setting}={saved_text}, but this "
            f"{type(detector).__name__} has {setting}={current}: "
        )
        with pytest.raises(ValueError, match=re.escape(message) + ".*checked, not restored"):
            other.load_state_dict(state)
        assert other.threshold_ is None  # nothing loaded


def first(out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return out[0]


def doubled(out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return 2 * out[1]


@pytest.mark.parametrize("name", ["odin", "msp", "energy"])
def test_a_state_saved_with_another_callable_output_is_refused(name):
    """A callable is saved by its name: a state calibrated with ``output=first`` does not load
    into a detector whose ``output`` is another function, whose scores differ."""
    detector = MAKERS[name](TupleOut(), output=first).calibrate(X, tpr=0.8)
    state = round_trip(detector.state_dict())
    other = MAKERS[name](detector.model, output=doubled)
    assert not torch.equal(other.score(X), detector.score(X))
    with pytest.raises(
        ValueError,
        match=r"saved with output=a callable 'first', but .* output=a callable 'doubled'",
    ):
        other.load_state_dict(state)
    assert other.threshold_ is None
    same = MAKERS[name](detector.model, output=first).load_state_dict(state)
    assert same.threshold_ == detector.threshold_


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
