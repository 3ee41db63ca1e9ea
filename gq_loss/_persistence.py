"""A detector's persistence, as PyTorch's ``state_dict``: the fitted state without the model,
with the settings it holds for, checked (not restored) on load. A mixin of
[`Detector`][gq_loss.Detector]."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, TypeVar

from torch import Tensor

from ._settings import Setting, same_setting, settings_of

P = TypeVar("P", bound="Persistent")

#: Version of the `Persistent.state_dict` format.
STATE_VERSION = 1


class Persistent:
    """`state_dict` / `load_state_dict` of a detector: its fitted state (named by ``_fitted``)
    and the settings that change scores."""

    #: Names of the fitted state, saved by `state_dict`.
    _fitted: tuple[str, ...] = ("threshold_",)

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
            >>> import torch
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

    def load_state_dict(self: P, state_dict: Mapping[str, Any]) -> P:
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


def scored_settings(cls: type) -> list[str]:
    """The settings of ``cls`` that change scores, but the model: what `state_dict` checks."""
    return [name for name in settings_of(cls) if name != "model" and getattr(cls, name).invalidates]


def check_threshold(value: Any) -> float | None:
    """A threshold: a real number (not NaN) or None."""
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
    """Refuse a ``mapping`` whose keys are not ``expected``, naming the missing and the extra."""
    missing, unexpected = expected - set(mapping), set(mapping) - expected
    if missing or unexpected:
        raise ValueError(
            f"`{name}` must have the keys {sorted(expected)}; missing {sorted(missing)}, "
            f"unexpected {sorted(map(str, unexpected))}"
        )
