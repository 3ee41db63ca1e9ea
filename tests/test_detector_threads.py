"""One detector shared by several threads: each call gives its serial result, and the model's
modes and buffers come back as they were.

The interleavings that went wrong are forced, not hoped for: a gate module inside the model
holds each thread's forward at a chosen point (events and barriers with timeouts; no sleeps)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from _threads import ROLE, WAIT, run_threads
from torch import Tensor, nn

from gq_loss import Detector, EnergyDetector, MahalanobisDetector, MSPDetector, ODINDetector


class HoldSecond(nn.Module):
    """Both workers meet inside the forward; the second then waits until the first worker's
    whole ``score`` call has returned (its eval mode left) before it goes on."""

    def __init__(self) -> None:
        super().__init__()
        self.first_inside = threading.Event()
        self.second_inside = threading.Event()
        self.first_done = threading.Event()

    def forward(self, x: Tensor) -> Tensor:
        role = getattr(ROLE, "index", None)
        if role == 0:
            self.first_inside.set()
            assert self.second_inside.wait(WAIT)
        elif role == 1:
            self.second_inside.set()
            assert self.first_done.wait(WAIT)
        return x


def bn_model(hold: nn.Module) -> nn.Module:
    bn = nn.BatchNorm1d(8)
    with torch.no_grad():  # running statistics far from any batch's
        bn.running_mean.uniform_(-2.0, 2.0)
        bn.running_var.uniform_(0.5, 3.0)
    return nn.Sequential(nn.Linear(6, 8), hold, bn, nn.Tanh(), nn.Linear(8, 5)).double()


def overlapping_calls(make: Callable[[nn.Module], Detector], method: str) -> None:
    """The first call enters eval mode, then the second; the first returns while the second is
    still in its forward. The second must still run in eval mode, and the model must end in the
    train mode it started in, its BatchNorm statistics untouched."""
    torch.manual_seed(0)
    hold = HoldSecond()
    model = bn_model(hold).train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    detector = make(model)
    calibration = torch.randn(40, 6, dtype=torch.float64)
    detector.calibrate(calibration, tpr=0.5)
    inputs = [torch.randn(6, 6, dtype=torch.float64) for _ in range(2)]
    serial = [getattr(detector, method)(x) for x in inputs]
    assert all(m.training for m in model.modules())
    got: dict[int, Tensor] = {}

    def first() -> None:
        ROLE.index = 0
        got[0] = getattr(detector, method)(inputs[0])
        hold.first_done.set()

    def second() -> None:
        ROLE.index = 1
        assert hold.first_inside.wait(WAIT)  # the first call is in eval mode by now
        got[1] = getattr(detector, method)(inputs[1])

    run_threads([first, second])
    assert torch.equal(got[0], serial[0])
    assert torch.equal(got[1], serial[1])  # not scored in train mode
    assert all(m.training for m in model.modules())  # the mode it started in
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key


def test_msp_score_of_overlapping_calls_keeps_eval_mode_and_restores_train_mode():
    overlapping_calls(lambda m: MSPDetector(m, temperature=1000.0), "score")


def test_odin_predict_of_overlapping_calls_keeps_eval_mode_and_restores_train_mode():
    overlapping_calls(lambda m: ODINDetector(m, temperature=10.0, epsilon=0.01), "predict")


def test_energy_and_mahalanobis_of_overlapping_calls():
    overlapping_calls(EnergyDetector, "predict")
    train = (torch.randn(60, 6, dtype=torch.float64), torch.arange(60) % 3)
    overlapping_calls(lambda m: MahalanobisDetector(m, layer="3", ridge=1e-3).fit(train), "score")


def test_many_threads_on_every_detector_give_the_serial_results():
    """Plain concurrent use, started together by a barrier: a smoke test of the whole path
    (the forced interleavings above are the tests that fail without the fix)."""
    torch.manual_seed(0)
    model = bn_model(nn.Identity()).train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    train = (torch.randn(60, 6, dtype=torch.float64), torch.arange(60) % 3)
    detectors = [
        ODINDetector(model, temperature=10.0, epsilon=0.01),
        MSPDetector(model),
        EnergyDetector(model),
        MahalanobisDetector(model, layer="3", ridge=1e-3).fit(train),
    ]
    calibration = torch.randn(40, 6, dtype=torch.float64)
    for detector in detectors:
        detector.calibrate(calibration)
    inputs = [torch.randn(7, 6, dtype=torch.float64) for _ in range(6)]
    serial = [[(d.score(x), d.predict(x)) for d in detectors] for x in inputs]
    start = threading.Barrier(len(inputs), timeout=WAIT)
    got: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def worker(i: int) -> Callable[[], None]:
        def work() -> None:
            start.wait()
            got[i] = [
                (d.score(inputs[i]), d.predict(inputs[i])) for _ in range(3) for d in detectors
            ]

        return work

    run_threads([worker(i) for i in range(len(inputs))])
    for i, expected in enumerate(serial):
        for (score, label), (want_score, want_label) in zip(got[i], expected * 3, strict=True):
            assert torch.equal(score, want_score) and torch.equal(label, want_label)
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
