r"""[`MahalanobisDetector`][gq_loss.MahalanobisDetector]: class-conditional Gaussians with a
tied covariance on a model's features (Lee et al., 2018), as a [`Detector`][gq_loss.Detector]."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._capture import capture_output
from ._detector import BatchResult, Detector, NotFittedError
from ._gaussians import PINV_RTOL, ClassGaussians, check_gaussians, nearest_class, pinv_psd
from ._runtime import (
    Model,
    OutputSpec,
    call_model,
    check_model,
    eval_mode,
    float64,
    is_exported,
    place_inputs,
    select_output,
    unwrap_ddp,
)
from ._settings import Setting, check_ood_label
from ._validation import check_nonnegative, check_optional_int

__all__ = ["PINV_RTOL", "MahalanobisDetector"]

Data = Tensor | tuple[Tensor, ...] | list[Tensor] | Iterable[Any]
FeatureFn = Callable[[Tensor], Any]


def _check_optional_model(name: str, value: Any) -> Model | None:
    return None if value is None else check_model(name, value)


def _check_layer(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"`{name}` must be a submodule name (str) or None, got {value!r}")
    return value


def _check_feature_fn(name: str, value: Any) -> FeatureFn | None:
    if value is not None and not callable(value):
        raise TypeError(f"`{name}` must be callable or None, got {type(value).__name__}")
    return value


class MahalanobisDetector(Detector):
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
    no second pass over the data); on a device without float64 (MPS) that work runs on the CPU,
    the rule of every score.

    Features ``φ(x)`` come from exactly one of:

    * ``feature_fn``: any callable ``(B, ...) -> (B, D)`` (more dims are flattened);
    * ``layer``: the name of a submodule of ``model`` (as in ``model.named_modules()``); a
      forward hook copies its output (in float64) at the moment the submodule returns it, so
      in-place operations later in the forward (``ReLU(inplace=True)``, a residual ``+=``) do
      not change the features; the hook records only the forward of the thread that placed
      it (other threads may score with the same model at the same time) and is removed
      afterwards. If the submodule runs several times in one forward, its last output is used.

    ``output`` names the features in what the layer (or ``feature_fn``) returns when that is not
    a tensor: a key, an attribute, a tuple index or a callable, as for
    [`odin_score`][gq_loss.odin_score]. The model's own output is not used. In transformers 5.x
    (checked on 5.25) an encoder layer (``"vit.layers.0"``, ``"bert.encoder.layer.0"``) and the
    final LayerNorm (``"vit.layernorm"``) return a tensor ``(B, L, D)``, which is flattened
    (``output=lambda h: h[:, 0]`` keeps the class token); a base model or encoder (``"vit"``,
    ``"bert.encoder"``) returns a ``ModelOutput``: name its field, e.g.
    ``output="last_hidden_state"``; ``"bert.pooler"`` returns ``(B, D)``.

    When ``model`` is an ``nn.Module``, every call runs it in eval mode (each submodule's mode
    restored afterwards), and inputs are moved to the device and cast to the floating dtype of
    its first floating parameter; a plain callable (with ``feature_fn``) gets the inputs as they
    are. Everything runs under ``torch.no_grad()``.

    It follows the [`Detector`][gq_loss.Detector] protocol: `fit` first (before it, `score`,
    `calibrate` and `predict` raise [`NotFittedError`][gq_loss.NotFittedError]), then `score`,
    `calibrate` and `predict`. Every argument is a public attribute, validated on assignment;
    assigning one that changes the features or the score (``model``, ``layer``,
    ``feature_fn``, ``output``, ``ridge``, ``num_classes``) drops the fit and the threshold, and
    a new `fit` drops the threshold. The class `predict` returns is the nearest class mean
    ``argmin_c`` of the distance above (the generative classifier of Lee et al.), so it needs no
    logits.

    Relation to pytorch-ood's ``Mahalanobis(encoder, eps)`` (read from its code): for features
    ``(B, D)`` its outlier score is ``½ min_c dᵀ (S + eps·I)⁻¹ d`` with the scatter matrix
    ``S = n Σ`` (not divided by ``n``), so this score is ``−2n`` times theirs at
    ``ridge = eps / n`` (e.g. ``1e-6 / n``). For feature maps ``(B, C, H, W)`` they average over
    space, while this class flattens.

    Args:
        model: The classifier (an ``nn.Module``, required with ``layer``; or a callable), or
            ``None`` with ``feature_fn``.
        layer: Name of the submodule whose output is the feature.
        feature_fn: Callable mapping inputs ``(B, ...)`` to features ``(B, D)``.
        ridge: ``ρ >= 0`` added to the covariance diagonal before inversion. Default: ``0.0``.
        num_classes: Number of classes ``C``; default: largest label seen plus one. Every
            class must have samples. ``ood_label`` must lie outside ``[0, C)``.
        output: Names the features in the output of ``layer`` / ``feature_fn`` (see above).
            Default: ``None`` (a tensor).
        ood_label: Label `predict` returns for rejected inputs. Default: ``-1``.
        batch_size: Split tensor inputs into chunks of this many samples. Default: whole tensor.
        input_key: Key of the inputs in dict batches, as for [`Detector`][gq_loss.Detector].
            Default: ``"pixel_values"``.
        progress: Show a tqdm progress bar over batches (needs tqdm). Default: ``False``.

    Attributes:
        means_: Class means ``(C, D)``, float64 (after `fit`; ``None`` before).
        covariance_: Tied covariance ``(D, D)``, float64.
        precision_: ``P``, ``(D, D)``, float64.
        class_counts_: Samples per class ``(C,)``, int64.
        threshold_: Set by `calibrate` (``None`` before).

    Examples:
        >>> x = torch.tensor([[0.0, 0], [2, 0], [0, 2], [2, 2], [10, 10], [12, 10], [10, 12],
        ...                   [12, 12]])
        >>> y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
        >>> maha = MahalanobisDetector(feature_fn=lambda t: t).fit((x, y))
        >>> maha.score(torch.tensor([[1.0, 3.0], [5.5, 5.5]])).tolist()
        [-4.0, -40.5]
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> MahalanobisDetector(net, layer="1").fit(id_train_data=(x, y)).score(x).shape
        torch.Size([8])
        >>> maha.calibrate(x, tpr=1.0).predict(torch.tensor([[1.0, 1], [11, 11], [30, 0]]))
        tensor([ 0,  1, -1])
    """

    _desc = "Mahalanobis"
    _fitted = ("threshold_", "means_", "covariance_", "precision_", "class_counts_")
    model: Setting[Model | None] = Setting(_check_optional_model)  # type: ignore[assignment]
    layer: Setting[str | None] = Setting(_check_layer)
    feature_fn: Setting[FeatureFn | None] = Setting(_check_feature_fn)
    ridge: Setting[float] = Setting(check_nonnegative)
    num_classes: Setting[int | None] = Setting(check_optional_int)

    def __init__(
        self,
        model: Model | None = None,
        *,
        layer: str | None = None,
        feature_fn: FeatureFn | None = None,
        ridge: float = 0.0,
        num_classes: int | None = None,
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
        self.layer = layer
        self.feature_fn = feature_fn
        self.ridge = ridge
        self.num_classes = num_classes
        check_source(self.model, self.layer, self.feature_fn)
        check_ood_label(self.ood_label, self.num_classes)
        self.__dict__["_ready"] = True

    def _check_setting(self, name: str, value: Any) -> None:
        """After construction, the feature source must stay consistent on every assignment, and
        ``ood_label`` must not be a class where the number of classes is known."""
        if not self.__dict__.get("_ready"):
            return
        if name == "ood_label":
            fitted = None if self.means_ is None else self.means_.shape[0]
            check_ood_label(value, self.num_classes or fitted)
        elif name == "num_classes":
            check_ood_label(self.ood_label, value)
        if name not in ("model", "layer", "feature_fn"):
            return
        current = {n: getattr(self, n) for n in ("model", "layer", "feature_fn")}
        current[name] = value
        check_source(**current)

    def _invalidate(self, setting: str | None = None) -> None:
        """Drop the fit and the threshold: a setting that changes the features was assigned."""
        super()._invalidate(setting)
        self.means_: Tensor | None = None
        self.covariance_: Tensor | None = None
        self.precision_: Tensor | None = None
        self.class_counts_: Tensor | None = None

    # ------------------------------------------------------------------ features

    def features(self, inputs: Tensor) -> Tensor:
        """Features of one batch: inputs ``(B, ...)`` -> ``(B, D)`` float64, no graph; on the
        device of the features, or on the CPU where that device has no float64 (MPS)."""
        return features_of(self.model, self.layer, self.feature_fn, self.output, inputs)

    # ------------------------------------------------------------------ fit / score

    def fit(self, id_train_data: Data) -> MahalanobisDetector:
        """Estimate class means and the tied covariance from labelled ID data.

        Drops the threshold (and any earlier fit): call `calibrate` after it.

        Args:
            id_train_data: ``(inputs, labels)`` with inputs ``(B, ...)`` and int labels
                ``(B,)``, or an iterable of such batches (e.g. a `DataLoader`, with or without
                a length); a batch may be a dict with the inputs at `input_key` and the labels
                at ``"labels"`` (or ``"label"``), as a Hugging Face image `DataLoader` yields.

        Returns:
            ``self``, fitted.

        Raises:
            ValueError: A batch gives non-finite features (a NaN image, a model that
                overflowed), refused at that batch; a class has no samples; the data is empty.
        """
        self._invalidate()
        stats = ClassGaussians(self.num_classes)
        for index, (inputs, labels) in enumerate(_labelled_batches(id_train_data, self.input_key)):
            feats = _check_finite(self.features(inputs), index)
            labels = _check_labels(labels, feats.shape[0]).to(feats.device)
            if feats.shape[0] > 0:
                stats.update(feats, labels)
        counts, means, covariance = stats.result()
        check_ood_label(self.ood_label, means.shape[0])
        self.means_ = means
        self.covariance_ = covariance
        self.precision_ = pinv_psd(covariance, self.ridge)
        self.class_counts_ = counts
        return self

    def _check_fitted(self) -> None:
        if self.means_ is None or self.precision_ is None:
            raise NotFittedError(
                "MahalanobisDetector is not fitted: call `fit(id_train_data)` first (assigning a "
                "setting that changes the features drops the fit)"
            )

    def _checked_fitted(self, state: Mapping[str, Any]) -> dict[str, Any]:
        names = ("means_", "covariance_", "precision_", "class_counts_")
        threshold = super()._checked_fitted(state)
        checked = check_gaussians(names, [state[n] for n in names])
        fitted = dict.fromkeys(names) if checked is None else dict(zip(names, checked, strict=True))
        return {**threshold, **fitted}

    def _score_batch(self, inputs: Tensor) -> BatchResult:
        """Scores ``(B,)`` float64 ``<= 0`` and the nearest class ``(B,)``."""
        assert self.means_ is not None and self.precision_ is not None
        feats = self.features(inputs)
        means, precision = self.means_.to(feats.device), self.precision_.to(feats.device)
        if feats.shape[1] != means.shape[1]:
            raise ValueError(
                f"features have size {feats.shape[1]}, but the score was fitted on {means.shape[1]}"
            )
        distance, nearest = nearest_class(feats, means, precision)
        return -distance, nearest, means.shape[0]


def check_source(model: Any, layer: str | None, feature_fn: FeatureFn | None) -> None:
    """Refuse a feature source that is not exactly one of ``layer`` (a submodule of an
    ``nn.Module`` ``model``) or ``feature_fn``."""
    if (layer is None) == (feature_fn is None):
        raise ValueError(
            "pass exactly one of `feature_fn` or `layer`, got "
            f"feature_fn={feature_fn!r}, layer={layer!r} (to switch the feature source, "
            "build a new MahalanobisDetector)"
        )
    if layer is not None:
        if model is None:
            raise ValueError(f"`layer={layer!r}` needs `model`, got model=None")
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"`layer={layer!r}` needs `model` to be a torch.nn.Module (its submodules "
                f"are looked up by name), got {type(model).__name__}; pass `feature_fn` for "
                "a plain callable"
            )
        modules = dict(model.named_modules())
        if layer not in modules:
            names = [n for n in modules if n][:10]
            raise ValueError(f"`layer` {layer!r} is not a submodule of `model`; some: {names}")


def features_of(
    model: Model | None,
    layer: str | None,
    feature_fn: FeatureFn | None,
    output: OutputSpec | None,
    inputs: Tensor,
) -> Tensor:
    """Features ``(B, D)`` float64 of inputs ``(B, ...)`` from a checked source (`check_source`):
    the output of ``layer`` in ``model``'s forward (`capture_output`) or of ``feature_fn``, named
    by ``output``, under eval mode and ``no_grad``; see `MahalanobisDetector.features`."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"`inputs` must be a torch.Tensor, got {type(inputs).__name__}")
    source = f"`layer` {layer!r}" if layer is not None else "`feature_fn`"
    if model is not None:
        inputs = place_inputs(model, inputs)

    def copy(out: Any) -> Any:
        """The features in ``out``, copied in float64 now: later in-place operations of the
        forward must not reach them."""
        try:
            feats = select_output(out, output)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err
        return float64(feats.detach(), copy=True) if isinstance(feats, Tensor) else feats

    with eval_mode(model), torch.no_grad():
        if layer is None:
            assert feature_fn is not None
            feats = copy(feature_fn(inputs))
        else:
            assert isinstance(model, nn.Module)  # checked by check_source
            with capture_output(dict(model.named_modules())[layer], copy) as captured:
                call_model(unwrap_ddp(model), inputs)
            if not captured:
                hint = (
                    ": a torch.export module runs its graph, not its submodules; pass "
                    "`feature_fn` (e.g. an exported feature extractor)"
                    if any(is_exported(m) for m in model.modules())
                    else ""
                )
                raise RuntimeError(f"`layer` {layer!r} did not run in model(inputs){hint}")
            feats = captured[-1]
    if not isinstance(feats, Tensor):
        raise TypeError(
            f"{source} must produce a Tensor, got {type(feats).__name__}; name the features "
            "in its output with `output=` (a key, an attribute, an index or a callable)"
        )
    if feats.ndim < 2 or feats.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"{source} must produce features (B, D) with B={inputs.shape[0]}, "
            f"got shape {tuple(feats.shape)}"
        )
    return feats.flatten(1)


def _check_finite(feats: Tensor, index: int) -> Tensor:
    """``feats`` ``(B, D)`` of batch ``index`` of a fit, refused where one is NaN or inf: one
    such sample would make the mean and covariance NaN, found only after the whole data."""
    bad = ~feats.isfinite().all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        raise ValueError(
            f"`id_train_data` batch {index} (counting from 0) gives non-finite features (NaN or "
            f"inf) for {rows.numel()} of its {feats.shape[0]} samples, first at position "
            f"{int(rows[0])}: the class means and covariance would be NaN; check those inputs "
            "(a NaN or unscaled image) and the model's features for overflow"
        )
    return feats


def _check_labels(labels: Any, batch: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        what = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        hint = " (class indices: `labels.long()`)" if isinstance(labels, Tensor) else ""
        raise TypeError(f"`labels` must be an integer tensor (B,), got {what}{hint}")
    if labels.ndim != 1 or labels.shape[0] != batch:
        hint = " (`labels.squeeze(1)`)" if labels.shape == (batch, 1) else ""
        raise ValueError(f"`labels` must have shape ({batch},), got {tuple(labels.shape)}{hint}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"`labels` must be >= 0, got {int(labels.min())}")
    return labels.long()


#: Keys of the labels in dict batches, in the order they are looked for (Hugging Face's).
LABEL_KEYS = ("labels", "label")


def _labelled_batches(data: Data, input_key: str) -> Iterator[tuple[Tensor, Any]]:
    """``(inputs, labels)`` of each batch: of a pair, of the batches of an iterable, or of dicts
    (read at ``input_key`` and the first of `LABEL_KEYS` they hold)."""
    if isinstance(data, Tensor):
        raise TypeError("`id_train_data` needs labels: pass (inputs, labels) or batches of them")
    if isinstance(data, Mapping) or (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):  # one batch; its labels are checked by `_check_labels`
        yield _labelled(data, input_key)
        return
    for batch in data:
        yield _labelled(batch, input_key)


def _labelled(batch: Any, input_key: str) -> tuple[Tensor, Any]:
    if isinstance(batch, Mapping):
        label_key = next((k for k in LABEL_KEYS if k in batch), None)
        if input_key not in batch or label_key is None:
            raise ValueError(
                f"a dict batch of `id_train_data` must hold the inputs at `input_key`="
                f"{input_key!r} and the labels at 'labels' or 'label', got keys "
                f"{list(batch)[:8]}; set `input_key=` to the key of the inputs"
            )
        return batch[input_key], batch[label_key]
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(
            "each batch of `id_train_data` must be (inputs, labels, ...) or a dict with the "
            f"inputs at `input_key` and 'labels', got {type(batch).__name__}"
        )
    return batch[0], batch[1]
