"""The loss and the detector inside a real Lightning loop (skipped when Lightning is absent).

Lightning runs ``validation_step`` and ``predict_step`` under ``torch.inference_mode()``, so this
checks the two entry points where that matters: GQ logged during validation and ODIN inside
``predict_step``.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _optional import import_or_skip
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gq_loss import GQLoss, ODINDetector

L = import_or_skip("lightning")

NUM_CLASSES = 4


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, NUM_CLASSES)
    )


class GQModule(L.LightningModule):
    def __init__(self, detector_data: Tensor) -> None:
        super().__init__()
        self.net = _net()
        self.criterion = GQLoss()
        self.lam = 0.5
        self.detector_data = detector_data
        self.detector: ODINDetector | None = None
        self.val_gq: list[float] = []
        self.val_modes: list[bool] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        gq, logits = self.criterion(self.net, x, y, return_logits=True)
        loss = F.cross_entropy(logits, y) + self.lam * gq
        self.log("train_gq", gq)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # Grad mode is off here: no_grad during fit, inference_mode in Trainer.validate.
        assert not torch.is_grad_enabled()
        self.val_modes.append(torch.is_inference_mode_enabled())
        x, y = batch
        gq = self.criterion(self.net, x, y)
        assert not gq.requires_grad
        self.val_gq.append(float(gq))
        self.log("val_gq", gq)

    def on_predict_start(self) -> None:
        self.detector = ODINDetector(self.net, temperature=1000.0, epsilon=0.01)
        self.detector.calibrate(self.detector_data, tpr=0.9)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        assert self.detector is not None
        return self.detector.predict(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(seed: int, n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _trainer(tmp_path: object, **kwargs: object) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **kwargs,
    )


@pytest.mark.slow
def test_fit_validate_and_predict_with_gq_and_odin(tmp_path: object) -> None:
    torch.manual_seed(0)
    module = GQModule(detector_data=torch.randn(20, 3, 6, 6))
    before = [p.detach().clone() for p in module.net.parameters()]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*small.*log_every_n_steps.*")
        trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=1, num_sanity_val_steps=0)
        trainer.fit(module, _loader(0), _loader(1))

        # Training went through GQ's double backward: every weight moved.
        assert trainer.global_step == 2
        assert all(
            not torch.equal(a, b) for a, b in zip(before, module.net.parameters(), strict=True)
        )

        # Validation logged GQ under no_grad (during fit) and under inference_mode
        # (Trainer.validate), equal to the value computed with gradients on.
        trainer.validate(module, _loader(1), verbose=False)
        assert module.val_modes == [False, True]
        x_val, y_val = next(iter(_loader(1)))
        module.net.eval()
        expected = GQLoss()(module.net, x_val, y_val).item()
        assert 0.0 < expected < 1.0
        for value in module.val_gq:
            assert math.isclose(value, expected, rel_tol=1e-5)
        assert math.isclose(float(trainer.callback_metrics["val_gq"]), expected, rel_tol=1e-5)

        # Trainer.predict: ODIN inside predict_step equals ODIN outside Lightning.
        predictions = torch.cat(trainer.predict(module, _loader(2)))
    assert module.detector is not None
    x_pred = torch.cat([b[0] for b in _loader(2)])
    assert torch.equal(predictions, module.detector.predict(x_pred))
    assert predictions.shape == (16,)
    assert bool(((predictions == -1) | ((predictions >= 0) & (predictions < NUM_CLASSES))).all())


@pytest.mark.parametrize("method", ["auto", "loop", "recompute", "batched", "jacrev"])
def test_fabric_bf16_mixed_refuses_the_wrapped_model_and_its_pattern_works(method: str) -> None:
    from lightning.fabric import Fabric

    from gq_loss import gq_loss
    from gq_loss.kernels import auto_choice

    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    torch.manual_seed(0)
    model = _net()
    reference = copy.deepcopy(model)
    wrapped, _ = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.rand(8, 3, 6, 6), torch.arange(8) % NUM_CLASSES
    # Fabric's outputs refuse every backward but fabric.backward(loss): refused, with the pattern
    with pytest.raises(TypeError, match=r"(?s)Fabric.*`\.module` inside `fabric\.autocast\(\)`"):
        gq_loss(wrapped, x, y, method=method)
    # the pattern: the module inside fabric.autocast(), then fabric.backward
    with fabric.autocast():
        gq, logits = gq_loss(wrapped.module, x, y, method=method, return_logits=True)
    assert logits.dtype == torch.bfloat16  # Fabric's precision reached GQ's forward
    fabric.backward(F.cross_entropy(logits, y) + gq)
    # the same step as plain torch bf16 autocast, by the same method (auto: the one it chose;
    # two methods add bf16 terms in different orders)
    chosen = auto_choice(model)
    same = chosen.method if method == "auto" and chosen is not None else method
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_logits = gq_loss(reference, x, y, method=same, return_logits=True)
    (F.cross_entropy(want_logits, y) + want).backward()
    torch.testing.assert_close(gq, want, rtol=1e-6, atol=0)
    for got_p, want_p in zip(model.parameters(), reference.parameters(), strict=True):
        assert got_p.grad is not None and want_p.grad is not None
        torch.testing.assert_close(got_p.grad, want_p.grad, rtol=1e-5, atol=1e-7)
