"""The evaluation pipeline shared by the example scripts and the reproduction study.

- :func:`score_methods` -- every detection score of a set of images (higher = more ID), in
  batches, optionally with the logits and the paper's Fig. 1 gradient norms
- :func:`metric_rows` -- one row per (method, OOD set) plus a ``mean`` row per method
- :func:`method_tables` -- those rows as one Markdown table per method (the paper's layout)
- :func:`write_results` -- ``results.csv`` and ``results.md`` in an output folder
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from train_utils import progress

from gq_loss import ODINDetector, class_gradient_norms, energy_score, msp_score
from gq_loss.metrics import ood_metrics

#: Detection scores computed from the model alone (no fitting), in report order.
DETECTION_METHODS = ("ODIN", "MSP", "energy")
#: ``ood_metrics`` keys shown in the tables, and their titles.
METRICS = (("auroc", "AUROC"), ("fpr95", "FPR95"), ("aupr_in", "AUPR-In"), ("aupr_out", "AUPR-Out"))


@dataclass
class ScoredSet:
    """What :func:`score_methods` computed for one set, on the CPU, in input order."""

    scores: dict[str, Tensor]  # method -> (n,)
    logits: Tensor  # (n, N)
    grad_norms: Tensor | None = None  # (n,) paper Fig. 1, if asked for
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def logits_in_batches(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """``model(x)`` in batches of ``batch_size``, detached: ``(n, N)``."""
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
    device: torch.device | str | None = None,
    extra: dict[str, Callable[[Tensor], Tensor]] | None = None,
    grad_norms: bool = False,
    show_progress: bool = False,
    desc: str = "score",
    return_logits: bool = False,
) -> Any:
    """Score the images ``x`` ``(n, C, H, W)`` with every method (higher = more in-distribution).

    ODIN uses ``temperature`` and ``epsilon`` (in the pixel units of ``x``); MSP and energy the
    plain logits; ``extra`` maps more method names to batch scorers (e.g. a fitted
    ``MahalanobisDetector.score``). With ``grad_norms``, also computes the paper's Fig. 1 quantity
    ``||∇x log S_ŷ(x; T)||_1`` at the predicted class ŷ. The model is put in eval mode.

    Returns:
        ``{method: (n,)}`` on the CPU; ``(scores, logits)`` with ``return_logits``; a
        :class:`ScoredSet` with ``grad_norms``.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> scores = score_methods(model, torch.rand(4, 3, 2, 2))
        >>> sorted(scores), scores["ODIN"].shape
        (['MSP', 'ODIN', 'energy'], torch.Size([4]))
    """
    unknown = [m for m in methods if m not in DETECTION_METHODS]
    if unknown:
        raise ValueError(f"`methods` must be drawn from {DETECTION_METHODS}, got {unknown}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    odin = ODINDetector(model, temperature=temperature, epsilon=epsilon)
    parts: dict[str, list[Tensor]] = {m: [] for m in (*methods, *(extra or {}))}
    logit_parts, norm_parts = [], []
    for xb in progress(x.split(batch_size), enabled=show_progress, desc=desc, leave=False):
        xb = xb.to(device)
        with torch.no_grad():
            logits = model(xb)
        for m in parts:
            if m == "ODIN":
                s = odin.score(xb)
            elif m == "MSP":
                s = msp_score(logits)
            elif m == "energy":
                s = energy_score(logits)
            else:
                s = extra[m](xb)  # type: ignore[index]
            parts[m].append(s.detach().cpu())
        logit_parts.append(logits.cpu())
        if grad_norms:  # only the predicted class's column
            norms = class_gradient_norms(model, xb, operand="log_softmax",
                                         temperature=temperature, classes=logits.argmax(1, keepdim=True))  # fmt: skip
            norm_parts.append(norms[:, 0].detach().cpu())
    empty = torch.empty(0)
    scores = {m: torch.cat(v) if v else empty for m, v in parts.items()}
    all_logits = torch.cat(logit_parts) if logit_parts else empty
    if grad_norms:
        return ScoredSet(scores, all_logits, torch.cat(norm_parts) if norm_parts else empty)
    return (scores, all_logits) if return_logits else scores


def metric_rows(
    id_scores: dict[str, Tensor],
    ood_scores: dict[str, dict[str, Tensor]],
    *,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per method and OOD set, then a ``mean`` row per method (metrics as fractions).

    Args:
        id_scores: ``{method: (n_id,)}``.
        ood_scores: ``{OOD set: {method: (n_ood,)}}``.
        extra: Columns copied into every row, first (e.g. ``{"model": "CE"}``).

    Returns:
        Rows with ``method``, ``ood_set``, every key of ``ood_metrics``, ``n_id`` and ``n_ood``
        (the ``mean`` row averages the metrics and sums ``n_ood``).
    """
    rows: list[dict[str, Any]] = []
    for method, s_id in id_scores.items():
        block = [
            {"method": method, "ood_set": name, **ood_metrics(s_id, sets[method]),
             "n_id": len(s_id), "n_ood": len(sets[method])}
            for name, sets in ood_scores.items()
        ]  # fmt: skip
        keys = [k for k in block[0] if k not in ("method", "ood_set", "n_id", "n_ood")]
        mean = {k: sum(r[k] for r in block) / len(block) for k in keys}
        block.append({"method": method, "ood_set": "mean", **mean, "n_id": len(s_id),
                      "n_ood": sum(r["n_ood"] for r in block)})  # fmt: skip
        rows += [(extra or {}) | r for r in block]
    return rows


def method_tables(rows: Sequence[dict[str, Any]]) -> str:
    """One Markdown table per method: OOD sets (with their size) x AUROC/FPR95/AUPR, in %."""
    lines: list[str] = []
    for method in dict.fromkeys(r["method"] for r in rows):
        lines += ["", f"## {method}", "", "| OOD set | " + " | ".join(t for _, t in METRICS) + " |"]
        lines.append("|---|" + "---:|" * len(METRICS))
        for r in (r for r in rows if r["method"] == method):
            name = "**mean**" if r["ood_set"] == "mean" else f"{r['ood_set']} (n={r['n_ood']})"
            lines.append(
                f"| {name} | " + " | ".join(f"{100 * r[k]:.2f}" for k, _ in METRICS) + " |"
            )
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, rows: Sequence[dict[str, Any]], markdown: str) -> None:
    """``rows`` to ``out_dir/results.csv`` (header from the first row), ``markdown`` to
    ``out_dir/results.md``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown)
