r"""Baseline OOD scores on a trained classifier: MSP and energy, as functions on logits and as
detectors; [`MahalanobisDetector`][gq_loss.MahalanobisDetector] on features.

Every score follows the package convention **higher = more in-distribution**, so each can be
passed to [`ood_metrics`][gq_loss.metrics.ood_metrics] side by side with ODIN. The final softmax
and logsumexp are computed in **float64** from the logits (of any floating dtype), so scores
are float64: at large temperatures a float32 softmax rounds nearby scores onto one value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._detector import BatchResult, Detector
from ._runtime import Model, OutputSpec, check_logits, float64, logits_of
from ._settings import Setting
from ._validation import check_positive

__all__ = ["EnergyDetector", "MSPDetector", "energy_score", "msp_score"]


def _scaled(logits: Any, temperature: float) -> Tensor:
    """``logits / T`` in float64, after the checks of every logits input."""
    temperature = check_positive("temperature", temperature)
    if not isinstance(logits, Tensor):
        raise TypeError(f"`logits` must be a torch.Tensor (B, N), got {type(logits).__name__}")
    check_logits(logits, what="`logits`")
    return float64(logits) / temperature


def msp_score(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    r"""Maximum softmax probability (Hendrycks & Gimpel, 2017), optionally temperature-scaled.

    $$ s(x) = \max_j \operatorname{softmax}(f(x) / T)_j $$

    Args:
        logits: Classifier outputs ``(B, N)``, floating point, ``N >= 2``.
        temperature: ``T > 0``. Default: ``1.0``.

    Returns:
        Scores ``(B,)`` in ``[1/N, 1]``, float64; NaN where a row of logits holds NaN.

    Examples:
        >>> msp_score(torch.tensor([[2.0, 0.0], [0.0, 0.0]])).tolist()
        [0.8807970779778823, 0.5]
    """
    return torch.softmax(_scaled(logits, temperature), dim=1).amax(dim=1)


def energy_score(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    r"""Negative free energy (Liu et al., 2020): higher = more in-distribution.

    $$ s(x) = T \log \sum_j \exp\big(f_j(x) / T\big) $$

    Args:
        logits: Classifier outputs ``(B, N)``, floating point, ``N >= 2``.
        temperature: ``T > 0``. Default: ``1.0``.

    Returns:
        Scores ``(B,)``, unbounded, float64; NaN where a row of logits holds NaN.

    Examples:
        >>> energy_score(torch.tensor([[0.0, 0.0], [3.0, -50.0]]), temperature=1.0).tolist()
        [0.6931471805599453, 3.0]
    """
    temperature = check_positive("temperature", temperature)
    return temperature * torch.logsumexp(_scaled(logits, temperature), dim=1)


class _LogitDetector(Detector):
    """A score of the logits, as a [`Detector`][gq_loss.Detector]: one forward per batch."""

    _fn: Callable[..., Tensor]
    model: Setting[Model]
    temperature: Setting[float] = Setting(check_positive)

    def __init__(
        self,
        model: Model,
        *,
        temperature: float = 1.0,
        output: OutputSpec | None = None,
        ood_label: int = -1,
        batch_size: int | None = None,
        input_key: str = "pixel_values",
        progress: bool = False,
    ) -> None:
        super().__init__(
            model,
            output=output,
            ood_label=ood_label,
            batch_size=batch_size,
            input_key=input_key,
            progress=progress,
        )
        self.temperature = temperature

    def _score_batch(self, inputs: Tensor) -> BatchResult:
        with torch.no_grad():
            logits = logits_of(self.model, inputs, self.output)
        scores = type(self)._fn(logits, temperature=self.temperature)
        return scores, logits.argmax(dim=1), logits.shape[1]


class MSPDetector(_LogitDetector):
    r"""[`msp_score`][gq_loss.msp_score] of a model's logits as a [`Detector`][gq_loss.Detector].

    Args:
        model: An ``nn.Module`` or a callable mapping ``(B, ...)`` to logits ``(B, N)``,
            ``N >= 2`` (or to an output holding them, see ``output``). A module runs in eval
            mode under ``torch.no_grad()`` and inputs are moved to the device and cast to the
            floating dtype of its first floating parameter.
        temperature: ``T > 0`` of the softmax. Default: ``1.0``.
        output: Names the logits in the model's output, as for
            [`odin_score`][gq_loss.odin_score]. Default: ``None``.
        ood_label: Label `predict` returns for rejected inputs. Default: ``-1``.
        batch_size: Split tensor inputs into chunks of this many samples. Default: whole tensor.
        input_key: Key of the inputs in dict batches, as for [`Detector`][gq_loss.Detector].
            Default: ``"pixel_values"``.
        progress: Show a tqdm progress bar over batches (needs tqdm). Default: ``False``.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> detector = MSPDetector(model).calibrate(torch.randn(100, 3, 2, 2), tpr=0.95)
        >>> x = torch.randn(5, 3, 2, 2)
        >>> detector.score(x).shape, detector.predict(x).shape  # predict: class or -1
        (torch.Size([5]), torch.Size([5]))
    """

    _fn = staticmethod(msp_score)
    _desc = "MSP"


class EnergyDetector(_LogitDetector):
    r"""[`energy_score`][gq_loss.energy_score] of a model's logits as a
    [`Detector`][gq_loss.Detector].

    Args:
        model: As for [`MSPDetector`][gq_loss.MSPDetector].
        temperature: ``T > 0``. Default: ``1.0``.
        output: Names the logits in the model's output, as for
            [`odin_score`][gq_loss.odin_score]. Default: ``None``.
        ood_label: Label `predict` returns for rejected inputs. Default: ``-1``.
        batch_size: Split tensor inputs into chunks of this many samples. Default: whole tensor.
        input_key: Key of the inputs in dict batches, as for [`Detector`][gq_loss.Detector].
            Default: ``"pixel_values"``.
        progress: Show a tqdm progress bar over batches (needs tqdm). Default: ``False``.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> detector = EnergyDetector(model, temperature=1.0).calibrate(torch.randn(100, 12))
        >>> detector.predict(torch.randn(5, 12)).shape
        torch.Size([5])
    """

    _fn = staticmethod(energy_score)
    _desc = "energy"
