r"""Out-of-distribution detection metrics with explicit conventions.

Every function takes ``(id_scores, ood_scores)``: 1-D scores of in-distribution (ID) and
out-of-distribution (OOD) samples, where a **higher score means more in-distribution** (the
convention of ODIN's max-softmax, [`msp_score`][gq_loss.msp_score] and
[`energy_score`][gq_loss.energy_score]). Scores may be torch tensors (any device), numpy arrays or
sequences; they must be finite. They are used as they are (no sigmoid or other squashing), so raw
logits of any magnitude work.

Outputs: every scalar metric is a Python ``float``; the one curve,
[`roc_curve`][gq_loss.metrics.roc_curve], returns float64 torch tensors on the CPU, like every
other array the package returns. (numpy is used inside, for the sort and the cumulative sums.)

All metrics are rank based and computed from one sort (``O(n log n)``). Tied scores are grouped
into one threshold, exactly as scikit-learn's ``roc_curve`` (with ``drop_intermediate=False``),
``roc_auc_score`` and ``average_precision_score`` treat them; scikit-learn is only the test oracle.

Conventions (``positive``):

* ``"id"`` (default, the ODIN paper): ID is the positive class and is *accepted* when its score is
  ``>= t``. TPR = share of ID accepted, FPR = share of OOD accepted, so FPR95 is the share of OOD
  accepted when 95% of ID is accepted.
* ``"ood"`` (OpenOOD, pytorch-ood): OOD is the positive class and is *flagged* when its score is
  ``<= t`` (the scores are negated). TPR = share of OOD flagged, FPR = share of ID flagged, so
  FPR95 is the share of ID flagged when 95% of OOD is caught.

AUROC and the detection error are the same under both conventions; AUPR-In always takes ID as
positive and AUPR-Out always takes OOD as positive (on negated scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from ._validation import check_choice, check_fraction

__all__ = [
    "FPR_RULES",
    "POSITIVES",
    "aupr",
    "auroc",
    "detection_error",
    "fpr_at_tpr",
    "ood_metrics",
    "roc_curve",
]

Positive = Literal["id", "ood"]
FprRule = Literal["first", "interpolate"]
ScoresLike = torch.Tensor | np.ndarray | Sequence[float]

#: Allowed values of ``positive``; validation and dispatch both read this tuple.
POSITIVES: tuple[str, ...] = ("id", "ood")
#: Allowed values of ``rule``.
FPR_RULES: tuple[str, ...] = ("first", "interpolate")


# --------------------------------------------------------------------------- validation


def _as_scores(scores: ScoresLike, name: str) -> np.ndarray:
    """Convert scores to a finite, non-empty, 1-D float64 numpy array or raise."""
    if isinstance(scores, torch.Tensor):
        if scores.is_complex():
            raise TypeError(f"`{name}` must hold real numbers, got dtype {scores.dtype}")
        array = scores.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            array = np.asarray(scores)
            if array.dtype.kind not in "biuf":
                raise TypeError
            array = array.astype(np.float64, copy=False)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"`{name}` must be a 1-D tensor, array or sequence of real numbers, "
                f"got {type(scores).__name__}"
            ) from err
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D, got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"`{name}` must not be empty")
    if not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ValueError(f"`{name}` must be finite, got {bad} NaN/inf value(s)")
    return array


# --------------------------------------------------------------------------- core


class _Counts:
    """Per distinct score, sorted from high to low: how many ID and OOD samples share it.

    Everything else is cumulative sums of these two integer arrays, so one sort serves all
    metrics and both conventions (``"ood"`` is the same table read backwards with roles swapped).
    """

    def __init__(self, id_scores: np.ndarray, ood_scores: np.ndarray) -> None:
        scores = np.concatenate([id_scores, ood_scores])
        is_id = np.zeros(scores.size, dtype=np.int64)
        is_id[: id_scores.size] = 1
        order = np.argsort(scores)[::-1]  # descending; order inside a tie group is irrelevant
        scores, is_id = scores[order], is_id[order]
        # last index of every tie group (sklearn: np.diff != 0, so -0.0 == 0.0 share a group)
        ends = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
        cum_id = np.cumsum(is_id)[ends]
        cum_all = ends + 1
        self.values = scores[ends]
        self.n_id = np.diff(cum_id, prepend=0)
        self.n_ood = np.diff(cum_all - cum_id, prepend=0)

    def oriented(self, positive: str) -> tuple[np.ndarray, np.ndarray]:
        """(positives, negatives) per threshold group, ordered from most to least positive."""
        if positive == "id":
            return self.n_id, self.n_ood
        return self.n_ood[::-1], self.n_id[::-1]


def _roc_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (true positives, false positives), starting with the (0, 0) point."""
    tps = np.concatenate([[0], np.cumsum(pos)])
    fps = np.concatenate([[0], np.cumsum(neg)])
    return tps, fps


def _auroc(counts: _Counts) -> float:
    tps, fps = _roc_counts(counts.n_id, counts.n_ood)
    # trapezoids in integer counts: exact, and equal to the Mann-Whitney U with tied pairs at 1/2
    area2 = np.sum(np.diff(fps) * (tps[1:] + tps[:-1]), dtype=np.float64)
    return float(area2 / (2.0 * tps[-1] * fps[-1]))


def _fpr_at_tpr(counts: _Counts, tpr: float, positive: str, rule: str) -> float:
    tps, fps = _roc_counts(*counts.oriented(positive))
    tpr_curve, fpr_curve = tps / tps[-1], fps / fps[-1]
    k = int(np.argmax(tpr_curve >= tpr))  # first ROC point reaching the target (exists: tpr<=1)
    if rule == "first" or tpr_curve[k] == tpr or k == 0:
        return float(fpr_curve[k])
    # linear interpolation on the segment from the point before (last one below the target)
    t0, t1, f0, f1 = tpr_curve[k - 1], tpr_curve[k], fpr_curve[k - 1], fpr_curve[k]
    return float(f0 + (f1 - f0) * (tpr - t0) / (t1 - t0))


def _aupr(counts: _Counts, positive: str) -> float:
    pos, neg = counts.oriented(positive)
    tps, fps = np.cumsum(pos), np.cumsum(neg)
    precision = tps / (tps + fps)
    return float(np.sum(pos * precision) / tps[-1])  # sum of (recall step) * precision


def _detection_error(counts: _Counts) -> float:
    tps, fps = _roc_counts(counts.n_id, counts.n_ood)
    errors = 0.5 * (1.0 - tps / tps[-1]) + 0.5 * (fps / fps[-1])
    return float(errors.min())


def _prepare(id_scores: ScoresLike, ood_scores: ScoresLike) -> _Counts:
    return _Counts(_as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores"))


# --------------------------------------------------------------------------- public API


def roc_curve(
    id_scores: ScoresLike, ood_scores: ScoresLike, *, positive: Positive = "id"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""ROC curve with one point per distinct score, plus the starting point ``(0, 0)``.

    Thresholds are swept from the most to the least positive score; tied scores form one point
    (scikit-learn ``roc_curve(..., drop_intermediate=False)``).

    Args:
        id_scores: In-distribution scores, shape ``(N_id,)``; higher = more ID.
        ood_scores: Out-of-distribution scores, shape ``(N_ood,)``.
        positive: ``"id"``: point ``k`` accepts ``score >= thresholds[k]`` as ID, TPR/FPR are
            the shares of ID/OOD accepted. ``"ood"``: point ``k`` flags ``score <=
            thresholds[k]`` as OOD, TPR/FPR are the shares of OOD/ID flagged.

    Returns:
        ``(fpr, tpr, thresholds)``, float64 CPU tensors of shape ``(K + 1,)`` for ``K``
            distinct scores; ``thresholds[0]`` is ``+inf`` (``"id"``) or ``-inf`` (``"ood"``).

    Examples:
        >>> fpr, tpr, thr = roc_curve([3.0, 2.0, 1.0], [1.0, 0.0])
        >>> fpr.tolist(), tpr.round(decimals=3).tolist(), thr.tolist()
        ([0.0, 0.0, 0.0, 0.5, 1.0], [0.0, 0.333, 0.667, 1.0, 1.0], [inf, 3.0, 2.0, 1.0, 0.0])
    """
    check_choice("positive", positive, POSITIVES)
    counts = _prepare(id_scores, ood_scores)
    tps, fps = _roc_counts(*counts.oriented(positive))
    if positive == "id":
        thresholds = np.concatenate([[np.inf], counts.values])
    else:
        thresholds = np.concatenate([[-np.inf], counts.values[::-1]])
    return tuple(  # type: ignore[return-value]
        torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
        for a in (fps / fps[-1], tps / tps[-1], thresholds)
    )


def auroc(id_scores: ScoresLike, ood_scores: ScoresLike) -> float:
    r"""Area under the ROC curve: the probability that an ID sample outscores an OOD one.

    $$ \mathrm{AUROC} = \frac{1}{N_{id} N_{ood}} \sum_{i, j}
       \big( [s^{id}_i > s^{ood}_j] + \tfrac12 [s^{id}_i = s^{ood}_j] \big) $$

    Equal to scikit-learn's ``roc_auc_score`` (ties count one half) and the same under both
    conventions.

    Args:
        id_scores: In-distribution scores, shape ``(N_id,)``; higher = more ID.
        ood_scores: Out-of-distribution scores, shape ``(N_ood,)``.

    Returns:
        AUROC in ``[0, 1]`` as a Python float.

    Examples:
        >>> auroc([3.0, 2.0, 1.0], [1.0, 0.0])
        0.9166666666666666
    """
    return _auroc(_prepare(id_scores, ood_scores))


def fpr_at_tpr(
    id_scores: ScoresLike,
    ood_scores: ScoresLike,
    *,
    tpr: float = 0.95,
    positive: Positive = "id",
    rule: FprRule = "first",
) -> float:
    r"""False-positive rate at a target true-positive rate (FPR95 for ``tpr=0.95``).

    With ``positive="id"`` (ODIN paper) this is the share of OOD accepted when a share ``tpr``
    of ID is accepted; with ``positive="ood"`` (OpenOOD, pytorch-ood) the share of ID flagged when
    a share ``tpr`` of OOD is flagged.

    Rules, on the ROC curve of [`roc_curve`][gq_loss.metrics.roc_curve] (``k`` = first point
    with TPR ``>= tpr``):

    * ``"first"``: ``FPR[k]``, the FPR of the first threshold that reaches the target.
    * ``"interpolate"``: linear interpolation between points ``k - 1`` and ``k`` at the target;
      this equals ``np.interp(tpr, TPR, FPR)`` except when the target hits a horizontal run of
      the curve exactly, where it takes the run's smallest FPR (``FPR[k]``), so it never
      exceeds ``"first"``.

    Args:
        id_scores: In-distribution scores, shape ``(N_id,)``; higher = more ID.
        ood_scores: Out-of-distribution scores, shape ``(N_ood,)``.
        tpr: Target true-positive rate in ``(0, 1]``. Default: ``0.95``.
        positive: ``"id"`` or ``"ood"``, the positive class (see module docs). Default: ``"id"``.
        rule: ``"first"`` or ``"interpolate"``. Default: ``"first"``.

    Returns:
        FPR in ``[0, 1]`` as a Python float.

    Examples:
        >>> fpr_at_tpr([4.0, 3.0, 2.0, 1.0], [3.5, 0.5], tpr=0.75)
        0.5
        >>> fpr_at_tpr([4.0, 3.0, 2.0, 1.0], [3.5, 0.5], tpr=0.75, positive="ood")
        0.75
    """
    tpr = check_fraction("tpr", tpr)
    check_choice("positive", positive, POSITIVES)
    check_choice("rule", rule, FPR_RULES)
    return _fpr_at_tpr(_prepare(id_scores, ood_scores), tpr, positive, rule)


def aupr(id_scores: ScoresLike, ood_scores: ScoresLike, *, positive: Positive = "id") -> float:
    r"""Area under the precision-recall curve, as average precision (scikit-learn's definition).

    $$ \mathrm{AP} = \sum_k (R_k - R_{k-1})\, P_k $$

    over the distinct thresholds ``k`` from most to least positive, with step-wise (not
    interpolated) precision ``P_k`` and recall ``R_k`` (``R_0 = 0``). This is not the trapezoidal
    area under the PR curve that pytorch-ood and OpenOOD report; with many ties the two can
    differ by ~0.1 (see the conventions table of the OOD guide). ``positive="id"`` gives
    AUPR-In (ID positive, scores as given); ``positive="ood"`` gives AUPR-Out (OOD positive,
    scores negated).

    Args:
        id_scores: In-distribution scores, shape ``(N_id,)``; higher = more ID.
        ood_scores: Out-of-distribution scores, shape ``(N_ood,)``.
        positive: ``"id"`` (AUPR-In) or ``"ood"`` (AUPR-Out). Default: ``"id"``.

    Returns:
        Average precision in ``[0, 1]`` as a Python float.

    Examples:
        >>> round(aupr([3.0, 2.0, 1.0], [1.0, 0.0]), 4)
        0.9167
        >>> round(aupr([3.0, 2.0, 1.0], [1.0, 0.0], positive="ood"), 4)
        0.8333
    """
    check_choice("positive", positive, POSITIVES)
    return _aupr(_prepare(id_scores, ood_scores), positive)


def detection_error(id_scores: ScoresLike, ood_scores: ScoresLike) -> float:
    r"""Minimal misclassification probability with equal ID/OOD priors (ODIN paper).

    $$ P_e = \min_t \; \tfrac12 \big(1 - \mathrm{TPR}(t)\big) + \tfrac12\, \mathrm{FPR}(t) $$

    over all ROC points, including accepting nothing (``0.5``); the same under both conventions.

    Args:
        id_scores: In-distribution scores, shape ``(N_id,)``; higher = more ID.
        ood_scores: Out-of-distribution scores, shape ``(N_ood,)``.

    Returns:
        Detection error in ``[0, 0.5]`` as a Python float.

    Examples:
        >>> round(detection_error([3.0, 2.0, 1.0], [1.0, 0.0]), 4)
        0.1667
    """
    return _detection_error(_prepare(id_scores, ood_scores))


def ood_metrics(
    id_scores: ScoresLike,
    ood_scores: ScoresLike,
    *,
    positive: Positive = "id",
    tpr: float = 0.95,
    rule: FprRule = "first",
) -> dict[str, float]:
    r"""All standard OOD metrics from one sort of the scores.

    Keys (Python floats, fractions in ``[0, 1]``):

    * ``"auroc"``: [`auroc`][gq_loss.metrics.auroc].
    * ``"fpr95"``: [`fpr_at_tpr`][gq_loss.metrics.fpr_at_tpr] at ``tpr`` with ``positive`` and
      ``rule``. The key is named after the target: ``"fpr95"`` for ``0.95`` (default), ``"fpr90"`` for ``0.9``,
      ``"fpr99.5"`` for ``0.995`` (``f"fpr{100 * tpr:g}"``).
    * ``"aupr_in"``: [`aupr`][gq_loss.metrics.aupr] with ID positive (whatever ``positive`` is).
    * ``"aupr_out"``: [`aupr`][gq_loss.metrics.aupr] with OOD positive, scores negated
      (whatever ``positive`` is).
    * ``"detection_error"``: [`detection_error`][gq_loss.metrics.detection_error].

    Args:
        id_scores: In-distribution scores, shape ``(N_id,)``; higher = more ID.
        ood_scores: Out-of-distribution scores, shape ``(N_ood,)``.
        positive: Convention of the FPR: ``"id"`` (ODIN paper) or ``"ood"`` (OpenOOD,
            pytorch-ood). Default: ``"id"``.
        tpr: Target true-positive rate of the FPR, in ``(0, 1]``. Default: ``0.95``.
        rule: ``"first"`` or ``"interpolate"`` (see
            [`fpr_at_tpr`][gq_loss.metrics.fpr_at_tpr]). Default: ``"first"``.

    Returns:
        Dict of metric name to value.

    Examples:
        >>> m = ood_metrics([4.0, 3.0, 2.0, 1.0], [2.5, 0.0], tpr=0.75)
        >>> {k: round(v, 4) for k, v in m.items()}
        {'auroc': 0.75, 'fpr75': 0.5, 'aupr_in': 0.8875, 'aupr_out': 0.75, 'detection_error': 0.25}
    """
    tpr = check_fraction("tpr", tpr)
    check_choice("positive", positive, POSITIVES)
    check_choice("rule", rule, FPR_RULES)
    counts = _prepare(id_scores, ood_scores)
    return {
        "auroc": _auroc(counts),
        f"fpr{round(100 * tpr, 6):g}": _fpr_at_tpr(counts, tpr, positive, rule),
        "aupr_in": _aupr(counts, "id"),
        "aupr_out": _aupr(counts, "ood"),
        "detection_error": _detection_error(counts),
    }
