"""GQ's settings are validated once: per `gq_loss()` call, and once per assignment for `GQLoss`."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from gq_loss import GQLoss, gq_loss
from gq_loss._gq_settings import SETTINGS, GQSettings
from gq_loss._plan import plan_method

CHECKS = (
    "check_choice",
    "check_positive",
    "check_nonnegative",
    "check_norm_order",
    "check_optional_int",
)
# (`output` is also checked by the runtime's `select_output` at each model call, so not counted.)


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts every call of a setting check, wherever in gq_loss it is imported, by argument
    name (`check_norm_order` takes no name: `p`)."""
    seen: Counter[str] = Counter()

    def counting(check: Callable[..., Any], fixed: str | None) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen[fixed if fixed is not None else str(args[0])] += 1
            return check(*args, **kwargs)

        return wrapper

    fixed = {"check_norm_order": "p"}
    for name, module in list(sys.modules.items()):
        if name != "gq_loss" and not name.startswith("gq_loss."):
            continue
        for check in CHECKS:
            if hasattr(module, check):
                wrapped = counting(getattr(module, check), fixed.get(check))
                monkeypatch.setattr(module, check, wrapped)
    return seen


def small() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    return model, torch.randn(2, 4), torch.tensor([0, 2])


def test_a_gq_loss_call_validates_each_setting_once(checks: Counter[str]) -> None:
    model, x, y = small()
    gq_loss(model, x, y, method="loop")
    for name in ("temperature", "p", "formulation", "reduction", "estimator", "operand"):
        assert checks[name] == 1, (name, checks)
    assert checks["method"] == 1, checks
    assert max(checks.values()) == 1, checks


def test_a_built_gq_loss_validates_nothing_per_call(checks: Counter[str]) -> None:
    model, x, y = small()
    criterion = GQLoss(method="loop")
    built = sum(checks.values())
    assert built and max(checks.values()) == 1, checks
    criterion(model, x, y)
    criterion(model, x, y)
    assert sum(checks.values()) == built, checks  # the cached settings: no check per call
    criterion.temperature = 2.0  # an assignment: validated once, on the next call
    criterion(model, x, y)
    criterion(model, x, y)
    assert sum(checks.values()) == 2 * built, checks


def test_settings_are_frozen_and_resolve_operand_and_method() -> None:
    settings = GQSettings(formulation="reference", operand=None)
    assert settings.norms.operand == "logits" and settings.norms.method == "loop"
    chunked = GQSettings(chunk_size=2)
    assert (chunked.method, chunked.norms.method, chunked.norms.resolved) == (
        "auto",
        "auto",
        "recompute",
    )
    with pytest.raises(AttributeError):
        settings.temperature = 2.0  # type: ignore[misc]
    assert tuple(f for f in GQSettings.__dataclass_fields__ if f != "norms") == SETTINGS


def test_plan_method_refuses_by_name_what_cannot_run() -> None:
    assert plan_method("auto", nn.Linear(2, 2)) == "auto"
    with pytest.raises(TypeError, match=r"method='recompute' needs an nn\.Module"):
        plan_method("recompute", lambda t: t)
    with pytest.raises(TypeError, match=r"nn.DataParallel.*use method='loop'"):
        plan_method("jacrev", nn.DataParallel(nn.Linear(2, 2)))
