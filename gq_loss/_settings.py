"""The detectors' settings: the `Setting` descriptor every detector declares its public
arguments with (validated on assignment, dropping stale fitted state), and the checks of the
protocol's own settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ._runtime import OutputSpec, check_output_spec

if TYPE_CHECKING:
    from ._detector import Detector

T = TypeVar("T")


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
    root: type | None = None  # the protocol: the first class of the MRO that declares settings
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, Setting) and name not in own:
                root = root or klass
                own.append(name)
    base = [name for name in own if root is not None and name in vars(root) and name != "model"]
    return ["model"] + [n for n in own if n not in base and n != "model"] + base


def check_int(name: str, value: Any) -> int:
    """An int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """A bool."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}")
    return value


def check_output(name: str, value: Any) -> OutputSpec | None:
    """An ``output=`` (`check_output_spec`)."""
    return check_output_spec(value)


def check_ood_label(label: int, num_classes: int | None) -> None:
    """Refuse an ``ood_label`` that is a class index of a model with ``num_classes`` classes."""
    if num_classes is not None and 0 <= label < num_classes:
        raise ValueError(
            f"`ood_label`={label} is a class of this model (classes 0 to {num_classes - 1}): a "
            "rejected input could not be told from a prediction of that class; use a label "
            f"outside [0, {num_classes}), e.g. -1 (the default) or {num_classes}"
        )


def check_key(name: str, value: Any) -> str:
    """A key of dict batches (a str)."""
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str (a key of dict batches), got {value!r}")
    return value
