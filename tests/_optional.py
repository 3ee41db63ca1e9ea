"""Optional integrations for the tests: skip, naming why, when one is absent or cannot import.

A torchvision built for another torch is installed in many environments; it raises
``RuntimeError: operator torchvision::nms does not exist`` on import, and transformers' models
and Lightning (through torchmetrics) import it. ``pytest.importorskip`` catches only
``ImportError``, so their test files would fail to collect there instead of skipping.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def import_or_skip(name: str, *, probe: str | None = None) -> ModuleType:
    """``import name`` (and ``import probe``, a submodule that imports the heavy parts), or skip
    the calling test module with the reason: not installed, or the exception its import raised."""
    try:
        module = importlib.import_module(name)
        if probe is not None:
            importlib.import_module(probe)
    except ImportError as err:
        pytest.skip(f"{name} is not installed ({err})", allow_module_level=True)
    except Exception as err:  # e.g. a torchvision built for another torch, imported by `name`
        pytest.skip(
            f"{name} does not import here ({type(err).__name__}: {err}); a torchvision built for "
            "another torch breaks it: uninstall torchvision or install the matching build",
            allow_module_level=True,
        )
    return module
