"""GQ under FSDP2 (`fully_shard`): two gloo processes on CPU equal one process, method by method.

Two processes run `tests/_fsdp_worker.py` on 4 samples each; the reference here runs the same
weights on all 8. Every loss is a mean over the local batch and FSDP averages the gradients over
the processes, so both give the gradient of the mean over all 8 samples (the model has no batch
coupling).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _fsdp_worker import full_grads, make_data

from gq_loss import gq_loss

pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("fsdp") / "results.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    worker = [sys.executable, str(ROOT / "tests" / "_fsdp_worker.py"), str(path)]
    procs = [
        subprocess.Popen([*worker, str(rank)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]  # fmt: skip
    try:
        outputs = [proc.communicate(timeout=180)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert all(proc.returncode == 0 for proc in procs), "\n".join(o[-4000:] for o in outputs)
    results: dict[str, Any] = torch.load(path, weights_only=False)
    return results


def one_process(
    ce: bool = True, **kwargs: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """GQ (and CE) on all 8 samples in this process: the value and the parameter gradients."""
    model, x, y = make_data()
    gq, logits = gq_loss(model, x, y, return_logits=True, **kwargs)
    (F.cross_entropy(logits, y) + gq if ce else gq).backward()
    return gq.detach(), full_grads(model)


def assert_grads_equal(
    got: dict[str, torch.Tensor | None], want: dict[str, torch.Tensor | None]
) -> None:
    """Equal gradients, and a gradient for every parameter that one process gives one."""
    assert got.keys() == want.keys()
    assert [n for n, g in got.items() if g is None] == [n for n, g in want.items() if g is None]
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    ("label", "method", "chunk"),
    [("loop", "loop", None), ("recompute", "recompute", 2), ("batched", "batched", None),
     ("loop, no reshard after forward", "loop", None), ("separate forward", "loop", None)],
)  # fmt: skip
def test_fsdp2_gradient_equals_one_process(
    sharded: dict[str, Any], label: str, method: str, chunk: int | None
) -> None:
    _, want = one_process(method=method, chunk_size=chunk)
    for _, grads in sharded[label]:  # every step: FSDP's state comes back after each call
        assert_grads_equal(grads, want)


def test_fsdp2_gq_alone_and_values(sharded: dict[str, Any]) -> None:
    _, want = one_process(ce=False)
    assert_grads_equal(sharded["gq alone"][1], want)
    model, x, y = make_data()
    torch.testing.assert_close(
        sharded["no_grad"], gq_loss(model, x[:4], y[:4], reduction="none"), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize(
    ("label", "message"),
    [("jacrev", r"TypeError: method='jacrev' cannot run a model with FSDP2 .*'loop', 'recompute'"),
     ("reduction none", r"ValueError: reduction='none' cannot be trained under FSDP2 .*'mean'"),
     ("create_graph", r"ValueError: create_graph=True cannot be used under FSDP2 .*gq_loss")],
)  # fmt: skip
def test_fsdp2_refusals_name_what_works(sharded: dict[str, Any], label: str, message: str) -> None:
    assert sharded[label] is not None and re.match(message, sharded[label]), sharded[label]
