"""What every detector shares: the detector protocol (score / fit / calibrate / predict), and
the mechanics under it, written once: eval mode, batch iteration, input placement, progress and
the float64 score precision."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ._validation import check_fraction, check_optional_int, model_dtype

Model = Callable[[Tensor], Any]
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


# --------------------------------------------------------------------------- mechanics


def check_model(model: Any) -> None:
    if not callable(model):
        raise TypeError(
            "`model` must be a torch.nn.Module or a callable mapping inputs (B, ...) to logits "
            f"(B, N), got {type(model).__name__}"
        )


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Eval mode for the duration (an ``nn.Module`` only); each submodule's flag is restored."""
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def check_batch(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` batches must be tensors, got {type(x).__name__}")
    if x.ndim == 0 or not x.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating tensor (B, ...), got {x.dtype} of shape {tuple(x.shape)}"
        )
    return x


def placement(model: Any, x: Tensor) -> tuple[torch.device, torch.dtype]:
    """Where inputs go: the device and floating dtype of an ``nn.Module``'s parameters.

    The package's one rule: inputs are cast to the dtype of the model's first floating parameter
    when it differs and moved to its device; a plain callable (or a module without floating
    parameters) gets the inputs as they are.
    """
    dtype = model_dtype(model)
    if dtype is None:
        return x.device, x.dtype
    param = next(q for q in model.parameters() if q.is_floating_point())
    return param.device, dtype


def float64(logits: Tensor) -> Tensor:
    """Logits in float64 for the final softmax / logsumexp of a score.

    At ``T = 1000`` a float32 max-softmax sits on a grid of about 7.5e-9 while scores spread over
    ~3e-5, so many scores tie; from float64 the ties are gone at negligible cost. MPS has no
    float64, so those logits are scored on the CPU.
    """
    if logits.device.type == "mps":
        logits = logits.cpu()
    return logits.to(torch.float64)


def labelled_pair(data: Any) -> bool:
    """``(inputs, labels)`` with integer labels ``(B,)``: one batch, not an iterable of two."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and isinstance(data[1], Tensor)
        and not data[1].is_floating_point()
        and data[1].ndim == 1
    )


def batches(
    inputs: Any, name: str, batch_size: int | None
) -> tuple[Iterable[Any], int | None, torch.device]:
    """(batches, number of batches or None, device of the results) for a tensor or an iterable.

    A tensor is split into ``batch_size`` chunks and its results stay on its device; an iterable
    (a ``DataLoader``) yields tensors or tuples/lists whose first element is the input, and its
    results are concatenated on the CPU.
    """
    if labelled_pair(inputs):
        inputs = inputs[0]
    if isinstance(inputs, Tensor):
        if inputs.ndim == 0:
            raise ValueError(f"`{name}` must have a batch dimension, got a 0-d tensor")
        chunks = inputs.split(batch_size or max(len(inputs), 1))
        return chunks, len(chunks), inputs.device
    if isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
        items = (b[0] if isinstance(b, (tuple, list)) and len(b) > 0 else b for b in inputs)
        return items, len(inputs) if isinstance(inputs, Sized) else None, torch.device("cpu")
    raise TypeError(
        f"`{name}` must be a tensor (B, ...) or an iterable of batches, got {type(inputs).__name__}"
    )


def progress(items: Iterable[Any], total: int | None, enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError as err:
        raise ImportError("`progress=True` needs tqdm: `pip install tqdm`") from err
    return tqdm(items, total=total, desc=desc, unit="batch")


# --------------------------------------------------------------------------- the protocol


class Detector:
    r"""The one protocol of every detector: `score`, `fit`, `calibrate`, `predict`.

    * `score(inputs)`: scores ``(B,)``, **higher = more in-distribution**, over a tensor
      ``(B, ...)`` or an iterable of batches (a `DataLoader`, with or without labels).
    * `fit(id_train_data)`: estimates what the score needs from labelled in-distribution data
      (Mahalanobis); a no-op returning ``self`` for the others.
    * `calibrate(id_data, tpr)`: sets `threshold` so that a share ``tpr`` of ``id_data`` is
      accepted.
    * `predict(inputs)`: the predicted class ``(B,)`` where ``score >= threshold``, else
      ``ood_label``. An input whose score is not finite (NaN or inf: a NaN image, a model that
      overflowed) is never given a class: it gets ``ood_label``.

    Subclasses implement `_score_batch(x)` for one batch. Before `calibrate` (or `fit` where it
    is needed) `predict` raises [`NotFittedError`][gq_loss.NotFittedError].

    Args:
        model: The classifier (an ``nn.Module``, run in eval mode while scoring, or a callable),
            or ``None`` where the score needs none.
        ood_label: Label `predict` returns for rejected inputs. Default: ``-1``.
        batch_size: Split tensor inputs into chunks of this many samples. Default: whole tensor.
        progress: Show a tqdm progress bar over batches (needs tqdm). Default: ``False``.

    Attributes:
        threshold: Score threshold set by `calibrate` (``None`` before); an input is accepted
            when ``score >= threshold``.

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
    """

    _desc = "scoring"

    def __init__(
        self,
        model: Model | None = None,
        *,
        ood_label: int = -1,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> None:
        if model is not None:
            check_model(model)
        if isinstance(ood_label, bool) or not isinstance(ood_label, int):
            raise TypeError(f"`ood_label` must be an int, got {ood_label!r}")
        if not isinstance(progress, bool):
            raise TypeError(f"`progress` must be a bool, got {progress!r}")
        self.model = model
        self.ood_label = ood_label
        self.batch_size = check_optional_int("batch_size", batch_size)
        self.progress = progress
        self.threshold: float | None = None

    def _score_batch(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _check_fitted(self) -> None:
        """Raise `NotFittedError` where `fit` must come first."""

    def _collect(
        self, inputs: Data, name: str, fn: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Scores ``(..., n)`` and classes ``(n,)`` of every batch by ``fn`` (default:
        `_score_batch`), concatenated along the last dim."""
        self._check_fitted()
        fn = fn or self._score_batch
        items, total, out_device = batches(inputs, name, self.batch_size)
        scores, classes = [], []
        with eval_mode(self.model):
            for batch in progress(items, total, self.progress, self._desc):
                if check_batch(batch, name).shape[0] == 0:
                    continue
                s, c = fn(batch)
                scores.append(s)  # kept where computed: one transfer at the end
                classes.append(c)
        if scores:
            return torch.cat(scores, dim=-1).to(out_device), torch.cat(classes).to(out_device)
        if isinstance(inputs, Tensor):  # an empty batch gives empty results
            empty = torch.empty(0, dtype=torch.float64, device=out_device)
            return empty, torch.empty(0, dtype=torch.long, device=out_device)
        raise ValueError(f"`{name}` yielded no samples")

    def score(self, inputs: Data) -> Tensor:
        """Scores ``(B,)``, float64, higher = more in-distribution; NaN where not computable.

        Args:
            inputs: A float tensor ``(B, ...)``, an ``(inputs, labels)`` pair, or an iterable of
                batches (e.g. a `DataLoader`) where a batch is a tensor or a tuple/list whose
                first element is the input (labels are ignored).

        Returns:
            Shape ``(B,)`` (total number of samples), detached. On the input's device for a
            tensor; concatenated on the CPU for an iterable. A non-finite score is returned as
            it is (`gq_loss.metrics.ood_metrics` refuses it).
        """
        return self._collect(inputs, "inputs")[0]

    def __call__(self, inputs: Data) -> Tensor:
        return self.score(inputs)

    def fit(self: D, id_train_data: Any) -> D:
        """Nothing to estimate for this score; returns ``self`` (see the protocol)."""
        return self

    def calibrate(self: D, id_data: Data, tpr: float = 0.95) -> D:
        """Set `threshold` so that a share ``tpr`` of ``id_data`` scores at least it.

        With ``n`` scores sorted in decreasing order, the threshold is the ``k``-th,
        ``k = ceil(tpr · n)``: on ``id_data`` itself at least ``k`` samples are accepted, exactly
        ``k`` when scores are distinct (``tpr·n <= k < tpr·n + 1``).

        Args:
            id_data: In-distribution validation data, as for `score`.
            tpr: Target share of accepted in-distribution samples, in ``(0, 1]``.

        Returns:
            ``self``.

        Raises:
            ValueError: ``id_data`` is empty, or some of its scores are NaN or infinite (an
                input the detector cannot score cannot set what counts as in-distribution).
        """
        tpr = check_fraction("tpr", tpr)
        scores = self._collect(id_data, "id_data")[0]
        self.threshold = threshold_at(scores, tpr, "id_data")
        return self

    def predict(self, inputs: Data) -> Tensor:
        """The predicted class ``(B,)`` long, or ``ood_label`` where the score is below
        `threshold` or not finite.

        Args:
            inputs: As for `score`.

        Raises:
            NotFittedError: `calibrate` (or a needed `fit`) has not been called.
        """
        self._check_fitted()
        if self.threshold is None:
            raise NotFittedError(
                f"{type(self).__name__} has no threshold: call calibrate(id_data) before predict()"
            )
        scores, classes = self._collect(inputs, "inputs")
        accepted = torch.isfinite(scores) & (scores >= self.threshold)
        return classes.masked_fill(~accepted, self.ood_label)


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
    """The ``ceil(tpr · n)``-th largest of ``scores`` ``(n,)``, which must be finite."""
    check_scores(scores, name, "calibrate on")
    k = max(1, math.ceil(tpr * scores.numel() - 1e-9))  # tolerance for tpr*n rounding up
    return float(torch.sort(scores.cpu(), descending=True).values[k - 1])
