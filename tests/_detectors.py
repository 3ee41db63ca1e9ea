"""The one registry of the detector tests: each detector as a `Case` that builds it for the
protocol suite (`make`), builds it with a non-default value of every setting that changes scores
(`make_varied`), and computes its scores independently (`oracle`, float64, no package code).

`tests/test_detector_contract.py` runs the protocol suite on every case (as torchvision's
``RoIOpTester``); the other detector test files read their detectors from `CASES`."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _models import mlp
from _plain_odin import plain_odin
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gq_loss import Detector, EnergyDetector, MahalanobisDetector, MSPDetector, ODINDetector
from gq_loss.mahalanobis import PINV_RTOL

LABELLED = (torch.randn(80, 3, 2, 2, dtype=torch.float64), torch.arange(80) % 4)
X = torch.randn(30, 3, 2, 2, dtype=torch.float64)


class TupleOut(nn.Module):
    """``mlp`` returning ``(logits, logits)``, for the detectors that name ``output=0``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(x)
        return out, out


def maha_ref(
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


def _logit_rows(model: nn.Module, x: Tensor) -> list[list[float]]:
    with torch.no_grad():
        return model.eval()(x.double()).tolist()


class Case:
    """One detector: its name, how the tests build it, and its oracle."""

    name: str
    #: In the protocol suite (fit, score, calibrate, predict on `mlp`); the feature-function
    #: Mahalanobis takes part in the settings and state tests only.
    protocol = True
    #: Its model for `make_varied` (``output=0`` needs a tuple).
    model_cls: Callable[[], nn.Module] = staticmethod(mlp)

    def make(self, model: Any) -> Detector:
        """The detector of the protocol suite (fitted where it needs a fit)."""
        raise NotImplementedError

    def make_varied(self, model: Any, **settings: Any) -> Detector:
        """The detector with a non-default value of each setting that changes scores."""
        raise NotImplementedError

    def oracle(self, model: nn.Module, x: Tensor) -> Tensor:
        """Scores of ``make(model)`` on ``x`` ``(B, 3, 2, 2)``, computed without gq_loss."""
        raise NotImplementedError


class ODINCase(Case):
    name = "odin"
    model_cls = TupleOut

    def make(self, model: Any) -> Detector:
        return ODINDetector(model, temperature=10.0, epsilon=0.01)

    def make_varied(self, model: Any, **settings: Any) -> Detector:
        return ODINDetector(
            model,
            **{
                "temperature": 3.0,
                "epsilon": 0.02,
                "input_std": (0.5, 0.25, 2.0),
                "sign_of_zero": 1,
                "clamp": (-2.0, (2.0, 3.0, 4.0)),
                "output": 0,
                **settings,
            },
        )

    def oracle(self, model: nn.Module, x: Tensor) -> Tensor:
        return plain_odin(model.eval(), x, temperature=10.0, epsilon=0.01)[0]


class MSPCase(Case):
    name = "msp"

    def make(self, model: Any) -> Detector:
        return MSPDetector(model, temperature=2.0)

    def make_varied(self, model: Any, **settings: Any) -> Detector:
        return MSPDetector(model, **{"temperature": 2.0, **settings})

    def oracle(self, model: nn.Module, x: Tensor) -> Tensor:
        rows = [[v / 2.0 for v in row] for row in _logit_rows(model, x)]
        scores = [math.exp(max(r)) / sum(math.exp(v) for v in r) for r in rows]
        return torch.tensor(scores, dtype=torch.float64)


class EnergyCase(Case):
    name = "energy"
    model_cls = TupleOut

    def make(self, model: Any) -> Detector:
        return EnergyDetector(model)

    def make_varied(self, model: Any, **settings: Any) -> Detector:
        return EnergyDetector(model, **{"temperature": 0.5, "output": 0, **settings})

    def oracle(self, model: nn.Module, x: Tensor) -> Tensor:
        rows = _logit_rows(model, x)
        scores = [max(r) + math.log(sum(math.exp(v - max(r)) for v in r)) for r in rows]
        return torch.tensor(scores, dtype=torch.float64)


class MahalanobisCase(Case):
    name = "mahalanobis"

    def make(self, model: Any) -> Detector:
        # Mahalanobis reads the output of layer "1" (the first Linear of `mlp`), fitted on data
        # drawn here, not on `LABELLED`: a test refits on that, which must change the scores
        self.train = (torch.randn(80, 3, 2, 2, dtype=torch.float64), torch.arange(80) % 4)
        return MahalanobisDetector(model, layer="1", ridge=1e-3).fit(self.train)

    def make_varied(self, model: Any, **settings: Any) -> Detector:
        return MahalanobisDetector(
            model, **{"layer": "1", "ridge": 1e-3, "num_classes": 4, **settings}
        )

    def oracle(self, model: nn.Module, x: Tensor) -> Tensor:
        def layer(t: Tensor) -> np.ndarray:
            with torch.no_grad():
                return model[1](t.flatten(1)).numpy()

        train, labels = self.train  # the data of the last `make`
        return torch.from_numpy(maha_ref(layer(train), labels.numpy(), layer(x), 1e-3)[2])


class FeatureMahalanobisCase(Case):
    """Mahalanobis on `feature_fn` (the model only sets mode and placement)."""

    name = "feature_mahalanobis"
    protocol = False

    def make(self, model: Any) -> Detector:
        return MahalanobisDetector(model, feature_fn=lambda t: t.flatten(1), ridge=1e-3).fit(
            LABELLED
        )

    def make_varied(self, model: Any, **settings: Any) -> Detector:
        return MahalanobisDetector(
            model, **{"feature_fn": lambda t: t.flatten(1), "ridge": 1e-3, **settings}
        )

    def oracle(self, model: nn.Module, x: Tensor) -> Tensor:
        train, labels = LABELLED
        flat = train.flatten(1).numpy()
        return torch.from_numpy(maha_ref(flat, labels.numpy(), x.flatten(1).numpy(), 1e-3)[2])


#: Every detector of the tests, by name.
CASES: dict[str, Case] = {
    case.name: case
    for case in (ODINCase(), MSPCase(), EnergyCase(), MahalanobisCase(), FeatureMahalanobisCase())
}
#: The detectors of the protocol suite, built by `Case.make`.
DETECTORS: dict[str, Callable[[Any], Detector]] = {
    name: case.make for name, case in CASES.items() if case.protocol
}
#: Every detector, built by `Case.make`.
ALL_DETECTORS: dict[str, Callable[[Any], Detector]] = {
    name: case.make for name, case in CASES.items()
}
#: Every detector with a non-default value of each setting that changes scores.
MAKERS: dict[str, Callable[..., Detector]] = {
    name: case.make_varied for name, case in CASES.items()
}


def model_for(name: str) -> nn.Module:
    """The model of `MAKERS[name]`."""
    return CASES[name].model_cls()


def fitted(name: str, model: nn.Module, **settings: Any) -> Detector:
    """`MAKERS[name]`, fitted on `LABELLED` and calibrated on `X`."""
    detector = MAKERS[name](model, **settings)
    return detector.fit(LABELLED).calibrate(X, tpr=0.8)


class NaNFor(nn.Module):
    """``mlp`` whose output is NaN (or ``value``) for the samples where ``x[:, 0, 0, 0] > 100``."""

    def __init__(self, value: float = float("nan")) -> None:
        super().__init__()
        self.net = mlp()
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        bad = (x[:, 0, 0, 0] > 100)[:, None]
        return torch.where(bad, torch.full_like(out, self.value), out)


class Stream(torch.utils.data.IterableDataset):
    """Samples one at a time, with no length (a streaming dataset)."""

    def __init__(self, *tensors: Tensor) -> None:
        self.tensors = tensors

    def __iter__(self):
        return iter(zip(*self.tensors, strict=True))


def dict_loader(x: Tensor, y: Tensor, key: str = "pixel_values") -> DataLoader:
    """A Hugging Face-style image `DataLoader`: batches ``{key: (B, ...), "labels": (B,)}``."""

    def collate(items: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        return {
            key: torch.stack([i[0] for i in items]),
            "labels": torch.stack([i[1] for i in items]),
        }

    return DataLoader(TensorDataset(x, y), batch_size=7, collate_fn=collate)


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded
