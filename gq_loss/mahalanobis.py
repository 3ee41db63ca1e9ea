r"""[`MahalanobisScore`][gq_loss.MahalanobisScore]: class-conditional Gaussians with a tied
covariance on a model's features (Lee et al., 2018), as a [`Detector`][gq_loss.Detector]."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ._detection import Detector, NotFittedError, eval_mode, labelled_pair, placement
from ._validation import check_nonnegative, check_optional_int

__all__ = ["PINV_RTOL", "MahalanobisScore"]

#: Eigenvalues of the (ridged) covariance below this share of the largest one count as zero.
PINV_RTOL = 1e-10

Data = Tensor | tuple[Tensor, ...] | list[Tensor] | Iterable[Any]


class MahalanobisScore(Detector):
    r"""Class-conditional Gaussians with a tied covariance on designated features.

    Fitted on labelled in-distribution training data (Lee et al., 2018, without their input
    preprocessing or layer ensemble):

    $$ \mu_c = \frac{1}{n_c} \sum_{i: y_i = c} \phi(x_i), \qquad
       \Sigma = \frac{1}{n} \sum_i (\phi(x_i) - \mu_{y_i})(\phi(x_i) - \mu_{y_i})^\top $$

    $$ s(x) = -\min_c\, (\phi(x) - \mu_c)^\top P\, (\phi(x) - \mu_c), \qquad
       P = (\Sigma + \rho I)^{+} $$

    with ``ρ = ridge`` and ``+`` the pseudo-inverse (eigenvalues below ``PINV_RTOL`` times the
    largest count as zero), so singular covariances (more features than samples, dead ReLUs)
    work. Statistics are accumulated in float64 batch by batch (pairwise mean/scatter merging,
    no second pass over the data).

    Features ``φ(x)`` come from exactly one of:

    * ``feature_fn``: any callable ``(B, ...) -> (B, D)`` (more dims are flattened);
    * ``layer``: the name of a submodule of ``model`` (as in ``model.named_modules()``); a
      forward hook records its output during ``model(x)`` and is removed afterwards. If the
      submodule runs several times in one forward, its last output is used.

    When ``model`` is given, every call runs it in eval mode (each submodule's mode restored
    afterwards), and inputs are moved to the device and cast to the floating dtype of its first
    floating parameter. Everything runs under ``torch.no_grad()``.

    It follows the [`Detector`][gq_loss.Detector] protocol: `fit` first (before it, `score`,
    `calibrate` and `predict` raise [`NotFittedError`][gq_loss.NotFittedError]), then `score`,
    `calibrate` and `predict`. The class `predict` returns is the nearest class mean
    ``argmin_c`` of the distance above (the generative classifier of Lee et al.), so it needs no
    logits.

    Relation to pytorch-ood's ``Mahalanobis(encoder, eps)`` (read from its code): for features
    ``(B, D)`` its outlier score is ``½ min_c dᵀ (S + eps·I)⁻¹ d`` with the scatter matrix
    ``S = n Σ`` (not divided by ``n``), so this score is ``−2n`` times theirs at
    ``ridge = eps / n`` (e.g. ``1e-6 / n``). For feature maps ``(B, C, H, W)`` they average over
    space, while this class flattens.

    Args:
        model: The classifier; required with ``layer``, optional with ``feature_fn``.
        layer: Name of the submodule whose output is the feature.
        feature_fn: Callable mapping inputs ``(B, ...)`` to features ``(B, D)``.
        ridge: ``ρ >= 0`` added to the covariance diagonal before inversion. Default: ``0.0``.
        num_classes: Number of classes ``C``; default: largest label seen plus one. Every
            class must have samples.
        ood_label: Label `predict` returns for rejected inputs. Default: ``-1``.
        batch_size: Split tensor inputs into chunks of this many samples. Default: whole tensor.
        progress: Show a tqdm progress bar over batches (needs tqdm). Default: ``False``.

    Attributes:
        means_: Class means ``(C, D)``, float64 (after `fit`).
        covariance_: Tied covariance ``(D, D)``, float64.
        precision_: ``P``, ``(D, D)``, float64.
        class_counts_: Samples per class ``(C,)``, int64.
        threshold: Set by `calibrate` (``None`` before).

    Examples:
        >>> x = torch.tensor([[0.0, 0], [2, 0], [0, 2], [2, 2], [10, 10], [12, 10], [10, 12],
        ...                   [12, 12]])
        >>> y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
        >>> maha = MahalanobisScore(feature_fn=lambda t: t).fit((x, y))
        >>> maha.score(torch.tensor([[1.0, 3.0], [5.5, 5.5]])).tolist()
        [-4.0, -40.5]
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> MahalanobisScore(net, layer="1").fit((x, y)).score(x).shape
        torch.Size([8])
        >>> maha.calibrate(x, tpr=1.0).predict(torch.tensor([[1.0, 1], [11, 11], [30, 0]]))
        tensor([ 0,  1, -1])
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        layer: str | None = None,
        feature_fn: Callable[[Tensor], Tensor] | None = None,
        ridge: float = 0.0,
        num_classes: int | None = None,
        ood_label: int = -1,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(
                f"`model` must be a torch.nn.Module or None, got {type(model).__name__}"
            )
        super().__init__(model, ood_label=ood_label, batch_size=batch_size, progress=progress)
        if (layer is None) == (feature_fn is None):
            raise ValueError(
                "pass exactly one of `feature_fn` or `layer`, got "
                f"feature_fn={feature_fn!r}, layer={layer!r}"
            )
        self._module: nn.Module | None = None
        if layer is not None:
            if not isinstance(layer, str):
                raise TypeError(f"`layer` must be a submodule name (str), got {layer!r}")
            if model is None:
                raise ValueError(f"`layer={layer!r}` needs `model`, got model=None")
            modules = dict(model.named_modules())
            if layer not in modules:
                names = [n for n in modules if n][:10]
                raise ValueError(f"`layer` {layer!r} is not a submodule of `model`; some: {names}")
            self._module = modules[layer]
        if feature_fn is not None and not callable(feature_fn):
            raise TypeError(f"`feature_fn` must be callable, got {type(feature_fn).__name__}")
        self.layer = layer
        self.feature_fn = feature_fn
        self.ridge = check_nonnegative("ridge", ridge)
        self.num_classes = check_optional_int("num_classes", num_classes)
        self.means_: Tensor | None = None
        self.covariance_: Tensor | None = None
        self.precision_: Tensor | None = None
        self.class_counts_: Tensor | None = None

    # ------------------------------------------------------------------ features

    def features(self, inputs: Tensor) -> Tensor:
        """Features of one batch: inputs ``(B, ...)`` -> ``(B, D)`` float64, no graph."""
        if not isinstance(inputs, Tensor):
            raise TypeError(f"`inputs` must be a torch.Tensor, got {type(inputs).__name__}")
        model, captured, handle = self.model, [], None
        if model is not None:
            device, dtype = placement(model, inputs)
            inputs = inputs.to(device=device, dtype=dtype)
        try:
            with eval_mode(model), torch.no_grad():
                if self._module is not None:
                    assert model is not None  # set together in __init__
                    handle = self._module.register_forward_hook(
                        lambda _m, _i, out: captured.append(out)
                    )
                    model(inputs)
                    if not captured:
                        raise RuntimeError(f"`layer` {self.layer!r} did not run in model(inputs)")
                    feats = captured[-1]
                else:
                    assert self.feature_fn is not None
                    feats = self.feature_fn(inputs)
        finally:
            if handle is not None:
                handle.remove()
        source = f"`layer` {self.layer!r}" if self.layer is not None else "`feature_fn`"
        if not isinstance(feats, Tensor):
            raise TypeError(f"{source} must produce a Tensor, got {type(feats).__name__}")
        if feats.ndim < 2 or feats.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"{source} must produce features (B, D) with B={inputs.shape[0]}, "
                f"got shape {tuple(feats.shape)}"
            )
        return feats.detach().flatten(1).to(torch.float64)

    # ------------------------------------------------------------------ fit / score

    def fit(self, data: Data) -> MahalanobisScore:
        """Estimate class means and the tied covariance from labelled ID data.

        Args:
            data: ``(inputs, labels)`` with inputs ``(B, ...)`` and int labels ``(B,)``, or an
                iterable of such batches (e.g. a ``DataLoader``).

        Returns:
            ``self``, fitted.
        """
        count = mean = scatter = None
        for inputs, labels in _labelled_batches(data):
            feats = self.features(inputs)
            labels = _check_labels(labels, feats.shape[0]).to(feats.device)
            if feats.shape[0] == 0:
                continue
            size = int(labels.max()) + 1
            if self.num_classes is not None:
                if size > self.num_classes:
                    raise ValueError(
                        f"`labels` must be < num_classes={self.num_classes}, got {size - 1}"
                    )
                size = self.num_classes
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
        if count is None or mean is None or scatter is None:
            raise ValueError("`data` must contain at least one sample, got none")
        empty = torch.nonzero(count == 0).flatten().tolist()
        if empty:
            raise ValueError(f"every class needs samples to fit; classes {empty} have none")
        covariance = scatter / count.sum()
        self.means_ = mean
        self.covariance_ = covariance
        self.precision_ = _pinv_psd(covariance, self.ridge)
        self.class_counts_ = count.to(torch.int64)
        return self

    def _check_fitted(self) -> None:
        if self.means_ is None or self.precision_ is None:
            raise NotFittedError("MahalanobisScore is not fitted: call `fit(id_train_data)` first")

    def _score_batch(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Scores ``(B,)`` float64 ``<= 0`` and the nearest class ``(B,)``."""
        assert self.means_ is not None and self.precision_ is not None
        feats = self.features(inputs)
        means, precision = self.means_.to(feats.device), self.precision_.to(feats.device)
        if feats.shape[1] != means.shape[1]:
            raise ValueError(
                f"features have size {feats.shape[1]}, but the score was fitted on {means.shape[1]}"
            )
        # centre on the mean of the class means: the expansion below then cancels less
        centre = means.mean(dim=0)
        f, m = feats - centre, means - centre
        pm = m @ precision
        dist = (
            ((f @ precision) * f).sum(1, keepdim=True) - 2.0 * f @ pm.T + (pm * m).sum(1)
        )  # (B, C)
        nearest = dist.min(dim=1)
        return -nearest.values.clamp(min=0.0), nearest.indices


def _pinv_psd(covariance: Tensor, ridge: float) -> Tensor:
    """Pseudo-inverse of ``covariance + ridge * I`` (symmetric PSD) via its eigenvectors."""
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    evals, evecs = torch.linalg.eigh(covariance + ridge * eye)
    keep = evals > PINV_RTOL * evals.max().clamp(min=0.0)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, 1.0), 0.0)
    return (evecs * inv) @ evecs.T


def _check_labels(labels: Any, batch: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        what = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"`labels` must be an integer tensor (B,), got {what}")
    if labels.ndim != 1 or labels.shape[0] != batch:
        raise ValueError(f"`labels` must have shape ({batch},), got {tuple(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"`labels` must be >= 0, got {int(labels.min())}")
    return labels.long()


def _labelled_batches(data: Data) -> Iterator[tuple[Tensor, Any]]:
    if isinstance(data, Tensor):
        raise TypeError("`data` needs labels: pass (inputs, labels) or batches of them")
    if labelled_pair(data):
        yield data[0], data[1]  # type: ignore[index]
        return
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(
                f"each batch of `data` must be (inputs, labels, ...), got {type(batch).__name__}"
            )
        yield batch[0], batch[1]
