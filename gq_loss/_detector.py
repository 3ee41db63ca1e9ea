"""The detector protocol: `Detector` (score / fit / calibrate / predict, and the threshold
`calibrate` sets) and `NotFittedError`. Its settings are `_settings.Setting` descriptors, its
persistence is the `_persistence.Persistent` mixin, it reads data through `_batches` and runs
the model through `_runtime`, as scikit-learn's ``BaseEstimator`` takes its mixins."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor

from ._batches import batches, progress
from ._persistence import Persistent, check_threshold
from ._runtime import Model, OutputSpec, check_batch, check_model, eval_mode, float64
from ._settings import (
    Setting,
    check_bool,
    check_int,
    check_key,
    check_ood_label,
    check_output,
    settings_of,
)
from ._validation import check_fraction, check_optional_int

Data = Tensor | Iterable[Any]
D = TypeVar("D", bound="Detector")


class NotFittedError(ValueError, AttributeError):
    """A detector was used before the step that sets its state (`fit` or `calibrate`).

    Subclasses `ValueError` and `AttributeError`, as scikit-learn's `NotFittedError` does, so
    `except ValueError` catches it.

    Examples:
        >>> from gq_loss import MSPDetector
        >>> try:
        ...     MSPDetector(torch.nn.Linear(4, 3)).predict(torch.zeros(1, 4))
        ... except ValueError as err:
        ...     print(type(err).__name__)
        NotFittedError
    """


class Detector(Persistent):
    r"""The one protocol of every detector: `score`, `fit`, `calibrate`, `predict`.

    * `score(inputs)`: scores ``(B,)``, **higher = more in-distribution**, over a tensor
      ``(B, ...)`` or an iterable of batches (a `DataLoader`, with or without labels, with or
      without a length; dict batches are read at `input_key`).
    * `fit(id_train_data)`: estimates what the score needs from labelled in-distribution data
      (Mahalanobis); a no-op returning ``self`` for the others.
    * `calibrate(id_data, *, tpr)`: sets `threshold_` so that a share ``tpr`` of ``id_data`` is
      accepted.
    * `predict(inputs)`: the predicted class ``(B,)`` where ``score >= threshold_``, else
      ``ood_label``. An input whose score is not finite (NaN or inf: a NaN image, a model that
      overflowed) is never given a class: it gets ``ood_label``.
    * `state_dict()` / `load_state_dict(state)`: the calibration without the model, to save
      with ``torch.save`` and load with ``torch.load(..., weights_only=True)``.

    **Settings and fitted state.** Every constructor argument is a public attribute, validated
    when it is assigned as at construction and shown in ``repr``. Assigning a setting that
    changes scores (the model, ``output``, ``temperature``, ...) a new value drops the fitted
    state: the threshold, and for a detector with a `fit` its statistics, so `predict` raises
    [`NotFittedError`][gq_loss.NotFittedError] until the next `calibrate` (and `fit`); a second
    `fit` also drops the threshold. Assigning a setting the value it already has keeps
    everything. ``ood_label``, ``batch_size``, ``input_key`` and ``progress`` do not change scores and keep
    it. Fitted state follows scikit-learn's convention: its names end in ``_`` and are ``None``
    before the step that sets them. Changes made *inside* the model (training it further)
    cannot be seen: calibrate again after them.

    **Threads.** One detector (and one model) may score from several threads at once: each
    call gives the result it gives alone, and the model's modes come back as they were when the
    last call ends. Settings must not be assigned while another thread scores.

    Subclasses implement `_score_batch(inputs)` for one batch and declare their settings as
    `Setting` class attributes.

    Args:
        model: The classifier (an ``nn.Module``, run in eval mode while scoring, or a callable).
            A ``DistributedDataParallel`` wrapper is scored through its ``.module`` (its own
            forward runs collectives, which would hang with one rank scoring alone).
        output: Names the logits in the model's output when it is not a tensor: a key (str; of
            a Mapping, else an attribute), an index (int; of a tuple or list) or a callable
            applied to the output. Default ``None``: a tensor is used as it is, and a Mapping
            with the key ``"logits"`` or an object with a tensor ``logits`` attribute (a Hugging
            Face ``ModelOutput``) gives that.
        ood_label: Label `predict` returns for rejected inputs; it must not be a class of the
            model (``[0, N)`` is refused once ``N`` is known). Default: ``-1``.
        batch_size: Split tensor inputs into chunks of this many samples. Default: whole tensor.
        input_key: Key of the inputs in dict batches (a Hugging Face image `DataLoader` yields
            ``{"pixel_values": ..., "labels": ...}``). Default: ``"pixel_values"``.
        progress: Show a tqdm progress bar over batches (needs tqdm; no total for an iterable
            without a length). Default: ``False``.

    Attributes:
        threshold_: Score threshold set by `calibrate` (``None`` before, and after a setting
            that changes scores is assigned); an input is accepted when ``score >= threshold_``.

    Examples:
        >>> from gq_loss import Detector, EnergyDetector
        >>> detector = EnergyDetector(torch.nn.Linear(4, 3))
        >>> isinstance(detector, Detector)
        True
        >>> detector = detector.fit(None).calibrate(torch.randn(50, 4), tpr=0.9)
        >>> x = torch.randn(6, 4)
        >>> x[0] = float("nan")  # an input that cannot be scored is never given a class
        >>> detector.score(x).isnan().tolist()[:2], detector.predict(x)[0].item()
        ([True, False], -1)
        >>> detector.temperature = 2.0  # a setting that changes scores drops the threshold
        >>> detector.threshold_ is None
        True
    """

    _desc = "scoring"

    model: Setting[Model] = Setting(check_model)
    output: Setting[OutputSpec | None] = Setting(check_output)
    ood_label: Setting[int] = Setting(check_int, invalidates=False)
    batch_size: Setting[int | None] = Setting(check_optional_int, invalidates=False)
    input_key: Setting[str] = Setting(check_key, invalidates=False)
    progress: Setting[bool] = Setting(check_bool, invalidates=False)

    def __init__(
        self,
        model: Model | None,
        *,
        output: OutputSpec | None = None,
        ood_label: int = -1,
        batch_size: int | None = None,
        input_key: str = "pixel_values",
        progress: bool = False,
    ) -> None:
        self._invalidate()
        self.model = model
        self.output = output
        self.ood_label = ood_label
        self.batch_size = batch_size
        self.input_key = input_key
        self.progress = progress

    # ------------------------------------------------------------------ state

    @property
    def threshold_(self) -> float | None:
        """Score threshold set by `calibrate`; ``None`` before (see the class docs)."""
        return self.__dict__["_threshold_"]

    @threshold_.setter
    def threshold_(self, value: float | None) -> None:
        self.__dict__["_threshold_"] = check_threshold(value)

    def _invalidate(self, setting: str | None = None) -> None:
        """Drop the fitted state: ``setting``, which changes scores, was assigned a new value
        (``None``: at construction, or a new fit)."""
        self.threshold_ = None

    def _check_fitted(self) -> None:
        """Raise `NotFittedError` where `fit` must come first."""

    def _check_setting(self, name: str, value: Any) -> None:
        """Checks of a setting against the others, before it is assigned (none here)."""

    def __repr__(self) -> str:
        parts = []
        for name in settings_of(type(self)):
            value = getattr(self, name)
            if name == "model":
                value = type(value).__name__ if value is not None else None
                parts.append(f"model={value}")
            else:
                parts.append(f"{name}={value!r}")
        parts.append(f"threshold_={self.threshold_!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # ------------------------------------------------------------------ scoring

    def _score_batch(self, inputs: Tensor) -> BatchResult:
        raise NotImplementedError

    def _collect(
        self, inputs: Data, name: str, fn: Callable[[Tensor], BatchResult] | None = None
    ) -> tuple[Tensor, Tensor, int | None]:
        """Scores ``(..., n)`` and classes ``(n,)`` of every batch by ``fn`` (default:
        `_score_batch`), concatenated along the last dim, and the number of classes (``None``
        for empty inputs)."""
        self._check_fitted()
        fn = fn or self._score_batch
        items, total, out_device = batches(inputs, name, self.batch_size, self.input_key)
        scores, classes = [], []
        num_classes = None
        with eval_mode(self.model):
            for batch in progress(items, total, self.progress, self._desc):
                if check_batch(batch, name).shape[0] == 0:
                    continue
                s, c, num_classes = fn(batch)
                scores.append(s)  # kept where computed: one transfer at the end
                classes.append(c)
        if scores:
            scores_t = torch.cat(scores, dim=-1).to(out_device)
            return scores_t, torch.cat(classes).to(out_device), num_classes
        if isinstance(inputs, Tensor):  # an empty batch gives empty results
            empty = torch.empty(0, dtype=torch.float64, device=out_device)
            return empty, torch.empty(0, dtype=torch.long, device=out_device), None
        raise ValueError(f"`{name}` yielded no samples")

    def score(self, inputs: Data) -> Tensor:
        """Scores ``(B,)``, float64, higher = more in-distribution; NaN where not computable.

        Args:
            inputs: A float tensor ``(B, ...)``, an ``(inputs, labels)`` pair, a dict holding
                the inputs under `input_key`, or an iterable of batches (e.g. a `DataLoader`,
                also over an `IterableDataset`) where a batch is a tensor, a tuple/list whose
                first element is the input, or a dict holding it under `input_key` (a Hugging
                Face image `DataLoader`); labels and other entries are ignored.

        Returns:
            Shape ``(B,)`` (total number of samples), detached. On the input's device for a
                tensor; concatenated on the CPU for an iterable. A non-finite score is returned as
                it is (`gq_loss.metrics.ood_metrics` refuses it). A sample's score can change in
                its last bits with the batch it is scored in (the model's kernels round
                differently for other batch shapes); `calibrate` leaves a margin for that.
        """
        return self._collect(inputs, "inputs")[0]

    def __call__(self, inputs: Data) -> Tensor:
        return self.score(inputs)

    def fit(self: D, id_train_data: Any) -> D:
        """Nothing to estimate for this score; returns ``self`` (see the protocol)."""
        return self

    def calibrate(self: D, id_data: Data, *, tpr: float = 0.95) -> D:
        """Set `threshold_` so that a share ``tpr`` of ``id_data`` scores at least it, in any
        batches.

        With ``n`` scores sorted in decreasing order and ``k = ceil(tpr · n)``, the threshold is
        the ``k``-th score lowered by a margin: `CALIBRATION_MARGIN` (``1e-4``) times the median
        distance of the scores to the ``k``-th (`calibration_margin`). A sample's score changes
        in its last bits with the batch it is scored in (measured: up to ``8.4e-6`` of that
        distance for float32 models on the CPU, ``benchmarks/calibration_margin.py``), and the
        margin keeps those changes from dropping it below the threshold: on ``id_data`` itself
        at least ``k`` samples are accepted whatever ``batch_size`` or batching `predict` uses,
        and more than ``k`` only where other scores lie within the margin below the ``k``-th. A median cannot be moved
        far by a few outliers (a corrupted image, a sample far out of range): fewer than half
        of the scores cannot make the margin larger than the distance of the others to the
        ``k``-th. Batch effects larger than the margin (half precision, TF32 convolutions, a
        model whose scores hardly vary) are not covered.

        Args:
            id_data: In-distribution validation data, as for `score`.
            tpr: Target share of accepted in-distribution samples, in ``(0, 1]``.

        Returns:
            ``self``.

        Raises:
            ValueError: ``id_data`` is empty, some of its scores are NaN or infinite (an input
                the detector cannot score cannot set what counts as in-distribution), or
                ``ood_label`` is a class of the model.
        """
        tpr = check_fraction("tpr", tpr)
        scores, _, num_classes = self._collect(id_data, "id_data")
        check_ood_label(self.ood_label, num_classes)
        self.threshold_ = threshold_at(scores, tpr, "id_data")
        return self

    def predict(self, inputs: Data) -> Tensor:
        """The predicted class ``(B,)`` long, or ``ood_label`` where the score is below
        `threshold_` or not finite.

        Args:
            inputs: As for `score`.

        Raises:
            NotFittedError: `calibrate` (or a needed `fit`) has not been called since the
                detector was built or a setting that changes scores was assigned.
            ValueError: ``ood_label`` is a class of the model (in ``[0, N)``).
        """
        self._check_fitted()
        threshold = self.threshold_
        if threshold is None:
            raise NotFittedError(
                f"{type(self).__name__} has no threshold: call calibrate(id_data) before "
                "predict() (assigning a setting that changes scores drops the threshold)"
            )
        scores, classes, num_classes = self._collect(inputs, "inputs")
        check_ood_label(self.ood_label, num_classes)
        accepted = torch.isfinite(scores) & (scores >= threshold)
        return classes.masked_fill(~accepted, self.ood_label)


#: Scores ``(..., B)``, classes ``(B,)`` and the number of classes of one batch.
BatchResult = tuple[Tensor, Tensor, int]

#: `Detector.calibrate` lowers the threshold by this share of the median distance of the
#: calibration scores to the threshold's score (`calibration_margin`), so that the last-bit
#: changes of a score with its batch cannot drop a calibration sample below it.
CALIBRATION_MARGIN = 1e-4


def check_scores(scores: Tensor, name: str, purpose: str) -> Tensor:
    """Non-empty, finite ``scores`` ``(..., n)``: a threshold or a choice is made from them."""
    if scores.shape[-1] == 0:
        raise ValueError(f"`{name}` contains no samples")
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise ValueError(
            f"`{name}` must give finite scores to {purpose}, got {bad} NaN/inf of "
            f"{scores.numel()} (check the inputs and the model's outputs for NaN)"
        )
    return scores


def threshold_at(scores: Tensor, tpr: float, name: str) -> float:
    """The ``ceil(tpr · n)``-th largest of ``scores`` ``(n,)``, which must be finite, lowered by
    `calibration_margin`."""
    check_scores(scores, name, "calibrate on")
    k = max(1, math.ceil(tpr * scores.numel() - 1e-9))  # tolerance for tpr*n rounding up
    ordered = torch.sort(float64(scores).cpu(), descending=True).values
    return float(ordered[k - 1]) - calibration_margin(ordered, k)


def calibration_margin(ordered: Tensor, k: int) -> float:
    """How far below the ``k``-th of the scores ``ordered`` (float64, decreasing) the threshold
    lies: `CALIBRATION_MARGIN` times the median of ``|s_i - s_k|`` over all scores.

    The batch effect on a score is a share of how much the scores vary, so the margin is one
    too; the median distance to the ``k``-th (unlike the range, which one corrupted sample can
    make a million times larger) moves little when fewer than half of the scores are outliers.
    Where more than half of them equal the ``k``-th exactly (saturated or identical scores),
    that median is 0 and the range is used instead, the margin of earlier versions."""
    spread = float((ordered - ordered[k - 1]).abs().median())
    if spread == 0.0:
        spread = float(ordered[0] - ordered[-1])
    return CALIBRATION_MARGIN * spread
