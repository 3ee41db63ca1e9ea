"""gq-loss's own error type: `GQLossError`, a `RuntimeError`, recognised by type."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import gq_loss
from gq_loss import GQLossError
from gq_loss import gq_loss as gq_fn
from gq_loss._autograd import second_order_errors

Y = torch.tensor([0, 1, 2])


class Reentrant(nn.Module):
    """A model whose body runs in a reentrant checkpoint, which refuses `autograd.grad`."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        hidden = checkpoint(self.body, x, use_reentrant=True)
        return self.head(torch.tanh(hidden))


def test_gq_loss_error_is_exported_and_a_runtime_error() -> None:
    assert "GQLossError" in gq_loss.__all__ and gq_loss.GQLossError is GQLossError
    assert issubclass(GQLossError, RuntimeError)


@pytest.mark.parametrize("method", ["loop", "jacrev"])
def test_a_translated_torch_error_is_a_gq_loss_error_and_a_runtime_error(method: str) -> None:
    with pytest.raises(RuntimeError, match=r"^gq_loss: .*use_reentrant") as info:
        gq_fn(Reentrant(), torch.randn(3, 4), Y, method=method).backward()
    err = info.value
    assert isinstance(err, GQLossError) and isinstance(err, RuntimeError)
    # torch's own refusal is the cause, and is not ours
    assert isinstance(err.__cause__, RuntimeError) and not isinstance(err.__cause__, GQLossError)


def test_an_own_run_time_refusal_is_a_gq_loss_error() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))
    gq = gq_fn(model, torch.randn(3, 4), Y, method="recompute")
    with pytest.raises(GQLossError, match="first-order gradients only"):
        torch.autograd.grad(gq, list(model.parameters()), create_graph=True)


def test_translation_is_recognised_by_type_not_by_text() -> None:
    # A translated error that holds the text of a torch refusal passes unchanged...
    ours = GQLossError("no double backward here: already translated")
    with pytest.raises(GQLossError) as info, second_order_errors():
        raise ours
    assert info.value is ours
    # ...and a plain RuntimeError with the same text is translated, whatever it starts with.
    theirs = RuntimeError("gq_loss-like text, but no double backward here")
    with (
        pytest.raises(GQLossError, match=r"^gq_loss: GQ differentiates") as info,
        second_order_errors(),
    ):
        raise theirs
    assert info.value.__cause__ is theirs
