from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gq_loss import _auto

# The example scripts import their siblings by name (``from models import build_model``); the
# tests import them the same way (benchmarks use benchmarks/_examples_path.py, docs/examples.md).
EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

# The tests use tiny tensors: one intra-op thread avoids thread start-up and oversubscription
# costs that make them several times slower on a 2-core machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_rng() -> object:
    """Each test starts from a fixed seed and leaves the global RNG as it found it."""
    state = torch.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.set_rng_state(state)


@pytest.fixture(autouse=True, scope="session")
def _short_auto_probe() -> object:
    """`method="auto"` times the methods on each new model for up to `PROBE_SECONDS`; the tests
    build hundreds of tiny models, so they time the minimum number of rounds instead (the
    choice rule is the same; tests/test_auto.py checks it)."""
    saved = _auto.PROBE_SECONDS
    _auto.PROBE_SECONDS = 0.0
    yield
    _auto.PROBE_SECONDS = saved
