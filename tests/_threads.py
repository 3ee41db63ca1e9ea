"""Forced thread interleavings for the detector thread tests: workers started together, and
modules that make them take turns inside a forward."""

from __future__ import annotations

import threading
from collections.abc import Callable

from torch import Tensor, nn

WAIT = 20.0  # seconds: only reached when an interleaving deadlocks, which fails the test


ROLE = threading.local()  # set in the worker threads only: the main thread passes every gate


def run_threads(workers: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def guarded(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except BaseException as err:  # reported in the main thread
                errors.append(err)

        return run

    threads = [threading.Thread(target=guarded(w)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * WAIT)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]


class InTurn(nn.Module):
    """Lets the worker threads through one at a time, in the order of their ``ROLE.index``,
    once all of them are inside the forward; `Release` passes the turn on."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.entered = threading.Barrier(n, timeout=WAIT)
        self.turn = threading.Condition()
        self.next = 0

    def forward(self, x: Tensor) -> Tensor:
        index = getattr(ROLE, "index", None)
        if index is not None:
            self.entered.wait()  # every thread has placed its hook by now
            with self.turn:
                assert self.turn.wait_for(lambda: self.next == index, timeout=WAIT)
        return x


class Release(nn.Module):
    """After the gated layers: pass the turn on, then wait until every thread got here."""

    def __init__(self, gate: InTurn) -> None:
        super().__init__()
        self.gate = [gate]  # not a submodule
        self.done = threading.Barrier(gate.n, timeout=WAIT)

    def forward(self, x: Tensor) -> Tensor:
        if getattr(ROLE, "index", None) is not None:
            gate = self.gate[0]
            with gate.turn:
                gate.next += 1
                gate.turn.notify_all()
            self.done.wait()  # no thread reads its features before all layers have run
        return x
