r"""ODIN out-of-distribution detection (Liang, Li & Srikant, ICLR 2018), computed exactly.

With logits ``f(x)`` of shape ``(B, N)``, ``S_j(x; T) = softmax(f(x) / T)_j`` and the clean
prediction ``ŷ = argmax_j f_j(x)``, ODIN takes one signed-gradient step that raises the
temperature-scaled log-probability of ``ŷ`` and scores the result:

$$ \tilde x = x - \varepsilon \cdot
     \operatorname{sign}\big(-\nabla_x \log S_{\hat y}(x; T)\big) / \sigma_c, \qquad
   \mathrm{score}(x) = \max_j S_j(\tilde x; T) \quad \text{(higher = more in-distribution)} $$

``-log S_ŷ(x; T)`` is the cross-entropy of ``f(x)/T`` against ``ŷ``: the step descends it, as the
original ODIN code does (the *Learning ODIN* paper's Eq. 2 prints the opposite sign).

Choices made explicit here:

* **Unit of ε.** ``σ_c = 1`` by default, so ε is in the units of the model's input. With
  ``input_std=σ`` (per channel, dim 1) the step of channel ``c`` is ``ε / σ_c``: for a model that
  normalises its input as ``(pixel - mean) / σ``, ε is then in raw pixel units of the ``[0, 1]``
  range (the original code's convention).
* **Sign of a zero gradient** (``sign_of_zero``). The original code binarises the gradient of the
  cross-entropy as ``(g >= 0) * 2 - 1``, so a coordinate whose gradient is exactly zero is still
  *decreased* by ``ε / σ_c`` (``sign_of_zero=1``). The default ``0`` is the mathematical sign
  (``torch.sign``, no step there): a zero gradient says nothing about which way raises ``S_ŷ``,
  and where zeros occur systematically (inputs the model ignores, dead ReLUs, an underflowed
  gradient) the original rule applies a data-independent shift. For networks whose input
  gradient is almost never exactly zero the two agree; use ``1`` to reproduce the original code.
* **Precision.** Both ODIN passes run with autocast disabled: at ``T = 1000`` a float16 input
  gradient underflows to zero, and the spacing of float16 (bfloat16) numbers near 1.0 is
  ``2**-10`` (``2**-7``), about ε or larger, so under autocast the step would round away and ODIN
  would silently turn into plain max-softmax. Half-precision logits are promoted to float32
  before the softmax. The gradient is taken of ``T · log S_ŷ``, whose sign is the same but whose
  size carries no ``1/T`` factor.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable, Iterator, Sequence, Sized
from typing import Any, Union

import torch
from torch import Tensor, nn

from ._validation import check_fraction, check_nonnegative, check_positive
from .metrics import ood_metrics

__all__ = ["CRITERIA", "TUNE_EPSILONS", "TUNE_TEMPERATURES", "ODINDetector"]

PerChannel = Union[float, Sequence[float], Tensor]

#: Default grids of :meth:`ODINDetector.tune` (the search space of the ODIN paper).
TUNE_TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
TUNE_EPSILONS = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005, 0.01, 0.05, 0.1, 0.2)
#: Selection criteria of :meth:`ODINDetector.tune` with OOD data -> whether larger is better.
CRITERIA: dict[str, bool] = {"fpr95": False, "auroc": True}
SIGNS_OF_ZERO: tuple[int, ...] = (0, 1)


def _per_channel(name: str, value: PerChannel, *, positive: bool) -> Tensor:
    """A float or per-channel values as a 1-D float64 CPU tensor (length 1 broadcasts)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = [float(value)]
    try:
        t = torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"`{name}` must be a float or a 1-D sequence of floats, got {value!r}"
        ) from err
    if (
        t.numel() == 0
        or not bool(torch.isfinite(t).all())
        or (positive and not bool((t > 0).all()))
    ):
        need = "positive finite" if positive else "finite"
        raise ValueError(f"`{name}` must hold one or more {need} values, got {t.tolist()!r}")
    return t


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; every submodule's own flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _grad_pass(device: torch.device) -> Iterator[None]:
    """Gradients on, even under ``no_grad`` or ``inference_mode`` (Lightning's predict loop).

    Autocast is disabled for ``device`` (see the module docstring). Tensors made inside are
    normal tensors, so the input copy must be made here, not under the caller's inference mode.
    """
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None:
        use_autocast = available(device.type)
    else:
        use_autocast = device.type in ("cpu", "cuda")
    autocast = (
        torch.autocast(device.type, enabled=False) if use_autocast else contextlib.nullcontext()
    )
    with torch.inference_mode(False), torch.enable_grad(), autocast:
        yield


def _progress(items: Iterable[Any], total: int | None, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError as err:
        raise ImportError("`progress=True` needs tqdm: `pip install tqdm`") from err
    return tqdm(items, total=total, desc="ODIN", unit="batch")


def _max_softmax(logits: Tensor, temperature: float) -> Tensor:
    return torch.softmax(logits / temperature, dim=1).amax(dim=1)


class ODINDetector:
    r"""ODIN detector wrapped around a trained classifier; see the module docstring for the math.

    Args:
        model: Maps a float batch ``(B, ...)`` to logits ``(B, N)``; samples must be independent
            (eval mode is used while scoring). Inputs are moved to the device and floating dtype
            of its first parameter.
        temperature: ``T > 0``. Default: ``1000.0`` (paper).
        epsilon: Step size ``ε >= 0`` in the model's input units, or in the units fixed by
            ``input_std``. Default: ``0.001`` (paper, CIFAR-10). ``0`` gives temperature-scaled
            max-softmax.
        input_std: ``σ``, a positive float or one value per channel (dim 1); the step of channel
            ``c`` is ``ε / σ_c``. Default: ``None`` (``σ = 1``).
        sign_of_zero: Sign given to an exactly-zero cross-entropy gradient: ``0`` (default,
            ``torch.sign``: no step) or ``1`` (original code: step ``-ε / σ_c``).
        clamp: Optional ``(lo, hi)`` (floats or per-channel values, model-input units); ``x̃`` is
            clamped to it.
        ood_label: Label :meth:`predict` returns for rejected inputs. Default: ``-1``.
        batch_size: Split tensor inputs into chunks of this many samples. Default: whole tensor.
        progress: Show a tqdm progress bar over batches (needs tqdm). Default: ``False``.

    Attributes:
        threshold: Score threshold set by :meth:`calibrate` (``None`` before); accepted when
            ``score >= threshold``.
        tuning_results: List of dicts, one per grid point, filled by :meth:`tune`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> detector = ODINDetector(model, temperature=1000.0, epsilon=0.001)
        >>> scores = detector.score(torch.randn(4, 3, 2, 2))
        >>> scores.shape, bool((scores >= 1 / 3).all())  # max of 3 probabilities >= 1/3
        (torch.Size([4]), True)
        >>> detector.calibrate(torch.randn(100, 3, 2, 2), tpr=0.95).predict(
        ...     torch.randn(5, 3, 2, 2)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        temperature: float = 1000.0,
        epsilon: float = 0.001,
        input_std: PerChannel | None = None,
        sign_of_zero: int = 0,
        clamp: tuple[PerChannel, PerChannel] | None = None,
        ood_label: int = -1,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if sign_of_zero not in SIGNS_OF_ZERO or isinstance(sign_of_zero, bool):
            raise ValueError(f"`sign_of_zero` must be one of {SIGNS_OF_ZERO}, got {sign_of_zero!r}")
        if isinstance(ood_label, bool) or not isinstance(ood_label, int):
            raise TypeError(f"`ood_label` must be an int, got {ood_label!r}")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int)
        ):
            raise TypeError(f"`batch_size` must be an int or None, got {batch_size!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size!r}")
        if not isinstance(progress, bool):
            raise TypeError(f"`progress` must be a bool, got {progress!r}")
        self.model = model
        self.temperature = temperature
        self.epsilon = epsilon
        self._std = (
            None if input_std is None else _per_channel("input_std", input_std, positive=True)
        )
        self._clamp = None if clamp is None else self._check_clamp(clamp)
        self.sign_of_zero = sign_of_zero
        self.ood_label = ood_label
        self.batch_size = batch_size
        self.progress = progress
        self.threshold: float | None = None
        self.tuning_results: list[dict[str, float]] = []
        self._views: dict[tuple[Any, ...], Tensor] = {}  # per-channel values on the device

    @staticmethod
    def _check_clamp(clamp: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise TypeError(f"`clamp` must be a pair (lo, hi) or None, got {clamp!r}")
        lo = _per_channel("clamp", clamp[0], positive=False)
        hi = _per_channel("clamp", clamp[1], positive=False)
        if lo.numel() != hi.numel() and 1 not in (lo.numel(), hi.numel()):
            raise ValueError(f"`clamp` bounds must have matching lengths, got {clamp!r}")
        if not bool((lo < hi).all()):
            raise ValueError(f"`clamp` must satisfy lo < hi, got {clamp!r}")
        return lo, hi

    @property
    def temperature(self) -> float:
        """Temperature ``T > 0`` of both the gradient and the final softmax."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = check_positive("temperature", value)

    @property
    def epsilon(self) -> float:
        """Step size ``ε >= 0`` (see ``input_std`` for its unit)."""
        return self._epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._epsilon = check_nonnegative("epsilon", value)

    def __repr__(self) -> str:
        return (
            f"ODINDetector(temperature={self.temperature:g}, epsilon={self.epsilon:g}, "
            f"sign_of_zero={self.sign_of_zero}, threshold={self.threshold!r})"
        )

    # ------------------------------------------------------------------ one batch

    def _placement(self, x: Any, name: str) -> tuple[torch.device, torch.dtype]:
        """Check a batch; the device and dtype of the model's first floating parameter."""
        if not isinstance(x, Tensor):
            raise TypeError(f"`{name}` batches must be tensors, got {type(x).__name__}")
        if x.ndim == 0 or not x.is_floating_point():
            raise TypeError(
                f"`{name}` must be a floating tensor (B, ...), got {x.dtype} of shape "
                f"{tuple(x.shape)}"
            )
        param = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        return (x.device, x.dtype) if param is None else (param.device, param.dtype)

    @staticmethod
    def _leaf(x: Tensor, device: torch.device, dtype: torch.dtype, grad: bool) -> Tensor:
        """A fresh leaf for ``x`` on the model's device; call it inside :func:`_grad_pass`."""
        x = x.detach().to(device=device, dtype=dtype)
        if x.is_inference():  # made under the caller's inference_mode: autograd needs a copy
            x = x.clone()
        return x.requires_grad_(grad)

    def _logits(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if (
            not isinstance(out, Tensor)
            or out.ndim != 2
            or out.shape[0] != x.shape[0]
            or out.shape[1] < 1
        ):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"`model` output must be logits of shape (B, N) = ({x.shape[0]}, N >= 1) for an "
                f"input of shape {tuple(x.shape)}, got {got}"
            )
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

    def _ce_sign(
        self, x: Tensor, logits: Tensor, pred: Tensor, temperature: float, retain: bool
    ) -> Tensor:
        """``sign(∇_x CE(f(x)/T, ŷ)) = sign(-∇_x log S_ŷ)``, zeros mapped to ``sign_of_zero``."""
        logp = torch.log_softmax(logits / temperature, dim=1).gather(1, pred[:, None])
        # Scaling by T keeps the sign and removes the 1/T in d log S / d logits.
        target = logp.sum() * temperature
        if not target.requires_grad:
            raise ValueError(
                "`model` output does not require grad w.r.t. its input: ODIN needs the input "
                "gradient (is the forward detached or wrapped in torch.no_grad()?)"
            )
        (grad,) = torch.autograd.grad(target, x, retain_graph=retain, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(x)
        sign = torch.sign(grad).neg_()
        if self.sign_of_zero:
            sign.masked_fill_(grad == 0, 1.0)
        return sign

    def _channel_view(self, t: Tensor, x: Tensor, name: str, key: str) -> Tensor:
        """``t`` shaped to broadcast along dim 1 of ``x``, cached per device (no copy per batch)."""
        if t.numel() != 1 and (x.ndim < 2 or x.shape[1] != t.numel()):
            raise ValueError(
                f"`{name}` has {t.numel()} values but the input has shape {tuple(x.shape)}; "
                "expected 1 value or one per channel (dim 1)"
            )
        cache_key = (key, x.device, x.dtype, x.ndim)
        if cache_key not in self._views:
            shape = [1] * x.ndim
            shape[min(1, x.ndim - 1)] = t.numel()
            self._views[cache_key] = t.to(device=x.device, dtype=x.dtype).reshape(shape)
        return self._views[cache_key]

    def _step(self, x: Tensor, sign: Tensor | None, epsilon: float) -> Tensor:
        """``x̃ = clamp(x - ε · sign / σ)``."""
        if sign is not None and epsilon > 0:
            if self._std is None:
                x = torch.add(x, sign, alpha=-epsilon)
            else:
                std = self._channel_view(self._std, x, "input_std", "std")
                x = torch.addcmul(x, sign, epsilon / std, value=-1)
        if self._clamp is not None:
            lo = self._channel_view(self._clamp[0], x, "clamp", "lo")
            hi = self._channel_view(self._clamp[1], x, "clamp", "hi")
            x = torch.minimum(torch.maximum(x, lo), hi)
        return x

    def _batch(
        self, x: Tensor, temperatures: Sequence[float], epsilons: Sequence[float], name: str
    ) -> tuple[Tensor, Tensor]:
        """Scores ``(len(temperatures), len(epsilons), B)`` and clean argmax ``(B,)``."""
        need_grad = any(e > 0 for e in epsilons)
        device, dtype = self._placement(x, name)
        with _grad_pass(device):
            x = self._leaf(x, device, dtype, need_grad)
            logits = self._logits(x)
            pred = logits.argmax(dim=1)
            out = logits.new_empty(len(temperatures), len(epsilons), x.shape[0])
            for ti, temperature in enumerate(temperatures):
                retain = ti + 1 < len(temperatures)
                sign = self._ce_sign(x, logits, pred, temperature, retain) if need_grad else None
                with torch.no_grad():
                    for ei, epsilon in enumerate(epsilons):
                        if epsilon == 0 and self._clamp is None:  # x̃ = x: reuse the clean logits
                            out[ti, ei] = _max_softmax(logits, temperature)
                        else:
                            x_t = self._step(x.detach(), sign, epsilon)
                            out[ti, ei] = _max_softmax(self._logits(x_t), temperature)
        return out.detach(), pred

    # ------------------------------------------------------------------ many batches

    def _run(
        self, inputs: Any, temperatures: Sequence[float], epsilons: Sequence[float], name: str
    ) -> tuple[Tensor, Tensor]:
        """Scores ``(nT, nE, n)`` and clean argmax ``(n,)`` over a tensor or iterable of batches."""
        if isinstance(inputs, Tensor):
            if inputs.ndim == 0:
                raise ValueError(f"`{name}` must have a batch dimension, got a 0-d tensor")
            out_device = inputs.device
            empty_dtype = torch.promote_types(self._placement(inputs, name)[1], torch.float32)
            chunks = inputs.split(self.batch_size or max(len(inputs), 1))
            batches: Iterable[Any] = chunks
            total: int | None = len(chunks)
        elif isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
            out_device = torch.device("cpu")
            batches = (b[0] if isinstance(b, (tuple, list)) and len(b) > 0 else b for b in inputs)
            total = len(inputs) if isinstance(inputs, Sized) else None
        else:
            raise TypeError(
                f"`{name}` must be a tensor (B, ...) or an iterable of batches, "
                f"got {type(inputs).__name__}"
            )
        scores, preds = [], []
        with _eval_mode(self.model):
            for batch in _progress(batches, total, self.progress):
                self._placement(batch, name)
                if batch.shape[0] == 0:
                    continue
                s, p = self._batch(batch, temperatures, epsilons, name)
                scores.append(s)  # kept on the model's device: one transfer at the end
                preds.append(p)
        if scores:
            return torch.cat(scores, dim=2).to(out_device), torch.cat(preds).to(out_device)
        if isinstance(inputs, Tensor):  # an empty batch gives empty results
            shape = (len(temperatures), len(epsilons), 0)
            empty = torch.empty(shape, dtype=empty_dtype, device=out_device)
            return empty, torch.empty(0, dtype=torch.long, device=out_device)
        raise ValueError(f"`{name}` yielded no samples")

    def score(self, inputs: Tensor | Iterable[Any]) -> Tensor:
        r"""ODIN scores ``max_j S_j(x̃; T)``, higher = more in-distribution.

        Args:
            inputs: A float tensor ``(B, ...)``, or an iterable of batches (e.g. a DataLoader)
                where a batch is a tensor or a tuple/list whose first element is the input
                (labels are ignored). The caller's tensors are never modified.

        Returns:
            Shape ``(B,)`` (total number of samples), detached. On the input's device for a
            tensor; concatenated on the CPU for an iterable.
        """
        return self._run(inputs, (self.temperature,), (self.epsilon,), "inputs")[0][0, 0]

    __call__ = score

    def perturb(self, inputs: Tensor) -> Tensor:
        """The perturbed input ``x̃`` of shape ``(B, ...)``, on the input's device, model's dtype.

        Args:
            inputs: A float tensor ``(B, ...)``.

        Returns:
            ``clamp(x - ε · sign(-∇_x log S_ŷ(x; T)) / σ)``, a new tensor of the input's shape.
        """
        if not isinstance(inputs, Tensor):
            raise TypeError(f"`inputs` must be a tensor, got {type(inputs).__name__}")
        device, dtype = self._placement(inputs, "inputs")
        with _eval_mode(self.model), _grad_pass(device):
            x = self._leaf(inputs, device, dtype, self.epsilon > 0)
            sign = None
            if self.epsilon > 0:
                logits = self._logits(x)
                sign = self._ce_sign(x, logits, logits.argmax(dim=1), self.temperature, False)
            # copy=True: with ε = 0 and no clamp the result would alias the caller's tensor
            return self._step(x.detach(), sign, self.epsilon).to(inputs.device, copy=True)

    def calibrate(self, id_data: Tensor | Iterable[Any], tpr: float = 0.95) -> ODINDetector:
        """Set :attr:`threshold` so that a share ``tpr`` of ``id_data`` scores at least it.

        With ``n`` scores sorted in decreasing order, the threshold is the ``k``-th,
        ``k = ceil(tpr · n)``: on ``id_data`` itself at least ``k`` samples are accepted, exactly
        ``k`` when scores are distinct (``tpr·n <= k < tpr·n + 1``).

        Args:
            id_data: In-distribution validation data, as for :meth:`score`.
            tpr: Target share of accepted in-distribution samples, in ``(0, 1]``.

        Returns:
            ``self``.
        """
        tpr = check_fraction("tpr", tpr)
        scores = self._run(id_data, (self.temperature,), (self.epsilon,), "id_data")[0][0, 0]
        if scores.numel() == 0:
            raise ValueError("`id_data` contains no samples")
        k = max(1, math.ceil(tpr * scores.numel() - 1e-9))  # tolerance for tpr*n rounding up
        self.threshold = float(torch.sort(scores.cpu(), descending=True).values[k - 1])
        return self

    def predict(self, inputs: Tensor | Iterable[Any]) -> Tensor:
        """Clean argmax class ``(B,)`` long, or ``ood_label`` where ``score < threshold``.

        Raises:
            RuntimeError: :meth:`calibrate` has not been called (and ``threshold`` is unset).
        """
        if self.threshold is None:
            raise RuntimeError("no threshold: call calibrate(id_data) before predict()")
        scores, pred = self._run(inputs, (self.temperature,), (self.epsilon,), "inputs")
        return pred.masked_fill(scores[0, 0] < self.threshold, self.ood_label)

    def tune(
        self,
        id_data: Tensor | Iterable[Any],
        ood_data: Tensor | Iterable[Any] | None = None,
        *,
        temperatures: Sequence[float] | None = None,
        epsilons: Sequence[float] = TUNE_EPSILONS,
        criterion: str | None = None,
    ) -> ODINDetector:
        """Grid-search ``(T, ε)`` on validation data and apply the best setting.

        Each temperature costs one forward and one backward per batch, each ``ε > 0`` one more
        forward; the data is read once. The result of every grid point is kept in
        :attr:`tuning_results`; :attr:`threshold` is reset (call :meth:`calibrate` again).

        * With ``ood_data``: ``criterion="fpr95"`` (default, the ODIN paper: lowest FPR at 95%
          TPR, ties broken by AUROC) or ``"auroc"`` (highest, ties broken by FPR95), computed by
          :func:`gq_loss.metrics.ood_metrics`; ``temperatures`` defaults to
          :data:`TUNE_TEMPERATURES`.
        * Without (a heuristic, after Generalized ODIN, Hsu et al., CVPR 2020): ``ε`` maximising
          the mean score on ``id_data`` at one temperature (default: the current one). The step
          is meant to raise ``S_ŷ``; the criterion keeps the ``ε`` up to which it still does on
          in-distribution data, trusting that OOD inputs gain less (the ODIN paper's
          observation). Nothing checks that on OOD data, and on near-linear models the mean can
          keep growing, favouring the largest ``ε`` of the grid: keep the grid plausible. Mean
          scores at different temperatures are not comparable, so only one is accepted.

        Args:
            id_data: In-distribution validation data, as for :meth:`score`.
            ood_data: Optional OOD validation data, as for :meth:`score`.
            temperatures: Grid of ``T > 0``.
            epsilons: Grid of ``ε >= 0``. Default: :data:`TUNE_EPSILONS`.
            criterion: ``"fpr95"`` | ``"auroc"`` (needs ``ood_data``).

        Returns:
            ``self``, with the selected ``temperature`` and ``epsilon``; ties go to the first
            grid point in ``temperatures``-major order.
        """
        eps_grid = self._grid("epsilons", epsilons, strict=False)
        if ood_data is None:
            if criterion is not None:
                raise ValueError(
                    f"`criterion` {criterion!r} needs `ood_data`; omit it for ID-only tuning"
                )
            temps = (
                (self.temperature,)
                if temperatures is None
                else self._grid("temperatures", temperatures, strict=True)
            )
            if len(temps) != 1:
                raise ValueError(
                    "ID-only tuning takes one temperature (mean scores at different temperatures "
                    f"are not comparable), got `temperatures`={tuple(temperatures or ())!r}"
                )
            id_scores = self._run(id_data, temps, eps_grid, "id_data")[0]
            self._check_nonempty(id_scores, "id_data")
            results = [
                {
                    "temperature": temps[0],
                    "epsilon": e,
                    "mean_id_score": float(id_scores[0, i].double().mean()),
                }
                for i, e in enumerate(eps_grid)
            ]
            best = max(results, key=lambda r: r["mean_id_score"])
        else:
            criterion = "fpr95" if criterion is None else criterion
            if criterion not in CRITERIA:
                raise ValueError(f"`criterion` must be one of {tuple(CRITERIA)}, got {criterion!r}")
            temps = self._grid(
                "temperatures",
                TUNE_TEMPERATURES if temperatures is None else temperatures,
                strict=True,
            )
            id_scores = self._run(id_data, temps, eps_grid, "id_data")[0]
            ood_scores = self._run(ood_data, temps, eps_grid, "ood_data")[0]
            self._check_nonempty(id_scores, "id_data")
            self._check_nonempty(ood_scores, "ood_data")
            results = [
                {
                    "temperature": t,
                    "epsilon": e,
                    **ood_metrics(id_scores[ti, ei], ood_scores[ti, ei]),
                }
                for ti, t in enumerate(temps)
                for ei, e in enumerate(eps_grid)
            ]
            other = "auroc" if criterion == "fpr95" else "fpr95"
            sign = -1.0 if CRITERIA[criterion] else 1.0  # minimise sign * criterion, then the other
            best = min(results, key=lambda r: (sign * r[criterion], -sign * r[other]))
        self.temperature, self.epsilon = best["temperature"], best["epsilon"]
        self.tuning_results = results
        self.threshold = None
        return self

    @staticmethod
    def _grid(name: str, values: Sequence[float], *, strict: bool) -> tuple[float, ...]:
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"`{name}` must be a sequence of numbers, got {values!r}")
        check = check_positive if strict else check_nonnegative
        grid = tuple(check(name, v) for v in values)
        if not grid:
            raise ValueError(f"`{name}` must not be empty")
        return grid

    @staticmethod
    def _check_nonempty(scores: Tensor, name: str) -> None:
        if scores.shape[-1] == 0:
            raise ValueError(f"`{name}` contains no samples")
