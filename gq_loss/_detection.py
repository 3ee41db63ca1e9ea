"""What every detector shares: the detector protocol (score / fit / calibrate / predict /
state_dict), its validated settings, and the mechanics under it, written once: eval mode (safe
across threads), batch iteration, progress and the float64 score precision."""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeGuard, TypeVar, overload

import torch
from torch import Tensor, nn

from ._autograd import unwrap_ddp
from ._validation import (
    OutputSpec,
    call_model,
    check_fraction,
    check_logits,
    check_optional_int,
    check_output_spec,
    integer_hint,
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
    construction as afterwards; when ``invalidates`` (the setting changes scores), assigning it a
    new value drops the detector's fitted state (`Detector._invalidate`), so no stale threshold
    survives; assigning the value it already has keeps it (`same_setting`).

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
        key = "_" + self.name
        changed = key not in obj.__dict__ or not same_setting(obj.__dict__[key], checked)
        obj.__dict__[key] = checked
        if self.invalidates and changed:
            obj._invalidate(self.name)


def same_setting(old: Any, new: Any) -> bool:
    """Whether two checked setting values are the same: the same object, or equal numbers,
    strings or tuples of one type (a model or a callable is the same only as the same object)."""
    if old is new:
        return True
    return type(old) is type(new) and isinstance(old, (int, float, str, tuple)) and old == new


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


def check_ood_label(label: int, num_classes: int | None) -> None:
    """Refuse an ``ood_label`` that is a class index of a model with ``num_classes`` classes."""
    if num_classes is not None and 0 <= label < num_classes:
        raise ValueError(
            f"`ood_label`={label} is a class of this model (classes 0 to {num_classes - 1}): a "
            "rejected input could not be told from a prediction of that class; use a label "
            f"outside [0, {num_classes}), e.g. -1 (the default) or {num_classes}"
        )


# --------------------------------------------------------------------------- mechanics


#: Modules in eval mode for a detector: ``id -> (module, holders, its mode before the first)``.
_EVAL_HOLDS: dict[int, tuple[nn.Module, int, bool]] = {}
_EVAL_LOCK = threading.Lock()


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Eval mode for the duration (an ``nn.Module`` only); each submodule's flag is restored.

    Safe across threads: the modes are counted per submodule, so the first caller saves a
    module's mode and the last one to leave restores it, and no thread's scoring runs in a mode
    that another thread restored meanwhile. Nested uses (ODIN inside a detector) count the same.

    A module from ``torch.export`` (``ExportedProgram.module()``, also as a submodule) refuses
    ``eval()``: its mode was fixed when it was exported. One exported in eval mode is scored as
    it is (the flags of the modules around it are still set and restored); one exported in
    train mode is refused (`check_exported`).
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modules = list(model.modules())
    exported = [module for module in modules if is_exported(module)]
    for graph_module in exported:
        check_exported(graph_module, model)
    with _EVAL_LOCK:
        for m in modules:
            _, holders, training = _EVAL_HOLDS.get(id(m), (m, 0, m.training))
            _EVAL_HOLDS[id(m)] = (m, holders + 1, training)
        if exported:  # eval() would reach their refusing train(False): set the flags only
            for m in modules:
                m.training = False
        else:
            model.eval()
    try:
        yield
    finally:
        with _EVAL_LOCK:
            for m in modules:
                _, holders, training = _EVAL_HOLDS[id(m)]
                if holders == 1:
                    del _EVAL_HOLDS[id(m)]
                    m.training = training
                else:
                    _EVAL_HOLDS[id(m)] = (m, holders - 1, training)


def is_exported(module: nn.Module) -> TypeGuard[torch.fx.GraphModule]:
    """Whether ``module`` comes from ``torch.export`` (``ExportedProgram.module()``): a
    ``GraphModule`` whose ``train`` and ``eval`` torch replaced on the instance, to refuse."""
    return isinstance(module, torch.fx.GraphModule) and "eval" in vars(module)


def check_exported(module: torch.fx.GraphModule, model: nn.Module) -> None:
    """Refuse a ``torch.export`` module that was exported in train mode: its graph runs an op
    with ``train``/``training`` set (batch norm on batch statistics that also moves its running
    statistics, dropout), and its mode cannot be changed after export."""
    for node in module.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None:
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.name not in ("train", "training"):
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if value is True:
                where = "`model`" if module is model else "a submodule of `model`"
                raise ValueError(
                    f"{where} is a torch.export module exported in train mode (its graph runs "
                    f"{schema.name} with {arg.name}=True), and an exported module's mode cannot "
                    "be changed (torch refuses its eval()): it would score with batch statistics, "
                    "update its running statistics or apply dropout. Export it in eval mode: "
                    "`torch.export.export(model.eval(), args).module()`"
                )


def check_batch(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` batches must be tensors, got {type(x).__name__}")
    if x.ndim == 0 or not x.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating tensor (B, ...), got {x.dtype} of shape "
            f"{tuple(x.shape)}{integer_hint(x)}"
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
    inputs: Any, name: str, batch_size: int | None, input_key: str = "pixel_values"
) -> tuple[Iterable[Any], int | None, torch.device]:
    """(batches, number of batches or None, device of the results) for a tensor, a Mapping or
    an iterable.

    A tensor (or a Mapping holding one under ``input_key``: one batch, e.g. a Hugging Face
    ``BatchFeature``) is split into ``batch_size`` chunks and its results stay on its device;
    an iterable (a `DataLoader`, a generator; no length needed) yields tensors, tuples/lists
    whose first element is the input, or Mappings whose ``input_key`` entry is (a Hugging Face
    image `DataLoader`'s ``{"pixel_values": ..., "labels": ...}``), and its results are
    concatenated on the CPU.
    """
    if labelled_pair(inputs):
        inputs = inputs[0]
    if isinstance(inputs, Mapping):
        inputs = batch_input(inputs, input_key, name)
    if isinstance(inputs, Tensor):
        if inputs.ndim == 0:
            raise ValueError(f"`{name}` must have a batch dimension, got a 0-d tensor")
        chunks = inputs.split(batch_size or max(len(inputs), 1))
        return chunks, len(chunks), inputs.device
    if isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
        items = (batch_input(b, input_key, name) for b in inputs)
        return items, length(inputs), torch.device("cpu")
    raise TypeError(
        f"`{name}` must be a tensor (B, ...) or an iterable of batches, got {type(inputs).__name__}"
    )


def batch_input(batch: Any, input_key: str, name: str) -> Any:
    """The input of one batch: the first element of a tuple/list, the ``input_key`` entry of a
    Mapping, else the batch itself (checked by `check_batch`)."""
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return batch[0]
    if isinstance(batch, Mapping):
        if input_key not in batch:
            raise ValueError(
                f"`{name}` gave a {type(batch).__name__} batch without the key "
                f"`input_key`={input_key!r}, with keys {list(batch)[:8]}; set `input_key=` to "
                "the key of the float inputs the model takes (text models: a tensor of input "
                "embeddings, with a model that takes it)"
            )
        return batch[input_key]
    return batch


def check_key(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str (a key of dict batches), got {value!r}")
    return value


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
    `place_inputs`, the output named by ``output`` (`call_model`), checked by `check_logits`.

    A `DistributedDataParallel` wrapper is scored through its ``.module``: its own forward runs
    collectives, which hang when one rank scores alone."""
    logits = call_model(unwrap_ddp(model), place_inputs(model, inputs), output)
    check_logits(logits, inputs.shape[0])
    return logits


# --------------------------------------------------------------------------- the protocol


class Detector:
    r"""The one protocol of every detector: `score`, `fit`, `calibrate`, `predict`.

    * `score(inputs)`: scores ``(B,)``, **higher = more in-distribution**, over a tensor
      ``(B, ...)`` or an iterable of batches (a `DataLoader`, with or without labels, with or
      without a length; dict batches are read at `input_key`).
    * `fit(id_train_data)`: estimates what the score needs from labelled in-distribution data
      (Mahalanobis); a no-op returning ``self`` for the others.
    * `calibrate(id_data, *, tpr)`: sets `threshold_` so that a share ``tpr`` of ``id_data`` is
      accepted.
    * `predict(inputs)`: the predicted class ``(B,)`` where ``score >= threshold_``, else
      ``ood_label``. An input whose score is not finite (NaN or inf: a NaN image, a model that
      overflowed) is never given a class: it gets ``ood_label``.
    * `state_dict()` / `load_state_dict(state)`: the calibration without the model, to save
      with ``torch.save`` and load with ``torch.load(..., weights_only=True)``.

    **Settings and fitted state.** Every constructor argument is a public attribute, validated
    when it is assigned as at construction and shown in ``repr``. Assigning a setting that
    changes scores (the model, ``output``, ``temperature``, ...) a new value drops the fitted
    state: the threshold, and for a detector with a `fit` its statistics, so `predict` raises
    [`NotFittedError`][gq_loss.NotFittedError] until the next `calibrate` (and `fit`); a second
    `fit` also drops the threshold. Assigning a setting the value it already has keeps
    everything. ``ood_label``, ``batch_size``, ``input_key`` and ``progress`` do not change scores and keep
    it. Fitted state follows scikit-learn's convention: its names end in ``_`` and are ``None``
    before the step that sets them. Changes made *inside* the model (training it further)
    cannot be seen: calibrate again after them.

    **Threads.** One detector (and one model) may score from several threads at once: each
    call gives the result it gives alone, and the model's modes come back as they were when the
    last call ends. Settings must not be assigned while another thread scores.

    Subclasses implement `_score_batch(inputs)` for one batch and declare their settings as
    `Setting` class attributes.

    Args:
        model: The classifier (an ``nn.Module``, run in eval mode while scoring, or a callable).
            A ``DistributedDataParallel`` wrapper is scored through its ``.module`` (its own
            forward runs collectives, which would hang with one rank scoring alone).
        output: Names the logits in the model's output when it is not a tensor: a key (str; of
            a Mapping, else an attribute), an index (int; of a tuple or list) or a callable
            applied to the output. Default ``None``: a tensor is used as it is, and a Mapping
            with the key ``"logits"`` or an object with a tensor ``logits`` attribute (a Hugging
            Face ``ModelOutput``) gives that.
        ood_label: Label `predict` returns for rejected inputs; it must not be a class of the
            model (``[0, N)`` is refused once ``N`` is known). Default: ``-1``.
        batch_size: Split tensor inputs into chunks of this many samples. Default: whole tensor.
        input_key: Key of the inputs in dict batches (a Hugging Face image `DataLoader` yields
            ``{"pixel_values": ..., "labels": ...}``). Default: ``"pixel_values"``.
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
    #: Names of the fitted state, saved by `state_dict`.
    _fitted: tuple[str, ...] = ("threshold_",)

    model: Setting[Model] = Setting(check_model)
    output: Setting[OutputSpec | None] = Setting(check_output)
    ood_label: Setting[int] = Setting(check_int, invalidates=False)
    batch_size: Setting[int | None] = Setting(check_optional_int, invalidates=False)
    input_key: Setting[str] = Setting(check_key, invalidates=False)
    progress: Setting[bool] = Setting(check_bool, invalidates=False)

    def __init__(
        self,
        model: Model | None,
        *,
        output: OutputSpec | None = None,
        ood_label: int = -1,
        batch_size: int | None = None,
        input_key: str = "pixel_values",
        progress: bool = False,
    ) -> None:
        self._invalidate()
        self.model = model
        self.output = output
        self.ood_label = ood_label
        self.batch_size = batch_size
        self.input_key = input_key
        self.progress = progress

    # ------------------------------------------------------------------ state

    @property
    def threshold_(self) -> float | None:
        """Score threshold set by `calibrate`; ``None`` before (see the class docs)."""
        return self.__dict__["_threshold_"]

    @threshold_.setter
    def threshold_(self, value: float | None) -> None:
        self.__dict__["_threshold_"] = check_threshold(value)

    def _invalidate(self, setting: str | None = None) -> None:
        """Drop the fitted state: ``setting``, which changes scores, was assigned a new value
        (``None``: at construction, or a new fit)."""
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

    # ------------------------------------------------------------------ save and load

    def state_dict(self) -> dict[str, Any]:
        """The detector's calibration without its model, as PyTorch's ``state_dict``: a dict of
        tensors, numbers, strings, lists and dicts that ``torch.load(..., weights_only=True)``
        reads back.

        It holds the fitted state (`threshold_`, and `tuning_results_`, ``means_``,
        ``covariance_``, ``precision_``, ``class_counts_`` where the detector has them) and the
        settings that change scores (``temperature``, ``epsilon``, ``output``, ``layer``, ...;
        a callable ``output`` or ``feature_fn`` only as ``{"callable": its name}``). The model,
        ``ood_label``, ``batch_size``, ``input_key`` and ``progress`` are not part of it. Tensors are returned
        as they are (detached, not copied).

        Returns:
            ``{"detector": class name, "version": 1, "settings": {...}, <fitted state>}``.

        Examples:
            >>> import io
            >>> from gq_loss import MSPDetector
            >>> model = torch.nn.Linear(4, 3)
            >>> detector = MSPDetector(model, temperature=2.0).calibrate(torch.randn(50, 4))
            >>> buffer = io.BytesIO()
            >>> torch.save(detector.state_dict(), buffer)
            >>> _ = buffer.seek(0)
            >>> state = torch.load(buffer, weights_only=True)
            >>> fresh = MSPDetector(model, temperature=2.0).load_state_dict(state)
            >>> fresh.threshold_ == detector.threshold_
            True
        """
        state: dict[str, Any] = {
            "detector": type(self).__name__,
            "version": STATE_VERSION,
            "settings": {name: _saved(getattr(self, name)) for name in scored_settings(type(self))},
        }
        for name in self._fitted:
            value = getattr(self, name)
            if isinstance(value, Tensor):
                value = value.detach()
            elif isinstance(value, list):
                value = [dict(item) for item in value]
            state[name] = value
        return state

    def load_state_dict(self: D, state_dict: Mapping[str, Any]) -> D:
        """Load the fitted state saved by `state_dict` (tensors are copied).

        The settings are **checked, not restored**: the state holds only for the settings it
        was calibrated with, so a detector whose settings that change scores differ from the
        saved ones refuses it (build it with the saved settings). A callable setting is saved
        by its name (``__qualname__``): one of another name is refused, and one of the same name
        is trusted to be the same function (two lambdas of one scope cannot be told apart). The model is not checked:
        load into a detector around the same model. Nothing is changed when the state is
        refused.

        Args:
            state_dict: A dict from `state_dict` of the same detector class.

        Returns:
            ``self``.

        Raises:
            TypeError: ``state_dict`` is not a Mapping, or a value has the wrong type.
            ValueError: It comes from another detector class or version, its keys differ, a
                setting differs from this detector's (the message names both values), or a
                fitted value is invalid.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"`state_dict` must be a dict from `state_dict()`, got {type(state_dict).__name__}"
            )
        cls = type(self).__name__
        saved_cls, version = state_dict.get("detector"), state_dict.get("version")
        if saved_cls != cls or version != STATE_VERSION:
            raise ValueError(
                f"`state_dict` holds the state of a {saved_cls!r} (version {version!r}); this "
                f"is a {cls!r} (version {STATE_VERSION})"
            )
        _check_keys("state_dict", state_dict, {"detector", "version", "settings", *self._fitted})
        settings = state_dict["settings"]
        if not isinstance(settings, Mapping):
            raise TypeError(f"`state_dict['settings']` must be a dict, got {settings!r}")
        names = scored_settings(type(self))
        _check_keys("state_dict['settings']", settings, set(names))
        for name in names:
            self._check_saved_setting(name, settings[name])
        fitted = self._checked_fitted(state_dict)
        for name, value in fitted.items():
            setattr(self, name, value)
        return self

    def _check_saved_setting(self, name: str, saved: Any) -> None:
        """Refuse a saved setting that differs from this detector's."""
        current = getattr(self, name)
        if isinstance(saved, Mapping) and set(saved) == {"callable"}:
            same = callable(current) and _saved(current) == saved  # a function of that name
        else:
            descriptor: Setting[Any] = getattr(type(self), name)
            try:
                checked = descriptor.check(name, saved)
            except (TypeError, ValueError) as err:
                raise ValueError(f"`state_dict` holds an invalid `{name}`: {err}") from err
            same = not callable(current) and same_setting(current, checked)
        if not same:
            shown = _shown(saved)
            raise ValueError(
                f"`state_dict` was saved with {name}={shown}, but this {type(self).__name__} "
                f"has {name}={_shown(current)}: the saved calibration holds only for its own "
                f"settings (they are checked, not restored); build the detector with "
                f"{name}={shown}"
            )

    def _checked_fitted(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The fitted state in ``state``, validated: name -> value to assign."""
        return {"threshold_": check_threshold(state["threshold_"])}

    # ------------------------------------------------------------------ scoring

    def _score_batch(self, inputs: Tensor) -> BatchResult:
        raise NotImplementedError

    def _collect(
        self, inputs: Data, name: str, fn: Callable[[Tensor], BatchResult] | None = None
    ) -> tuple[Tensor, Tensor, int | None]:
        """Scores ``(..., n)`` and classes ``(n,)`` of every batch by ``fn`` (default:
        `_score_batch`), concatenated along the last dim, and the number of classes (``None``
        for empty inputs)."""
        self._check_fitted()
        fn = fn or self._score_batch
        items, total, out_device = batches(inputs, name, self.batch_size, self.input_key)
        scores, classes = [], []
        num_classes = None
        with eval_mode(self.model):
            for batch in progress(items, total, self.progress, self._desc):
                if check_batch(batch, name).shape[0] == 0:
                    continue
                s, c, num_classes = fn(batch)
                scores.append(s)  # kept where computed: one transfer at the end
                classes.append(c)
        if scores:
            scores_t = torch.cat(scores, dim=-1).to(out_device)
            return scores_t, torch.cat(classes).to(out_device), num_classes
        if isinstance(inputs, Tensor):  # an empty batch gives empty results
            empty = torch.empty(0, dtype=torch.float64, device=out_device)
            return empty, torch.empty(0, dtype=torch.long, device=out_device), None
        raise ValueError(f"`{name}` yielded no samples")

    def score(self, inputs: Data) -> Tensor:
        """Scores ``(B,)``, float64, higher = more in-distribution; NaN where not computable.

        Args:
            inputs: A float tensor ``(B, ...)``, an ``(inputs, labels)`` pair, a dict holding
                the inputs under `input_key`, or an iterable of batches (e.g. a `DataLoader`,
                also over an `IterableDataset`) where a batch is a tensor, a tuple/list whose
                first element is the input, or a dict holding it under `input_key` (a Hugging
                Face image `DataLoader`); labels and other entries are ignored.

        Returns:
            Shape ``(B,)`` (total number of samples), detached. On the input's device for a
                tensor; concatenated on the CPU for an iterable. A non-finite score is returned as
                it is (`gq_loss.metrics.ood_metrics` refuses it). A sample's score can change in
                its last bits with the batch it is scored in (the model's kernels round
                differently for other batch shapes); `calibrate` leaves a margin for that.
        """
        return self._collect(inputs, "inputs")[0]

    def __call__(self, inputs: Data) -> Tensor:
        return self.score(inputs)

    def fit(self: D, id_train_data: Any) -> D:
        """Nothing to estimate for this score; returns ``self`` (see the protocol)."""
        return self

    def calibrate(self: D, id_data: Data, *, tpr: float = 0.95) -> D:
        """Set `threshold_` so that a share ``tpr`` of ``id_data`` scores at least it, in any
        batches.

        With ``n`` scores sorted in decreasing order and ``k = ceil(tpr · n)``, the threshold is
        the ``k``-th score lowered by a margin: `CALIBRATION_MARGIN` (``1e-4``) times the median
        distance of the scores to the ``k``-th (`calibration_margin`). A sample's score changes
        in its last bits with the batch it is scored in (measured: up to ``8.4e-6`` of that
        distance for float32 models on the CPU, ``benchmarks/calibration_margin.py``), and the
        margin keeps those changes from dropping it below the threshold: on ``id_data`` itself
        at least ``k`` samples are accepted whatever ``batch_size`` or batching `predict` uses,
        and more than ``k`` only where other scores lie within the margin below the ``k``-th. A median cannot be moved
        far by a few outliers (a corrupted image, a sample far out of range): fewer than half
        of the scores cannot make the margin larger than the distance of the others to the
        ``k``-th. Batch effects larger than the margin (half precision, TF32 convolutions, a
        model whose scores hardly vary) are not covered.

        Args:
            id_data: In-distribution validation data, as for `score`.
            tpr: Target share of accepted in-distribution samples, in ``(0, 1]``.

        Returns:
            ``self``.

        Raises:
            ValueError: ``id_data`` is empty, some of its scores are NaN or infinite (an input
                the detector cannot score cannot set what counts as in-distribution), or
                ``ood_label`` is a class of the model.
        """
        tpr = check_fraction("tpr", tpr)
        scores, _, num_classes = self._collect(id_data, "id_data")
        check_ood_label(self.ood_label, num_classes)
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
            ValueError: ``ood_label`` is a class of the model (in ``[0, N)``).
        """
        self._check_fitted()
        threshold = self.threshold_
        if threshold is None:
            raise NotFittedError(
                f"{type(self).__name__} has no threshold: call calibrate(id_data) before "
                "predict() (assigning a setting that changes scores drops the threshold)"
            )
        scores, classes, num_classes = self._collect(inputs, "inputs")
        check_ood_label(self.ood_label, num_classes)
        accepted = torch.isfinite(scores) & (scores >= threshold)
        return classes.masked_fill(~accepted, self.ood_label)


#: Scores ``(..., B)``, classes ``(B,)`` and the number of classes of one batch.
BatchResult = tuple[Tensor, Tensor, int]

#: Version of the `Detector.state_dict` format.
STATE_VERSION = 1

#: `Detector.calibrate` lowers the threshold by this share of the median distance of the
#: calibration scores to the threshold's score (`calibration_margin`), so that the last-bit
#: changes of a score with its batch cannot drop a calibration sample below it.
CALIBRATION_MARGIN = 1e-4


def scored_settings(cls: type) -> list[str]:
    """The settings of ``cls`` that change scores, but the model: what `state_dict` checks."""
    return [name for name in settings_of(cls) if name != "model" and getattr(cls, name).invalidates]


def check_threshold(value: Any) -> float | None:
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"`threshold_` must be a real number or None, got {value!r}")
        if math.isnan(value):
            raise ValueError("`threshold_` must not be NaN")
        value = float(value)
    return value


def _saved(value: Any) -> Any:
    """A setting as `state_dict` stores it: as it is, or ``{"callable": name}``."""
    if callable(value):
        return {"callable": getattr(value, "__qualname__", type(value).__name__)}
    return value


def _shown(value: Any) -> str:
    """A setting in a message: its repr, or ``a callable 'name'`` (also as saved)."""
    if callable(value):
        value = _saved(value)
    if isinstance(value, Mapping) and set(value) == {"callable"}:
        return f"a callable {value['callable']!r}"
    return repr(value)


def _check_keys(name: str, mapping: Mapping[str, Any], expected: set[str]) -> None:
    missing, unexpected = expected - set(mapping), set(mapping) - expected
    if missing or unexpected:
        raise ValueError(
            f"`{name}` must have the keys {sorted(expected)}; missing {sorted(missing)}, "
            f"unexpected {sorted(map(str, unexpected))}"
        )


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
    """The ``ceil(tpr · n)``-th largest of ``scores`` ``(n,)``, which must be finite, lowered by
    `calibration_margin`."""
    check_scores(scores, name, "calibrate on")
    k = max(1, math.ceil(tpr * scores.numel() - 1e-9))  # tolerance for tpr*n rounding up
    ordered = torch.sort(float64(scores).cpu(), descending=True).values
    return float(ordered[k - 1]) - calibration_margin(ordered, k)


def calibration_margin(ordered: Tensor, k: int) -> float:
    """How far below the ``k``-th of the scores ``ordered`` (float64, decreasing) the threshold
    lies: `CALIBRATION_MARGIN` times the median of ``|s_i - s_k|`` over all scores.

    The batch effect on a score is a share of how much the scores vary, so the margin is one
    too; the median distance to the ``k``-th (unlike the range, which one corrupted sample can
    make a million times larger) moves little when fewer than half of the scores are outliers.
    Where more than half of them equal the ``k``-th exactly (saturated or identical scores),
    that median is 0 and the range is used instead, the margin of earlier versions."""
    spread = float((ordered - ordered[k - 1]).abs().median())
    if spread == 0.0:
        spread = float(ordered[0] - ordered[-1])
    return CALIBRATION_MARGIN * spread
