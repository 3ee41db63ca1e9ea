"""What every detector shares: the detector protocol (score / fit / calibrate / predict), its
validated settings, and the mechanics under it, written once: eval mode, batch iteration,
progress and the float64 score precision."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar, overload

import torch
from torch import Tensor, nn

from ._validation import (
    OutputSpec,
    call_model,
    check_fraction,
    check_logits,
    check_optional_int,
    check_output_spec,
    place_inputs,
)

Model = Callable[[Tensor], Any]
Data = Tensor | Iterable[Any]
D = TypeVar("D", bound="Detector")
T = TypeVar("T")


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


# --------------------------------------------------------------------------- settings


class Setting(Generic[T]):
    """A public detector setting: validated by ``check(name, value)`` on every assignment, at
    construction as afterwards; when ``invalidates`` (the setting changes scores), assigning it
    drops the detector's fitted state (`Detector._invalidate`), so no stale threshold survives.

    The one mechanism behind every detector's settings; the value lives in ``_<name>``.
    """

    def __init__(self, check: Callable[[str, Any], T], *, invalidates: bool = True) -> None:
        self.check = check
        self.invalidates = invalidates
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> Setting[T]: ...

    @overload
    def __get__(self, obj: object, owner: type) -> T: ...

    def __get__(self, obj: object | None, owner: type) -> Setting[T] | T:
        if obj is None:
            return self
        value: T = obj.__dict__["_" + self.name]
        return value

    def __set__(self, obj: Detector, value: Any) -> None:
        checked = self.check(self.name, value)
        obj._check_setting(self.name, checked)
        obj.__dict__["_" + self.name] = checked
        if self.invalidates:
            obj._invalidate()


def settings_of(cls: type) -> list[str]:
    """Names of the `Setting` attributes of ``cls``: ``model``, then the score's own settings,
    then the protocol's (``output``, ``ood_label``, ...)."""
    own: list[str] = []
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, Setting) and name not in own:
                own.append(name)
    base = [name for name in own if name in vars(Detector) and name != "model"]
    return ["model"] + [n for n in own if n not in base and n != "model"] + base


def check_model(name: str, model: Any) -> Model:
    if not callable(model):
        raise TypeError(
            f"`{name}` must be a torch.nn.Module or a callable mapping inputs (B, ...) to logits "
            f"(B, N), got {type(model).__name__}"
        )
    return model


def check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}")
    return value


def check_output(name: str, value: Any) -> OutputSpec | None:
    return check_output_spec(value)


# --------------------------------------------------------------------------- mechanics


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


def lacks_float64(device: torch.device) -> bool:
    """Whether ``device`` has no float64 (Apple's MPS): float64 work then runs on the CPU."""
    return device.type == "mps"


def float64_device(device: torch.device) -> torch.device:
    """Where float64 work on tensors of ``device`` runs: ``device`` itself, or the CPU where it
    has no float64 (`lacks_float64`). The one rule of every score."""
    return torch.device("cpu") if lacks_float64(device) else device


def float64(t: Tensor, *, copy: bool = False) -> Tensor:
    """``t`` in float64 on `float64_device` (a new tensor with ``copy=True``).

    At ``T = 1000`` a float32 max-softmax sits on a grid of about 7.5e-9 while scores spread over
    ~3e-5, so many scores tie; from float64 the ties are gone at negligible cost.
    """
    return t.to(device=float64_device(t.device), dtype=torch.float64, copy=copy)


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


def length(data: Any) -> int | None:
    """``len(data)``, or None for an iterable without one (a `DataLoader` over an
    `IterableDataset` has ``__len__`` but raises `TypeError` from it)."""
    try:
        return len(data)
    except TypeError:
        return None


def batches(
    inputs: Any, name: str, batch_size: int | None
) -> tuple[Iterable[Any], int | None, torch.device]:
    """(batches, number of batches or None, device of the results) for a tensor or an iterable.

    A tensor is split into ``batch_size`` chunks and its results stay on its device; an iterable
    (a `DataLoader`, a generator; no length needed) yields tensors or tuples/lists whose first
    element is the input, and its results are concatenated on the CPU.
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
        return items, length(inputs), torch.device("cpu")
    raise TypeError(
        f"`{name}` must be a tensor (B, ...) or an iterable of batches, got {type(inputs).__name__}"
    )


def progress(items: Iterable[Any], total: int | None, enabled: bool, desc: str) -> Iterable[Any]:
    """``items`` under a tqdm bar when ``enabled``; ``total=None`` gives a bar without a total."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError as err:
        raise ImportError("`progress=True` needs tqdm: `pip install tqdm`") from err
    return tqdm(items, total=total, desc=desc, unit="batch")


def logits_of(model: Model, inputs: Tensor, output: OutputSpec | None) -> Tensor:
    """The logits ``(B, N)`` of one batch by the package's rules: inputs placed by
    `place_inputs`, the output named by ``output`` (`call_model`), checked by `check_logits`."""
    logits = call_model(model, place_inputs(model, inputs), output)
    check_logits(logits, inputs.shape[0])
    return logits


# --------------------------------------------------------------------------- the protocol


class Detector:
    r"""The one protocol of every detector: `score`, `fit`, `calibrate`, `predict`.

    * `score(inputs)`: scores ``(B,)``, **higher = more in-distribution**, over a tensor
      ``(B, ...)`` or an iterable of batches (a `DataLoader`, with or without labels, with or
      without a length).
    * `fit(id_train_data)`: estimates what the score needs from labelled in-distribution data
      (Mahalanobis); a no-op returning ``self`` for the others.
    * `calibrate(id_data, *, tpr)`: sets `threshold_` so that a share ``tpr`` of ``id_data`` is
      accepted.
    * `predict(inputs)`: the predicted class ``(B,)`` where ``score >= threshold_``, else
      ``ood_label``. An input whose score is not finite (NaN or inf: a NaN image, a model that
      overflowed) is never given a class: it gets ``ood_label``.

    **Settings and fitted state.** Every constructor argument is a public attribute, validated
    when it is assigned as at construction and shown in ``repr``. Assigning a setting that
    changes scores (the model, ``output``, ``temperature``, ...) drops the fitted state: the
    threshold, and for a detector with a `fit` its statistics, so `predict` raises
    [`NotFittedError`][gq_loss.NotFittedError] until the next `calibrate` (and `fit`); a second
    `fit` also drops the threshold. ``ood_label``, ``batch_size`` and ``progress`` do not change
    scores and keep it. Fitted state follows scikit-learn's convention: its names end in ``_``
    and are ``None`` before the step that sets them. Changes made *inside* the model (training
    it further) cannot be seen: calibrate again after them.

    Subclasses implement `_score_batch(inputs)` for one batch and declare their settings as
    `Setting` class attributes.

    Args:
        model: The classifier (an ``nn.Module``, run in eval mode while scoring, or a callable).
        output: Names the logits in the model's output when it is not a tensor: a key (str; of
            a Mapping, else an attribute), an index (int; of a tuple or list) or a callable
            applied to the output. Default ``None``: a tensor is used as it is, and a Mapping
            with the key ``"logits"`` or an object with a tensor ``logits`` attribute (a Hugging
            Face ``ModelOutput``) gives that.
        ood_label: Label `predict` returns for rejected inputs. Default: ``-1``.
        batch_size: Split tensor inputs into chunks of this many samples. Default: whole tensor.
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
    progress: Setting[bool] = Setting(check_bool, invalidates=False)

    def __init__(
        self,
        model: Model | None,
        *,
        output: OutputSpec | None = None,
        ood_label: int = -1,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> None:
        self._invalidate()
        self.model = model
        self.output = output
        self.ood_label = ood_label
        self.batch_size = batch_size
        self.progress = progress

    # ------------------------------------------------------------------ state

    @property
    def threshold_(self) -> float | None:
        """Score threshold set by `calibrate`; ``None`` before (see the class docs)."""
        return self.__dict__["_threshold_"]

    @threshold_.setter
    def threshold_(self, value: float | None) -> None:
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"`threshold_` must be a real number or None, got {value!r}")
            if math.isnan(value):
                raise ValueError("`threshold_` must not be NaN")
            value = float(value)
        self.__dict__["_threshold_"] = value

    def _invalidate(self) -> None:
        """Drop the fitted state: a setting that changes scores was assigned."""
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

    def _score_batch(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

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
                batches (e.g. a `DataLoader`, also over an `IterableDataset`) where a batch is a
                tensor or a tuple/list whose first element is the input (labels are ignored).

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

    def calibrate(self: D, id_data: Data, *, tpr: float = 0.95) -> D:
        """Set `threshold_` so that a share ``tpr`` of ``id_data`` scores at least it.

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
        """
        self._check_fitted()
        threshold = self.threshold_
        if threshold is None:
            raise NotFittedError(
                f"{type(self).__name__} has no threshold: call calibrate(id_data) before "
                "predict() (assigning a setting that changes scores drops the threshold)"
            )
        scores, classes = self._collect(inputs, "inputs")
        accepted = torch.isfinite(scores) & (scores >= threshold)
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
