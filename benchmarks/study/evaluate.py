"""Accuracy on the test split and OOD detection metrics (ODIN, MSP, energy) per OOD set."""

from __future__ import annotations

from typing import Any

from evaluation import logits_in_batches, score_methods
from torch import nn

from gq_loss import ODINDetector
from gq_loss.metrics import ood_metrics

from .datasets import StudyData

DETECTION_METHODS = ("ODIN", "MSP", "energy")
T_ODIN, EPS_ODIN = 1000.0, 0.001
# the tuning grid (a subset of ODINDetector's own, to bound the cost per run)
TUNE_T = (1.0, 10.0, 100.0, 1000.0)
TUNE_EPS = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)


def evaluate(
    model: nn.Module, data: StudyData, id_size: int, batch_size: int = 500
) -> dict[str, Any]:
    """Accuracy on every test image and, per OOD set and method, AUROC / FPR95 / AUPR (fractions)
    against the first ``id_size`` test images."""
    model.eval()
    acc = float((logits_in_batches(model, data.test[0]).argmax(1) == data.test[1]).float().mean())
    kw = dict(
        methods=DETECTION_METHODS, temperature=T_ODIN, epsilon=EPS_ODIN, batch_size=batch_size
    )
    id_scores = score_methods(model, data.test[0][:id_size], **kw)
    ood: dict[str, dict[str, dict[str, float]]] = {}
    for name, x in data.ood.items():
        scores = score_methods(model, x, **kw)
        ood[name] = {m: ood_metrics(id_scores[m], scores[m]) for m in DETECTION_METHODS}
    out: dict[str, Any] = {"accuracy": acc, "ood": ood}
    if data.validation is not None:
        out["odin_tuned"] = tuned_odin(model, data, id_size, batch_size)
    return out


def tuned_odin(model: nn.Module, data: StudyData, id_size: int, batch_size: int) -> dict[str, Any]:
    """ODIN with ``(T, eps)`` tuned as the ODIN paper tunes them (lowest FPR at 95 % TPR) on the
    validation pair of ``data``, then scored on the test sets with the same protocol for every
    arm: no arm is tuned on its own test sets."""
    assert data.validation is not None
    detector = ODINDetector(model, batch_size=batch_size)
    detector.tune(*data.validation, temperatures=TUNE_T, epsilons=TUNE_EPS, criterion="fpr95")
    id_scores = detector.score(data.test[0][:id_size])
    ood = {name: ood_metrics(id_scores, detector.score(x)) for name, x in data.ood.items()}
    return {"temperature": detector.temperature, "epsilon": detector.epsilon, "ood": ood}


def quick_probe(model: nn.Module, data: StudyData, n: int = 300) -> dict[str, float]:
    """ID accuracy and ODIN AUROC per real-image OOD set on ``n`` images each: how detection
    evolves during pre-training (does a longer schedule help?)."""
    kw = dict(methods=("ODIN",), temperature=T_ODIN, epsilon=EPS_ODIN)
    id_scores, logits = score_methods(model, data.test[0][:n], return_logits=True, **kw)
    out = {"probe_acc": float((logits.argmax(1) == data.test[1][:n]).float().mean())}
    for name in data.real_sets:
        ood = score_methods(model, data.ood[name][:n], **kw)
        out[f"probe_auroc_{name}"] = ood_metrics(id_scores["ODIN"], ood["ODIN"])["auroc"]
    return out


def test_accuracy(model: nn.Module, data: StudyData) -> float:
    model.eval()
    return float((logits_in_batches(model, data.test[0]).argmax(1) == data.test[1]).float().mean())
