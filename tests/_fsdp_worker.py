"""One process of tests/test_fsdp.py: GQ on a small SDPA classifier under FSDP2.

Run as two processes, `python _fsdp_worker.py RESULTS RANK`, that meet through the file
`RESULTS.store` (gloo, CPU); each takes its half of the batch (4 of 8 samples). Rank 0 saves
every case's full parameter gradients (`DTensor.full_tensor()`), the GQ values and the
refusals' messages to `RESULTS`.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

F64 = torch.float64
CLASSES = 4


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = (
            t.reshape(batch, length, 2, -1).transpose(1, 2)
            for t in self.qkv(self.norm(x)).chunk(3, dim=-1)
        )
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return x + torch.tanh(self.out(attended.reshape(batch, length, dim)))


class Classifier(nn.Module):
    """Tokens `(B, 5, 6)` -> logits `(B, 4)`: an embedding plus learned position embeddings, two
    attention blocks, a head.

    The position embeddings (sharded on their own) do not depend on the input: GQ's input
    gradient never reaches them, only its parameter gradient does.
    """

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.pos = nn.Embedding(5, dim)
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.embed(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden.mean(dim=1))


def make_data() -> tuple[Classifier, Tensor, Tensor]:
    torch.manual_seed(0)
    model = Classifier().to(F64)
    return model, torch.randn(8, 5, 6, dtype=F64), torch.randint(0, CLASSES, (8,))


def full_grads(model: nn.Module) -> dict[str, Tensor | None]:
    """Every parameter's gradient, gathered; None where none arrived."""
    out: dict[str, Tensor | None] = {}
    for name, param in model.named_parameters():
        grad: Any = param.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        out[name] = None if grad is None else grad.detach().clone()
    return out


def main(path: str, rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    from gq_loss import class_gradient_norms, gq_loss

    dist.init_process_group(
        "gloo",
        init_method=f"file://{path}.store",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    base, x_all, y_all = make_data()
    x, y = x_all[4 * rank : 4 * rank + 4], y_all[4 * rank : 4 * rank + 4]

    def sharded(**options: Any) -> nn.Module:
        model = Classifier().to(F64)
        model.load_state_dict(base.state_dict())
        fully_shard(model.pos, **options)
        for block in model.blocks:
            fully_shard(block, **options)
        fully_shard(model, **options)
        return model

    def step(model: nn.Module, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor | None]]:
        model.zero_grad()
        gq, logits = gq_loss(model, x, y, return_logits=True, **kwargs)
        (F.cross_entropy(logits, y) + gq).backward()
        return gq.detach(), full_grads(model)

    results: dict[str, Any] = {}
    for method, chunk in (("loop", None), ("recompute", 2), ("batched", None)):
        model = sharded()
        # two steps: FSDP's settings and shards come back after each call
        results[method] = [step(model, method=method, chunk_size=chunk) for _ in range(2)]
    model = sharded(reshard_after_forward=False)
    results["loop, no reshard after forward"] = [step(model)]

    model = sharded()
    gq = gq_loss(model, x, y)
    aux = F.cross_entropy(model(x), y)  # CE from a second forward pass, after GQ's call
    (aux + gq).backward()
    results["separate forward"] = [(gq.detach(), full_grads(model))]

    model = sharded()
    gq = gq_loss(model, x, y)  # alone: no cross-entropy, the logits are not used
    gq.backward()
    results["gq alone"] = (gq.detach(), full_grads(model))
    with torch.no_grad():
        results["no_grad"] = gq_loss(model, x, y, reduction="none")

    refusals: dict[str, Callable[[], object]] = {
        "jacrev": lambda: gq_loss(model, x, y, method="jacrev"),
        "reduction none": lambda: gq_loss(model, x, y, reduction="none"),
        "create_graph": lambda: class_gradient_norms(model, x, create_graph=True),
    }
    for label, call in refusals.items():
        try:
            call()
            results[label] = None
        except (TypeError, ValueError) as err:
            results[label] = f"{type(err).__name__}: {err}"
    if rank == 0:
        torch.save(results, path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
