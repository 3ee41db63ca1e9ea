"""The label check of GQ and `class_gradient_norms`: every call on the CPU, no sync per step on CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gq_loss import class_gradient_norms, gq_loss
from gq_loss._validation import check_class_indices


def small() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def test_cpu_labels_are_range_checked_on_every_call() -> None:
    model, x = small(), torch.randn(2, 4)
    gq_loss(model, x, torch.tensor([0, 2]))  # a good first batch...
    class_gradient_norms(model, x, classes=torch.tensor([[0], [2]]))
    # ...does not switch the check off for the model's later batches on the CPU
    with pytest.raises(ValueError, match=r"`targets` must hold class indices in \[0, 3\)"):
        gq_loss(model, x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"`classes` must hold class indices in \[0, 3\)"):
        class_gradient_norms(model, x, classes=torch.tensor([[0], [-1]]))


@pytest.mark.cuda
def test_cuda_labels_are_checked_until_a_batch_passes_then_without_a_sync() -> None:
    model = small().cuda()
    bad, good = torch.tensor([0, 3], device="cuda"), torch.tensor([0, 2], device="cuda")
    for _ in range(2):  # a refused batch does not count as checked
        with pytest.raises(ValueError, match=r"`targets` must hold class indices in \[0, 3\)"):
            check_class_indices("targets", bad, 2, 3, ndim=1, model=model)
    check_class_indices("targets", good, 2, 3, ndim=1, model=model)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        check_class_indices("targets", good, 2, 3, ndim=1, model=model)  # no device sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match="class indices"):  # another model: checked again
        check_class_indices("targets", bad, 2, 3, ndim=1, model=small().cuda())
