"""A layer's output during a forward, seen from one thread: the capture behind
[`MahalanobisDetector`][gq_loss.MahalanobisDetector]'s ``layer=``."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn


@contextlib.contextmanager
def capture_output(module: nn.Module, copy: Callable[[Any], Any]) -> Iterator[list[Any]]:
    """A forward hook on ``module`` for the duration, removed afterwards (also on an error).

    Yields a list that holds ``copy(output)`` of the last forward of ``module`` run by the
    thread that entered the context (empty until one runs): another thread's forward of the
    same module, scoring at the same time, is not recorded. ``copy`` runs at the moment the
    module returns, so in-place operations later in the forward cannot reach what it keeps.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(inplace=True))
        >>> with capture_output(net[0], lambda out: out.clone()) as captured:
        ...     _ = net(torch.ones(4, 2))
        >>> len(captured), captured[0].shape, len(net[0]._forward_hooks)
        (1, torch.Size([4, 3]), 0)
    """
    captured: list[Any] = []
    caller = threading.get_ident()

    def record(_module: nn.Module, _inputs: Any, out: Any) -> None:
        if threading.get_ident() == caller:  # not another thread's forward of the module
            captured[:] = [copy(out)]

    handle = module.register_forward_hook(record)
    try:
        yield captured
    finally:
        handle.remove()
