r"""[`ODINDetector`][gq_loss.ODINDetector]: the ODIN settings, run over data, calibrated and tuned.

The per-batch math lives in [`odin_score`][gq_loss.odin_score] and
[`odin_perturb`][gq_loss.odin_perturb] (module `gq_loss.functional`, which states the formula
and the choices made); ``ODINDetector(model, ...).score(x)`` equals
``odin_score(model, x, ...)`` with the same settings, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

from ._detector import BatchResult, Data, Detector, check_scores
from ._runtime import Model, OutputSpec, check_batch
from ._settings import Setting
from ._validation import check_choice, check_nonnegative, check_positive
from .functional import (
    Clamp,
    PerChannel,
    check_clamp,
    check_sign_of_zero,
    odin_grid,
    odin_perturb,
    per_channel,
)
from .metrics import ood_metrics

__all__ = ["CRITERIA", "TUNE_EPSILONS", "TUNE_TEMPERATURES", "ODINDetector"]

#: Default grids of `ODINDetector.tune` (the search space of the ODIN paper).
TUNE_TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
TUNE_EPSILONS = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005, 0.01, 0.05, 0.1, 0.2)
#: Selection criteria of `ODINDetector.tune` with OOD data -> whether larger is better.
CRITERIA: dict[str, bool] = {"fpr95": False, "auroc": True}


def _as_tuple(t: Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in t.tolist())


def _check_std(name: str, value: Any) -> tuple[float, ...] | None:
    return None if value is None else _as_tuple(per_channel(name, value, positive=True))


def _check_clamp(name: str, value: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    bounds = check_clamp(value)
    return None if bounds is None else (_as_tuple(bounds[0]), _as_tuple(bounds[1]))


class ODINDetector(Detector):
    r"""ODIN detector wrapped around a trained classifier.

    Holds the settings of [`odin_score`][gq_loss.odin_score] (formula and choices in
    `gq_loss.functional`) and follows the [`Detector`][gq_loss.Detector] protocol: `score`,
    `calibrate`, `predict` over tensors or iterables of batches; `tune` grid-searches ``(T, ε)``.
    Every argument is a public attribute, validated on assignment; assigning one that changes
    scores a new value drops `threshold_` (see [`Detector`][gq_loss.Detector]), and, unless it
    is ``temperature`` or ``epsilon`` (the grid's own axes), `tuning_results_`.

    Args:
        model: An ``nn.Module`` or a callable mapping a float batch ``(B, ...)`` to logits
            ``(B, N)``, ``N >= 2`` (or to an output holding them, see ``output``); samples must
            be independent. A module runs in eval mode (each submodule's flag restored) and
            inputs are moved to the device and cast to the floating dtype of its first floating
            parameter; a plain callable gets the inputs as they are. A step (``epsilon > 0``) on
            a model that receives float16 or bfloat16 inputs is refused (it would round away):
            keep the weights in float32, with ``torch.autocast`` for speed elsewhere.
        temperature: ``T > 0``. Default: ``1000.0`` (paper).
        epsilon: Step size ``ε >= 0`` in the units of the tensor the model receives: for
            ``[0, 1]`` images (also when the model normalises them inside) that is pixel units,
            the paper's. Default: ``0.001`` (paper, CIFAR-10). ``0`` gives temperature-scaled
            max-softmax.
        input_std: Only for inputs fed **already normalised** as ``(pixel - mean) / σ``: ``σ``,
            a positive float or one value per channel (dim 1); the step of channel ``c`` is then
            ``ε / σ_c``, i.e. ε in pixel units. Default: ``None`` (``σ = 1``). Read back as a
            tuple of floats.
        sign_of_zero: Sign given to an exactly-zero cross-entropy gradient: ``0`` (default,
            ``torch.sign``: no step) or ``1`` (original code: step ``-ε / σ_c``).
        clamp: Optional ``(lo, hi)`` (floats or per-channel values, model-input units); ``x̃`` is
            clamped to it. Read back as a pair of tuples of floats.
        output: Names the logits in the model's output, as for
            [`odin_score`][gq_loss.odin_score]. Default: ``None``.
        ood_label: Label `predict` returns for rejected inputs. Default: ``-1``.
        batch_size: Split tensor inputs into chunks of this many samples. Default: whole tensor.
        input_key: Key of the inputs in dict batches, as for [`Detector`][gq_loss.Detector].
            Default: ``"pixel_values"``.
        progress: Show a tqdm progress bar over batches (needs tqdm). Default: ``False``.

    Attributes:
        threshold_: Score threshold set by `calibrate` (``None`` before); accepted when
            ``score >= threshold_`` (and the score is finite).
        tuning_results_: List of dicts, one per grid point, filled by `tune` (empty before, and
            after a setting other than ``temperature`` and ``epsilon`` is assigned a new value:
            the grid's scores depend on all the others).

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> detector = ODINDetector(model, temperature=1000.0, epsilon=0.001)
        >>> scores = detector.score(torch.randn(4, 3, 2, 2))  # float64, higher = more ID
        >>> scores.shape, scores.dtype, bool((scores >= 1 / 3).all())
        (torch.Size([4]), torch.float64, True)
        >>> detector.calibrate(torch.randn(100, 3, 2, 2), tpr=0.95).predict(
        ...     torch.randn(5, 3, 2, 2)).shape
        torch.Size([5])
    """

    _desc = "ODIN"
    _fitted = ("threshold_", "tuning_results_")
    tuning_results_: list[dict[str, float]]
    model: Setting[Model]
    temperature: Setting[float] = Setting(check_positive)
    epsilon: Setting[float] = Setting(check_nonnegative)
    input_std: Setting[tuple[float, ...] | None] = Setting(_check_std)
    sign_of_zero: Setting[int] = Setting(lambda _name, value: check_sign_of_zero(value))
    clamp: Setting[tuple[tuple[float, ...], tuple[float, ...]] | None] = Setting(_check_clamp)

    def __init__(
        self,
        model: Model,
        *,
        temperature: float = 1000.0,
        epsilon: float = 0.001,
        input_std: PerChannel | None = None,
        sign_of_zero: int = 0,
        clamp: tuple[PerChannel, PerChannel] | None = None,
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
        self.epsilon = epsilon
        self.input_std = input_std
        self.sign_of_zero = sign_of_zero
        self.clamp = clamp

    def _invalidate(self, setting: str | None = None) -> None:
        """Drop the threshold, and the tuning results unless ``setting`` is one of the grid's
        axes (``temperature``, ``epsilon``), which do not change them."""
        super()._invalidate(setting)
        if setting not in ("temperature", "epsilon"):
            self.tuning_results_ = []

    def _checked_fitted(self, state: Mapping[str, Any]) -> dict[str, Any]:
        results = state["tuning_results_"]
        if not isinstance(results, list) or not all(
            isinstance(r, Mapping)
            and all(isinstance(k, str) and isinstance(v, float) for k, v in r.items())
            for r in results
        ):
            raise TypeError(
                "`state_dict['tuning_results_']` must be a list of dicts of floats, got "
                f"{type(results).__name__}"
            )
        copied = [dict(r) for r in results]
        return {**super()._checked_fitted(state), "tuning_results_": copied}

    def _settings(self) -> tuple[Tensor | None, Clamp | None]:
        """``input_std`` and ``clamp`` as the tensors the functional core takes."""
        std, clamp = self.input_std, self.clamp
        return (
            None if std is None else per_channel("input_std", std, positive=True),
            check_clamp(clamp),
        )

    def _odin(
        self, x: Tensor, temperatures: Sequence[float], epsilons: Sequence[float]
    ) -> BatchResult:
        std, clamp = self._settings()
        return odin_grid(
            self.model,
            x,
            temperatures,
            epsilons,
            std=std,
            clamp=clamp,
            sign_of_zero=self.sign_of_zero,
            output=self.output,
        )

    def _score_batch(self, inputs: Tensor) -> BatchResult:
        scores, pred, num_classes = self._odin(inputs, (self.temperature,), (self.epsilon,))
        return scores[0, 0], pred, num_classes

    def perturb(self, inputs: Tensor) -> Tensor:
        """The perturbed input ``x̃`` ``(B, ...)`` of one batch, on the input's device, in the
        model's dtype: [`odin_perturb`][gq_loss.odin_perturb] with these settings.

        Args:
            inputs: A float tensor ``(B, ...)``.
        """
        if not isinstance(inputs, Tensor):
            raise TypeError(f"`inputs` must be a tensor, got {type(inputs).__name__}")
        return odin_perturb(
            self.model,
            check_batch(inputs, "inputs"),
            temperature=self.temperature,
            epsilon=self.epsilon,
            input_std=self.input_std,
            sign_of_zero=self.sign_of_zero,
            clamp=self.clamp,
            output=self.output,
        )

    def _scan(self, data: Data, name: str, temps: Sequence[float], eps: Sequence[float]) -> Tensor:
        """Scores ``(len(temps), len(eps), n)`` over all of ``data``; raises if it is empty."""
        scores = self._collect(data, name, lambda x: self._odin(x, temps, eps))[0]
        return check_scores(scores, name, "tune on")

    def tune(
        self,
        id_data: Data,
        ood_data: Data | None = None,
        *,
        temperatures: Sequence[float] | None = None,
        epsilons: Sequence[float] = TUNE_EPSILONS,
        criterion: str | None = None,
    ) -> ODINDetector:
        """Grid-search ``(T, ε)`` on validation data and apply the best setting.

        Each temperature costs one forward and one backward per batch, each ``ε > 0`` one more
        forward; the data is read once. The result of every grid point is kept in
        `tuning_results_`; `threshold_` is reset (call `calibrate` again).

        * With ``ood_data``: ``criterion="fpr95"`` (default, the ODIN paper: lowest FPR at 95%
          TPR, ties broken by AUROC) or ``"auroc"`` (highest, ties broken by FPR95), computed by
          [`ood_metrics`][gq_loss.metrics.ood_metrics]; ``temperatures`` defaults to
          `TUNE_TEMPERATURES`.
        * Without (a heuristic, after Generalized ODIN, Hsu et al., CVPR 2020): ``ε`` maximising
          the mean score on ``id_data`` at one temperature (default: the current one). The step
          is meant to raise ``S_ŷ``; the criterion keeps the ``ε`` up to which it still does on
          in-distribution data, trusting that OOD inputs gain less (the ODIN paper's
          observation). Nothing checks that on OOD data, and on near-linear models the mean can
          keep growing, favouring the largest ``ε`` of the grid: keep the grid plausible. Mean
          scores at different temperatures are not comparable, so only one is accepted.

        Args:
            id_data: In-distribution validation data, as for `score`.
            ood_data: Optional OOD validation data, as for `score`.
            temperatures: Grid of ``T > 0``.
            epsilons: Grid of ``ε >= 0``. Default: `TUNE_EPSILONS`.
            criterion: ``"fpr95"`` | ``"auroc"`` (needs ``ood_data``).

        Returns:
            ``self``, with the selected ``temperature`` and ``epsilon``; ties go to the first
                grid point in ``temperatures``-major order.
        """
        eps_grid = check_grid("epsilons", epsilons, strict=False)
        if ood_data is None:
            if criterion is not None:
                raise ValueError(
                    f"`criterion` {criterion!r} needs `ood_data`; omit it for ID-only tuning"
                )
            temps = self._id_only_temperatures(temperatures)
            id_scores = self._scan(id_data, "id_data", temps, eps_grid)
            results = mean_id_score_results(id_scores, temps, eps_grid)
            best = best_mean_id_score(results)
        else:
            criterion = "fpr95" if criterion is None else criterion
            check_choice("criterion", criterion, tuple(CRITERIA))
            temps = check_grid(
                "temperatures",
                TUNE_TEMPERATURES if temperatures is None else temperatures,
                strict=True,
            )
            id_scores = self._scan(id_data, "id_data", temps, eps_grid)
            ood_scores = self._scan(ood_data, "ood_data", temps, eps_grid)
            results = ood_metric_results(id_scores, ood_scores, temps, eps_grid)
            best = BEST[criterion](results)
        self.temperature, self.epsilon = best["temperature"], best["epsilon"]
        self.threshold_ = None  # also where the best setting is the current one
        self.tuning_results_ = results
        return self

    def _id_only_temperatures(self, temperatures: Sequence[float] | None) -> tuple[float, ...]:
        """The one temperature of ID-only tuning (default: the current one)."""
        temps = (
            (self.temperature,)
            if temperatures is None
            else check_grid("temperatures", temperatures, strict=True)
        )
        if len(temps) != 1:
            raise ValueError(
                "ID-only tuning takes one temperature (mean scores at different temperatures "
                f"are not comparable), got `temperatures`={tuple(temperatures or ())!r}"
            )
        return temps


def check_grid(name: str, values: Sequence[float], *, strict: bool) -> tuple[float, ...]:
    """A non-empty grid of numbers ``> 0`` (``strict``) or ``>= 0``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"`{name}` must be a sequence of numbers, got {values!r}")
    check = check_positive if strict else check_nonnegative
    grid = tuple(check(name, v) for v in values)
    if not grid:
        raise ValueError(f"`{name}` must not be empty")
    return grid


# --------------------------------------------------------------------------- tuning criteria

Results = list[dict[str, float]]


def mean_id_score_results(
    id_scores: Tensor, temps: Sequence[float], eps: Sequence[float]
) -> Results:
    """One result per ``ε`` of ID scores ``(1, len(eps), n)`` at the one temperature: its mean
    ID score."""
    return [
        {
            "temperature": temps[0],
            "epsilon": e,
            "mean_id_score": float(id_scores[0, i].double().mean()),
        }
        for i, e in enumerate(eps)
    ]


def ood_metric_results(
    id_scores: Tensor, ood_scores: Tensor, temps: Sequence[float], eps: Sequence[float]
) -> Results:
    """One result per grid point of scores ``(len(temps), len(eps), n)``: its
    [`ood_metrics`][gq_loss.metrics.ood_metrics], in ``temps``-major order."""
    return [
        {"temperature": t, "epsilon": e, **ood_metrics(id_scores[ti, ei], ood_scores[ti, ei])}
        for ti, t in enumerate(temps)
        for ei, e in enumerate(eps)
    ]


def best_mean_id_score(results: Results) -> dict[str, float]:
    """ID-only tuning: the highest mean ID score (the first of equals)."""
    return max(results, key=lambda r: r["mean_id_score"])


def best_fpr95(results: Results) -> dict[str, float]:
    """``criterion="fpr95"``: the lowest FPR at 95 % TPR, ties broken by the highest AUROC."""
    return min(results, key=lambda r: (r["fpr95"], -r["auroc"]))


def best_auroc(results: Results) -> dict[str, float]:
    """``criterion="auroc"``: the highest AUROC, ties broken by the lowest FPR95."""
    return min(results, key=lambda r: (-r["auroc"], r["fpr95"]))


#: The selection of each criterion of `CRITERIA`.
BEST: dict[str, Callable[[Results], dict[str, float]]] = {"fpr95": best_fpr95, "auroc": best_auroc}
