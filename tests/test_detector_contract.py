"""The detector protocol, once, for every detector (as torchvision's ``RoIOpTester``): each
test class names a detector of the one registry (`_detectors.CASES`, which builds it and computes
its scores without gq_loss) and inherits the suite: the settings and state contract
(`SettingsContract`, every detector), the protocol (`DetectorContract`: fit, score, calibrate,
predict over tensors, loaders, streams and dict batches) and, for the detectors of logits, a
callable ``output=`` in saved state (`OutputContract`)."""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import pytest
import torch
from _detectors import (
    CASES,
    DETECTORS,
    LABELLED,
    MAKERS,
    NaNFor,
    Stream,
    TupleOut,
    X,
    dict_loader,
    fitted,
    model_for,
    round_trip,
)
from _models import mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gq_loss import Detector, MahalanobisDetector, NotFittedError, ODINDetector
from gq_loss._persistence import scored_settings
from gq_loss.metrics import ood_metrics


def first(out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return out[0]


def doubled(out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return 2 * out[1]


class SettingsContract:
    """What every detector promises about its settings and saved state; a subclass sets
    ``name``, a key of `_detectors.CASES`."""

    name: str

    def test_scores_equal_the_oracle(self):
        """The registry's independent float64 scores (no gq_loss code): the suite below runs on
        detectors that compute what they claim."""
        torch.manual_seed(0)
        model = mlp()
        x = torch.randn(12, 3, 2, 2, dtype=torch.float64)
        got = CASES[self.name].make(model).score(x)
        want = CASES[self.name].oracle(model, x)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

    def test_assigning_a_setting_its_current_value_keeps_the_fitted_state(self):
        name = self.name
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

    def test_an_ood_label_that_is_a_class_is_refused(self):
        name = self.name
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
        with pytest.raises(
            ValueError, match=r"`ood_label`=4 is a class.*use a label outside \[0, 5\)"
        ):
            MAKERS[name](model_for(name), ood_label=4).calibrate(X)

    def test_state_dict_round_trip_scores_and_predicts_bit_for_bit(self):
        name = self.name
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
        for attribute in (
            "tuning_results_",
            "means_",
            "covariance_",
            "precision_",
            "class_counts_",
        ):
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

    def test_a_state_saved_with_other_settings_is_refused(self):
        name = self.name
        model = model_for(name)
        detector = fitted(name, model)
        state = round_trip(detector.state_dict())
        source = {"feature_fn", "layer"} if name == "feature_mahalanobis" else {"feature_fn"}
        assert set(DIFFERENT[name]) == set(scored_settings(type(detector))) - source
        for setting, value in DIFFERENT[name].items():
            other = MAKERS[name](model, **{setting: value})
            saved = state["settings"][setting]
            saved_text = (
                f"a callable {saved['callable']!r}" if isinstance(saved, dict) else repr(saved)
            )
            current = f"a callable {value.__qualname__!r}" if callable(value) else repr(value)
            message = (
                f"`state_dict` was saved with {setting}={saved_text}, but this "
                f"{type(detector).__name__} has {setting}={current}: "
            )
            with pytest.raises(ValueError, match=re.escape(message) + ".*checked, not restored"):
                other.load_state_dict(state)
            assert other.threshold_ is None  # nothing loaded


class DetectorContract(SettingsContract):
    """The protocol on `mlp`: fit, score, calibrate, predict, over every kind of data."""

    def test_every_detector_calibrates_and_predicts(self):
        name = self.name
        model = mlp()
        detector = DETECTORS[name](model)
        assert isinstance(detector, Detector)
        x = torch.randn(40, 3, 2, 2, dtype=torch.float64)
        with pytest.raises(NotFittedError, match=r"call calibrate\(id_data\) before predict\(\)"):
            detector.predict(x)
        assert detector.calibrate(x, tpr=0.75) is detector
        scores = detector.score(x)
        assert scores.shape == (40,) and scores.dtype == torch.float64
        assert torch.equal(detector(x), scores)
        assert torch.equal(detector.score((x, torch.arange(40))), scores)  # one labelled batch
        assert (scores >= detector.threshold_).sum() == 30  # ceil(0.75 * 40), scores distinct
        predicted = detector.predict(x)
        assert predicted.dtype == torch.long
        accepted = scores >= detector.threshold_
        assert torch.equal(predicted == -1, ~accepted)
        if name != "mahalanobis":  # the classifier's argmax
            with torch.no_grad():
                assert torch.equal(predicted[accepted], model(x).argmax(1)[accepted])
        loader = DataLoader(TensorDataset(x, torch.zeros(40)), batch_size=7)
        torch.testing.assert_close(detector.score(loader), scores, rtol=1e-12, atol=1e-12)
        assert torch.equal(detector.predict(loader), predicted)

    def test_nan_scores_are_never_accepted(self):
        name = self.name
        x = torch.randn(20, 3, 2, 2, dtype=torch.float64)
        # a model whose every output is NaN cannot be calibrated
        broken = NaNFor()
        with pytest.raises(
            ValueError, match=r"`id_data` must give finite scores to calibrate on, got"
        ):
            DETECTORS[name](nn.Sequential(broken, nn.Identity())).calibrate(x + 1000)
        # a clean model and one all-NaN image: NaN score, never a class
        model = mlp()
        detector = DETECTORS[name](model).calibrate(x, tpr=1.0)
        batch = x[:4].clone()
        batch[2] = float("nan")
        scores = detector.score(batch)
        assert torch.isnan(scores[2]) and torch.isfinite(scores[[0, 1, 3]]).all()
        predicted = detector.predict(batch)
        assert predicted[2] == -1 and (predicted[[0, 1, 3]] >= 0).all()
        with pytest.raises(ValueError, match=r"`id_scores` must be finite, got 1 NaN/inf"):
            ood_metrics(scores, scores[:2])

    def test_every_method_takes_an_iterable_without_a_length(self, monkeypatch):
        name = self.name
        x = torch.randn(23, 3, 2, 2, dtype=torch.float64)
        y = torch.arange(23) % 4
        stream = DataLoader(Stream(x, y), batch_size=5)
        with pytest.raises(TypeError):
            len(stream)  # the defect: DataLoader has __len__, and it raises
        detector = DETECTORS[name](mlp())
        if name == "mahalanobis":  # fit from the stream equals fit from the tensors
            detector.fit((x, y))
            streamed = MahalanobisDetector(detector.model, layer="1", ridge=1e-3).fit(stream)
            torch.testing.assert_close(streamed.means_, detector.means_, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(streamed.precision_, detector.precision_, rtol=1e-9, atol=0)
            detector = streamed
        expected = detector.score(x)
        torch.testing.assert_close(detector.score(stream), expected, rtol=1e-12, atol=1e-12)
        generator = (x[i : i + 4] for i in range(0, 23, 4))  # a generator: no length either
        torch.testing.assert_close(detector.score(generator), expected, rtol=1e-12, atol=1e-12)
        threshold = detector.calibrate(x, tpr=0.7).threshold_
        assert detector.calibrate(stream, tpr=0.7).threshold_ == pytest.approx(threshold, rel=1e-12)
        assert torch.equal(detector.predict(stream), detector.predict(x))
        if isinstance(detector, ODINDetector):
            ood = DataLoader(Stream(x + 3.0), batch_size=5)
            detector.tune(stream, ood, temperatures=(1.0, 10.0), epsilons=(0.0, 0.01))
            assert len(detector.tuning_results_) == 4
            detector.tune(stream, epsilons=(0.0, 0.01))
        totals = []  # the progress bar simply has no total
        if importlib.util.find_spec("tqdm") is not None:
            import tqdm

            original = tqdm.tqdm

            def spy(*args, **kwargs):
                totals.append(kwargs.get("total"))
                return original(*args, **kwargs)

            monkeypatch.setattr(tqdm, "tqdm", spy)
            detector.progress = True
            detector.score(stream)
            detector.score(x)
            assert totals == [None, 1]

    def test_dict_batches_are_read_at_input_key(self):
        """Detectors used to refuse them ("batches must be tensors, got dict"); they are read at
        ``input_key`` (default ``"pixel_values"``, Hugging Face's), and Mahalanobis fits from their
        ``"labels"``."""
        name = self.name
        from transformers import BatchFeature

        torch.manual_seed(0)
        model = mlp()
        x = torch.randn(30, 3, 2, 2, dtype=torch.float64)
        y = torch.arange(30) % 4
        detector = DETECTORS[name](model)
        want = detector.score(x)
        for data in (dict_loader(x, y), BatchFeature({"pixel_values": x, "labels": y})):
            torch.testing.assert_close(
                detector.score(data), want.to(torch.float64), rtol=0, atol=1e-12
            )
        threshold = detector.calibrate(x, tpr=0.8).threshold_
        assert detector.calibrate(dict_loader(x, y), tpr=0.8).threshold_ == pytest.approx(threshold)
        assert torch.equal(detector.predict(dict_loader(x, y)), detector.predict(x))
        detector.input_key = "image"  # keeps the threshold: it does not change scores
        assert detector.threshold_ is not None
        torch.testing.assert_close(
            detector.score(dict_loader(x, y, "image")), want, rtol=0, atol=1e-12
        )
        with pytest.raises(
            ValueError,
            match=r"`inputs` gave a dict batch without the key `input_key`='image', with keys "
            r"\['pixel_values', 'labels'\]; set `input_key=`",
        ):
            detector.score(dict_loader(x, y))
        with pytest.raises(TypeError, match=r"`input_key` must be a str \(a key of dict batches\)"):
            detector.input_key = 0
        if name == "mahalanobis":
            detector.input_key = "pixel_values"
            fitted = MahalanobisDetector(model, layer="1", ridge=1e-3)
            for data in (dict_loader(x, y), {"pixel_values": x, "label": y}):
                fitted.fit(data)
                torch.testing.assert_close(
                    fitted.means_,
                    MahalanobisDetector(model, layer="1", ridge=1e-3).fit((x, y)).means_,
                )
            with pytest.raises(
                ValueError,
                match=r"must hold the inputs at `input_key`='pixel_values' "
                r"and the labels at 'labels' or 'label', got keys \['pixel_values'\]",
            ):
                fitted.fit([{"pixel_values": x}])


class OutputContract:
    """Detectors of the model's logits: a callable ``output=`` is saved by its name."""

    name: str

    def test_a_state_saved_with_another_callable_output_is_refused(self):
        """A callable is saved by its name: a state calibrated with ``output=first`` does not load
        into a detector whose ``output`` is another function, whose scores differ."""
        name = self.name
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


class TestODINDetector(DetectorContract, OutputContract):
    name = "odin"


class TestMSPDetector(DetectorContract, OutputContract):
    name = "msp"


class TestEnergyDetector(DetectorContract, OutputContract):
    name = "energy"


class TestMahalanobisDetector(DetectorContract):
    name = "mahalanobis"


class TestFeatureMahalanobisDetector(SettingsContract):
    name = "feature_mahalanobis"


def test_every_registered_detector_has_a_contract_class():
    def leaves(cls: type) -> list[type]:
        subs = cls.__subclasses__()
        return [c for s in subs for c in leaves(s)] if subs else [cls]

    assert {c.name for c in leaves(SettingsContract)} == set(CASES)
    assert {c.name for c in leaves(DetectorContract)} == set(DETECTORS)


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
