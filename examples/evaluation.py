"""The evaluation pipeline shared by the example scripts and the reproduction study.

- :func:`logits_in_batches` -- a model's logits over a tensor of images, without a graph
- :func:`score_methods` -- every detection score (ODIN, MSP, energy; higher = more ID) of a set
- :func:`metric_rows` -- one row per (method, OOD set) plus a mean row per method, in %
- :func:`markdown_table`, :func:`write_csv` -- the rows as a Markdown table / CSV file
- :func:`predicted_class_gradient_norms` -- the per-sample quantity of the paper's Fig. 1
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gq_loss import ODINDetector, class_gradient_norms, energy_score, msp_score
from gq_loss.metrics import ood_metrics

#: Detection scores every script can compute from the model alone (no fitting).
DETECTION_METHODS = ("ODIN", "MSP", "energy")
#: ``ood_metrics`` keys and their column titles.
METRICS = (("auroc", "AUROC"), ("fpr95", "FPR95"), ("aupr_in", "AUPR-In"), ("aupr_out", "AUPR-Out"))


@torch.no_grad()
def logits_in_batches(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """``model(x)`` in batches of ``batch_size``, on ``x``'s device, detached: ``(n, N)``."""
    if len(x) == 0:
        return model(x)
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def score_methods(
    model: nn.Module,
    x: Tensor,
    *,
    methods: Sequence[str] = DETECTION_METHODS,
    temperature: float = 1000.0,
    epsilon: float = 0.001,
    batch_size: int = 500,
    progress: bool = False,
    return_logits: bool = False,
) -> Any:
    """Scores ``{method: (n,)}`` of the images ``x`` (higher = more in-distribution).

    ODIN uses ``temperature`` and ``epsilon`` (in the [0, 1] pixel units of ``x``); MSP and
    energy are computed from the plain logits. With ``return_logits``, returns
    ``(scores, logits)``; the model is left in eval mode.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> scores = score_methods(model, torch.rand(4, 3, 2, 2))
        >>> sorted(scores), scores["ODIN"].shape
        (['MSP', 'ODIN', 'energy'], torch.Size([4]))
    """
    unknown = [m for m in methods if m not in DETECTION_METHODS]
    if unknown:
        raise ValueError(f"`methods` must be drawn from {DETECTION_METHODS}, got {unknown}")
    model.eval()
    logits = logits_in_batches(model, x, batch_size)
    scores: dict[str, Tensor] = {}
    for m in methods:
        if m == "ODIN":
            detector = ODINDetector(
                model, temperature=temperature, epsilon=epsilon, batch_size=batch_size,
                progress=progress,
            )  # fmt: skip
            scores[m] = detector.score(x).cpu()
        elif m == "MSP":
            scores[m] = msp_score(logits).cpu()
        else:
            scores[m] = energy_score(logits).cpu()
    return (scores, logits) if return_logits else scores


def metric_rows(
    id_scores: dict[str, Tensor],
    ood_scores: dict[str, dict[str, Tensor]],
    *,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per method and OOD set (``method``, ``ood``, metrics in %) and a ``mean`` row per
    method over the OOD sets; ``extra`` columns (e.g. ``accuracy``) are copied into every row.

    Args:
        id_scores: ``{method: (n_id,)}``.
        ood_scores: ``{ood set: {method: (n_ood,)}}``.
    """
    rows: list[dict[str, Any]] = []
    for method in id_scores:
        block = []
        for name, scores in ood_scores.items():
            m = ood_metrics(id_scores[method], scores[method])
            block.append({"method": method, "ood": name} | {k: 100 * m[k] for k, _ in METRICS})
        if len(block) > 1:
            mean = {k: sum(r[k] for r in block) / len(block) for k, _ in METRICS}
            block.append({"method": method, "ood": "mean"} | mean)
        rows += [r | (extra or {}) for r in block]
    return rows


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows``; ``columns`` are ``(key, title)``; floats get 2 decimals."""

    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(t for _, t in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
    """``rows`` as CSV with the union of their keys as header (first-seen order)."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def predicted_class_gradient_norms(
    model: nn.Module, x: Tensor, *, temperature: float = 1000.0
) -> Tensor:
    """Fig. 1 of the paper: ``||∇x log S_ŷ(x; T)||_1`` per sample, ``(n,)``, ŷ the prediction."""
    model.eval()
    pred = logits_in_batches(model, x).argmax(1, keepdim=True)
    norms = class_gradient_norms(
        model, x, operand="log_softmax", temperature=temperature, classes=pred
    )
    return norms[:, 0].detach()
