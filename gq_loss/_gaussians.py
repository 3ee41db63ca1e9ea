r"""Class-conditional Gaussians with a tied covariance, the statistics of
[`MahalanobisDetector`][gq_loss.MahalanobisDetector]: estimated in one streaming pass
(`ClassGaussians`), inverted (`pinv_psd`), scored (`nearest_class`) and checked when loaded
(`check_gaussians`). Pure tensor code: no model, no detector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

#: Eigenvalues of the (ridged) covariance below this share of the largest one count as zero.
PINV_RTOL = 1e-10


class ClassGaussians:
    r"""Per-class running means and the shared covariance of features, batch by batch.

    $$ \mu_c = \frac{1}{n_c} \sum_{i: y_i = c} \phi_i, \qquad
       \Sigma = \frac{1}{n} \sum_i (\phi_i - \mu_{y_i})(\phi_i - \mu_{y_i})^\top $$

    Each batch's class counts, means and within-class scatter are merged into the running ones
    class by class (Chan et al.'s pairwise update), so no second pass over the data is needed
    and nothing cancels as ``E[φφᵀ] - μμᵀ`` would. The number of classes grows with the labels
    seen, up to ``num_classes`` when it is given.

    Args:
        num_classes: Number of classes ``C``; ``None``: the largest label seen plus one.

    Examples:
        >>> stats = ClassGaussians()
        >>> stats.update(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 0]))
        >>> stats.update(torch.tensor([[10.0, 2.0], [12.0, 2.0]]), torch.tensor([1, 1]))
        >>> counts, means, covariance = stats.result()
        >>> counts.tolist(), means.tolist(), covariance.tolist()
        ([2, 2], [[1.0, 0.0], [11.0, 2.0]], [[1.0, 0.0], [0.0, 0.0]])
    """

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes
        self.count: Tensor | None = None  # (C,), in the features' dtype
        self.mean: Tensor | None = None  # (C, D)
        self.scatter: Tensor | None = None  # (D, D), summed over the samples

    def update(self, feats: Tensor, labels: Tensor) -> None:
        """Merge one batch: features ``(B, D)`` (float64) and labels ``(B,)`` (int64 ``>= 0``,
        on the features' device), ``B >= 1``.

        Raises:
            ValueError: A label is ``>= num_classes``, or ``D`` differs from earlier batches.
        """
        size = int(labels.max()) + 1
        if self.num_classes is not None:
            if size > self.num_classes:
                raise ValueError(
                    f"`labels` must be < num_classes={self.num_classes}, got {size - 1}"
                )
            size = self.num_classes
        count, mean, scatter = self.count, self.mean, self.scatter
        if count is None or mean is None or scatter is None:
            dim = feats.shape[1]
            count = feats.new_zeros(size)
            mean = feats.new_zeros(size, dim)
            scatter = feats.new_zeros(dim, dim)
        elif feats.shape[1] != mean.shape[1]:
            raise ValueError(f"features changed size from {mean.shape[1]} to {feats.shape[1]}")
        if size > count.shape[0]:  # labels grow as batches arrive
            grow = size - count.shape[0]
            count = torch.cat([count, count.new_zeros(grow)])
            mean = torch.cat([mean, mean.new_zeros(grow, mean.shape[1])])
        n_b = torch.bincount(labels, minlength=count.shape[0]).to(feats.dtype)
        sums = feats.new_zeros(mean.shape).index_add_(0, labels, feats)
        mean_b = sums / n_b.clamp(min=1).unsqueeze(1)
        centered = feats - mean_b[labels]
        scatter += centered.T @ centered
        # Chan et al. merge of (count, mean, scatter) with this batch, class by class
        delta = mean_b - mean
        weight = count * n_b / (count + n_b).clamp(min=1)
        scatter += (delta * weight.unsqueeze(1)).T @ delta
        mean += delta * (n_b / (count + n_b).clamp(min=1)).unsqueeze(1)
        count += n_b
        self.count, self.mean, self.scatter = count, mean, scatter

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """Class counts ``(C,)`` int64, means ``(C, D)`` and the covariance ``(D, D)``.

        Raises:
            ValueError: No sample was seen, or a class has none.
        """
        count, mean, scatter = self.count, self.mean, self.scatter
        if count is None or mean is None or scatter is None:
            raise ValueError("`id_train_data` must contain at least one sample, got none")
        empty = torch.nonzero(count == 0).flatten().tolist()
        if empty:
            raise ValueError(f"every class needs samples to fit; classes {empty} have none")
        return count.to(torch.int64), mean, scatter / count.sum()


def pinv_psd(covariance: Tensor, ridge: float) -> Tensor:
    """Pseudo-inverse of ``covariance + ridge * I`` (symmetric PSD) via its eigenvectors;
    eigenvalues below `PINV_RTOL` times the largest count as zero."""
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    evals, evecs = torch.linalg.eigh(covariance + ridge * eye)
    keep = evals > PINV_RTOL * evals.max().clamp(min=0.0)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, 1.0), 0.0)
    return (evecs * inv) @ evecs.T


def nearest_class(feats: Tensor, means: Tensor, precision: Tensor) -> tuple[Tensor, Tensor]:
    """The smallest squared Mahalanobis distance ``(B,)`` (``>= 0``) of features ``(B, D)`` to
    the class means ``(C, D)`` under ``precision`` ``(D, D)``, and that class ``(B,)``."""
    # centre on the mean of the class means: the expansion below then cancels less
    centre = means.mean(dim=0)
    f, m = feats - centre, means - centre
    pm = m @ precision
    dist = ((f @ precision) * f).sum(1, keepdim=True) - 2.0 * f @ pm.T + (pm * m).sum(1)  # (B, C)
    nearest = dist.min(dim=1)
    return nearest.values.clamp(min=0.0), nearest.indices


def check_gaussians(names: Sequence[str], values: Sequence[Any]) -> list[Tensor] | None:
    """Loaded ``means_``, ``covariance_``, ``precision_`` and ``class_counts_`` (named by
    ``names``) validated: float64 ``(C, D)``, ``(D, D)``, ``(D, D)``, finite, and int64 ``(C,)``
    ``>= 1``, as copies; ``None`` where all are ``None`` (a state saved before `fit`)."""
    if all(v is None for v in values):
        return None
    if not all(isinstance(v, Tensor) for v in values):
        raise TypeError(
            f"`state_dict` must hold tensors (or all None) for {list(names)}, got "
            f"{[type(v).__name__ for v in values]}"
        )
    means = values[0]
    c, d = means.shape if means.ndim == 2 else (-1, -1)
    expected = [
        (torch.float64, (c, d)),
        (torch.float64, (d, d)),
        (torch.float64, (d, d)),
        (torch.int64, (c,)),
    ]
    got = [(v.dtype, tuple(v.shape)) for v in values]
    if c < 1 or got != expected:
        raise ValueError(
            f"`state_dict` must hold {list(names)} as float64 (C, D), (D, D), (D, D) and "
            f"int64 (C,), got {[(str(t), s) for t, s in got]}"
        )
    bad = [n for n, v in zip(names[:3], values[:3], strict=True) if not v.isfinite().all()]
    if bad:
        raise ValueError(
            f"`state_dict` holds NaN or inf in {bad}: every distance would be NaN and "
            "`predict` would reject every input; save the state of a detector fitted on "
            "finite features"
        )
    if int(values[3].min()) < 1:
        raise ValueError(
            f"`state_dict['class_counts_']` must be >= 1 for every class (a fit needs samples "
            f"of each), got {values[3].tolist()}"
        )
    return [v.detach().clone() for v in values]
