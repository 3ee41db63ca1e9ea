"""GQ with the data-parallel wrappers: DistributedDataParallel with `find_unused_parameters=True`
(one process, gloo) and `nn.DataParallel` (refused where its methods cannot run it)."""

from __future__ import annotations

import copy
import socket
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _oracles import F64, brute_gq
from torch import Tensor, nn

from gq_loss import gq_loss


class WithUnused(nn.Module):
    """A classifier with a parameter its forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.fixture
def process_group() -> Iterator[None]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


X, Y = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 0])


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_ddp_find_unused_parameters_with_recompute(
    process_group: None, chunk_size: int | None
) -> None:
    torch.manual_seed(0)
    model = WithUnused()
    wide = copy.deepcopy(model).to(F64)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    for _ in range(2):  # DDP's bookkeeping must hold over steps
        model.zero_grad(set_to_none=True)
        gq, logits = gq_loss(
            ddp, X, Y, method="recompute", chunk_size=chunk_size, return_logits=True
        )
        (F.cross_entropy(logits, Y) + gq).backward()
    want = F.cross_entropy(wide(X.to(F64)), Y) + brute_gq(wide, X.to(F64), Y).mean()
    want.backward()
    assert model.unused.weight.grad is None
    for name in ("a", "b"):
        for got_p, want_p in zip(
            getattr(model, name).parameters(), getattr(wide, name).parameters(), strict=True
        ):
            torch.testing.assert_close(got_p.grad.double(), want_p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["recompute", "jacrev"])
def test_data_parallel_refuses_the_methods_that_cannot_run_it(method: str) -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DataParallel without GPUs
        wrapped = nn.DataParallel(model)
    with pytest.raises(
        TypeError, match=rf"method='{method}' cannot run an nn.DataParallel.*'loop'"
    ):
        gq_loss(wrapped, X, Y, method=method)
    if method == "recompute":  # auto with chunk_size is recompute
        with pytest.raises(TypeError, match=r"DistributedDataParallel"):
            gq_loss(wrapped, X, Y, chunk_size=2)
    # the methods it names run it
    wide = copy.deepcopy(model).to(F64)
    want = brute_gq(wide, X.to(F64), Y).mean()
    for other in ("loop", "batched", "auto"):
        torch.testing.assert_close(
            gq_loss(wrapped, X, Y, method=other).double(), want, rtol=1e-5, atol=0
        )
