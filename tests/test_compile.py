"""A compiled training step that calls GQ: GQ is a clean graph break, with the eager numbers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _oracles import F64, brute_gq
from torch import Tensor, nn

from gq_loss import GQLoss, gq_loss
from gq_loss.kernels import class_gradient_norms

# aot_eager traces with dynamo and AOTAutograd, as inductor does, without compiling C++.
BACKEND = "aot_eager"


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)
    ).eval()  # fmt: skip


X, Y = torch.rand(4, 3, 6, 6), torch.tensor([0, 1, 2, 4])


def grads(model: nn.Module) -> list[Tensor]:
    out = [q.grad.clone() for q in model.parameters() if q.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("method", ["loop", "recompute", "jacrev", "batched", "auto"])
def test_a_compiled_step_calling_gq_has_the_eager_numbers(method: str) -> None:
    model = cnn()

    def step(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        gq, logits = gq_loss(model, x, y, method=method, return_logits=True)
        loss = F.cross_entropy(logits, y) + gq
        loss.backward()
        return loss.detach()

    compiled = torch.compile(step, backend=BACKEND)
    got = compiled(model, X, Y)
    got_grads = grads(model)
    want = step(model, X, Y)
    want_grads = grads(model)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    # and the eager numbers are GQ's: the float64 brute force
    wide = copy.deepcopy(model).to(F64)
    want_gq = brute_gq(wide, X.to(F64), Y).mean()
    gq = torch.compile(lambda m, x, y: gq_loss(m, x, y, method=method), backend=BACKEND)
    torch.testing.assert_close(gq(model, X, Y).double(), want_gq, rtol=1e-5, atol=0)


def test_a_compiled_gqloss_module_and_class_gradient_norms_run_eagerly() -> None:
    model = cnn()
    criterion = torch.compile(GQLoss(), backend=BACKEND)
    torch.testing.assert_close(criterion(model, X, Y), GQLoss()(model, X, Y), rtol=1e-6, atol=0)
    norms = torch.compile(class_gradient_norms, backend=BACKEND)
    torch.testing.assert_close(norms(model, X), class_gradient_norms(model, X), rtol=1e-6, atol=0)


def test_a_compiled_model_inside_a_compiled_step() -> None:
    model = cnn()
    compiled_model = torch.compile(model, backend=BACKEND)

    @torch.compile(backend=BACKEND)
    def step(x: Tensor, y: Tensor) -> Tensor:
        gq, logits = gq_loss(compiled_model, x, y, return_logits=True)
        return F.cross_entropy(logits, y) + gq

    want = F.cross_entropy(model(X), Y) + gq_loss(model, X, Y)
    torch.testing.assert_close(step(X, Y), want, rtol=1e-6, atol=0)


def test_fullgraph_says_what_to_do() -> None:
    model = cnn()

    def step(x: Tensor, y: Tensor) -> Tensor:
        return gq_loss(model, x, y)

    compiled = torch.compile(step, backend=BACKEND, fullgraph=True)
    with pytest.raises(Exception, match=r"(?s)graph break.*compile the model instead"):
        compiled(X, Y)
