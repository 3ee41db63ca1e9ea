"""GQ through attention, compiled models and operations without a second derivative.

References: the same weights computing attention by hand (float64, eval mode), PyTorch's own
explicit attention path (`need_weights=True`), and `method="loop"` in train mode.
"""

from __future__ import annotations

import copy
import math
import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _oracles import F64, VARIANTS, FirstOrderTanh, brute_gq
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from gq_loss import GQLoss, gq_loss

Y = torch.tensor([0, 2, 1])


def param_grads(model: nn.Module, value: Tensor) -> list[Tensor]:
    params = list(model.parameters())
    out = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(q) if g is None else g for q, g in zip(params, out, strict=True)]


def assert_same(got: list[Tensor], want: list[Tensor], rtol: float = 1e-9) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * 1e-3)


class Attention(nn.Module):
    """One attention head then a linear head; `by_hand` computes softmax(q k^T / sqrt(d)) v."""

    def __init__(self, by_hand: bool = False, dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, classes)
        self.by_hand = by_hand
        self.flash_seen: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:  # x: (B, L, D)
        self.flash_seen.append(torch.backends.cuda.flash_sdp_enabled())
        batch, length, _ = x.shape
        # (B, heads=2, L, D/2): the 4-D layout PyTorch's fused kernels take
        q, k, v = (
            t.reshape(batch, length, 2, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1)
        )
        if self.by_hand:
            weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.head(torch.tanh(out).transpose(1, 2).reshape(batch, length, -1).mean(dim=1))


@pytest.mark.parametrize(("dtype", "rtol"), [(F64, 1e-9), (torch.float32, 1e-4)])
def test_sdpa_equals_attention_by_hand(dtype: torch.dtype, rtol: float) -> None:
    # float32 is where PyTorch picks its fused CPU kernel (no double backward) by default.
    fused = Attention().to(dtype).eval()
    by_hand = copy.deepcopy(fused).to(F64)
    by_hand.by_hand = True
    x = torch.randn(3, 4, 6, dtype=F64)
    want = brute_gq(by_hand, x, Y).mean()
    want_grads = param_grads(by_hand, want)
    for method, chunk in VARIANTS:
        got = gq_loss(fused, x.to(dtype), Y, method=method, chunk_size=chunk)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)
        got_grads = [g.double() for g in param_grads(fused, got)]
        assert_same(got_grads, want_grads, rtol=rtol)


def test_math_backend_is_scoped_to_gq() -> None:
    model = Attention().eval()
    x = torch.randn(3, 4, 6)
    for method, chunk in VARIANTS:
        model.flash_seen.clear()
        gq_loss(model, x, Y, method=method, chunk_size=chunk).backward()
        assert model.flash_seen and not any(model.flash_seen), method  # the replay too
    model.flash_seen.clear()
    model(x)
    assert model.flash_seen == [True]  # the caller's own forward keeps the fused kernels


class ExplicitAttention(nn.TransformerEncoderLayer):
    """`nn.TransformerEncoderLayer` whose attention takes PyTorch's explicit path (no SDPA)."""

    def _sa_block(
        self, x: Tensor, attn_mask: Any, key_padding_mask: Any, is_causal: bool = False
    ) -> Tensor:
        out = self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=True
        )
        return self.dropout1(out[0])


class Encoder(nn.Module):
    def __init__(
        self, layer: type[nn.TransformerEncoderLayer] = nn.TransformerEncoderLayer
    ) -> None:
        super().__init__()
        self.layer = layer(8, 2, 16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).mean(dim=1))


def test_transformer_encoder_layer_eval_equals_explicit_attention() -> None:
    model = Encoder().to(F64).eval()
    explicit = Encoder(ExplicitAttention).to(F64).eval()
    explicit.load_state_dict(model.state_dict())
    x = torch.randn(3, 5, 8, dtype=F64)
    want = brute_gq(explicit, x, Y).mean()
    want_grads = param_grads(explicit, want)
    for method, chunk in VARIANTS:
        with torch.no_grad():  # also the value-only path (where the fast path would apply)
            torch.testing.assert_close(gq_loss(model, x, Y, method=method), want.detach())
        got = gq_loss(model, x, Y, method=method, chunk_size=chunk)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
        assert_same(param_grads(model, got), want_grads)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_transformer_encoder_layer_train_mode_every_method_equals_loop(dropout: float) -> None:
    model = Encoder().to(F64).train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = dropout
    model.layer.self_attn.dropout = dropout
    x = torch.randn(3, 5, 8, dtype=F64)
    torch.manual_seed(1)
    want = gq_loss(model, x, Y, method="loop")
    want_grads = param_grads(model, want)
    for method, chunk in VARIANTS:
        if method == "jacrev" and dropout:
            # torch.func draws a Dropout mask on a non-contiguous tensor (the attention output
            # here) in another order than eager mode: a valid mask, but not loop's.
            continue
        torch.manual_seed(1)
        got = gq_loss(model, x, Y, method=method, chunk_size=chunk)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
        assert_same(param_grads(model, got), want_grads)


# --------------------------------------------------------------------------- no second derivative


class Custom(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
        self.proto = nn.Parameter(torch.randn(3, 5))
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        if self.op == "cdist":  # distances to prototypes: aten's cdist has no double backward
            return -torch.cdist(torch.tanh(self.lin(x)), self.proto)
        return self.head(FirstOrderTanh.apply(self.lin(x)))


@pytest.mark.parametrize(
    ("op", "names"),
    [
        ("once", r"custom autograd.Functions marked @once_differentiable: \['FirstOrderTanh'\]"),
        ("cdist", r"the derivative for '_cdist_backward' is not implemented"),
    ],
)
@pytest.mark.parametrize("method", ["loop", "recompute", "batched", "jacrev"])
def test_operation_without_second_derivative_says_so(op: str, names: str, method: str) -> None:
    model = Custom(op)
    x = torch.randn(3, 4)
    with torch.no_grad():  # the value needs first derivatives only
        assert torch.isfinite(gq_loss(model, x, Y, method=method))
    message = rf"GQ differentiates the model's input gradients .* needs second derivatives .*{names}.*replace that operation"
    with pytest.raises(RuntimeError, match=message):
        # the probe raises at the call, before backward(); recompute raises in backward()
        gq_loss(model, x, Y, method=method).backward()


class RoundedSTE(torch.autograd.Function):
    """Weights rounded to quarters, straight-through backward (QAT): first-order only."""

    @staticmethod
    def forward(w: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(4 * w) / 4

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Tensor) -> None:
        pass

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


class QuantLinear(nn.Linear):
    """A linear layer on rounded weights: `@once_differentiable` STE or the `.detach()` one."""

    def __init__(self, *args: Any, ste: str) -> None:
        super().__init__(*args)
        self.ste = ste

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.ste == "once":
            w = RoundedSTE.apply(w)
        else:
            w = w + (torch.round(4 * w) / 4 - w).detach()
        return F.linear(x, w, self.bias)


@pytest.mark.parametrize(("method", "chunk"), VARIANTS)
def test_once_differentiable_on_the_weights_is_not_refused(method: str, chunk: int | None) -> None:
    # GQ differentiates twice only the nodes between the logits and the inputs; a
    # straight-through estimator on the weights is differentiated once (by backward()), yet all
    # methods refused it as having no second derivative.
    def net(ste: str) -> nn.Module:
        torch.manual_seed(0)
        layers = [QuantLinear(4, 6, ste=ste), nn.Tanh(), QuantLinear(6, 3, ste=ste)]
        return nn.Sequential(*layers).to(F64)

    x = torch.randn(5, 4, dtype=F64)
    y = torch.tensor([0, 1, 2, 1, 0])
    model = net("once")
    want = brute_gq(model, x, y).mean()  # an independent double backprop, in float64
    want_grads = param_grads(model, want)
    detached = net("detach")  # the same model with a .detach() STE
    assert_same(param_grads(detached, brute_gq(detached, x, y).mean()), want_grads, rtol=1e-12)
    gq, logits = gq_loss(model, x, y, method=method, chunk_size=chunk, return_logits=True)
    torch.testing.assert_close(gq, want, rtol=1e-10, atol=0)
    got = torch.autograd.grad(gq, list(model.parameters()), retain_graph=True)
    assert_same(list(got), want_grads)
    # ...and it trains with cross-entropy from the same forward
    (F.cross_entropy(logits, y) + gq).backward()
    assert all(q.grad is not None and bool(q.grad.abs().sum() > 0) for q in model.parameters())


@pytest.mark.parametrize("method", ["loop", "recompute", "batched", "jacrev"])
def test_reentrant_checkpoint_names_use_reentrant_false(method: str) -> None:
    class Checkpointed(nn.Module):
        def __init__(self, reentrant: bool) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
            self.reentrant = reentrant

        def forward(self, x: Tensor) -> Tensor:
            hidden = checkpoint(self.body, x, use_reentrant=self.reentrant)
            return self.head(torch.tanh(hidden))

    x = torch.randn(3, 4)
    # (PyTorch's own message names the option too; ours says why GQ hits it)
    message = (
        r"method='jacrev' could not run .*use use_reentrant=False"
        if method == "jacrev"
        else r"gq_loss: the model uses torch.utils.checkpoint with use_reentrant=True, which "
        r"cannot give the input gradients GQ takes .*use_reentrant=False\)"
    )
    with pytest.raises(RuntimeError, match=message):
        gq_loss(Checkpointed(True), x, Y, method=method).backward()
    if method != "jacrev":  # torch.func takes no saved-tensor hooks (its message says so)
        model = Checkpointed(False)
        got = gq_loss(model, x, Y, method=method)
        plain = copy.deepcopy(model)
        plain.forward = lambda t: plain.head(torch.tanh(plain.body(t)))  # type: ignore[method-assign]
        torch.testing.assert_close(got, gq_loss(plain, x, Y), rtol=1e-6, atol=0)


class CheckpointedAttention(Attention):
    """`Attention` whose whole body runs in a non-reentrant checkpoint (recomputed in backward)."""

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = checkpoint(super().forward, x, use_reentrant=False)
        return out


@pytest.mark.parametrize(("method", "chunk"), [("loop", None), ("batched", 2), ("recompute", 1)])
def test_nonreentrant_checkpoint_around_sdpa_equals_no_checkpoint(
    method: str, chunk: int | None
) -> None:
    # float32: PyTorch's default CPU kernel is the fused one, so the checkpoint's recomputation
    # during backward() (outside GQ's call) must run on the math backend of GQ's forward too.
    torch.manual_seed(0)
    plain = Attention().train()
    model = CheckpointedAttention().train()
    model.load_state_dict(plain.state_dict())
    x = torch.randn(3, 4, 6)
    original = torch.utils.checkpoint._checkpoint_without_reentrant_generator
    results = []
    for m in (model, plain):
        gq, logits = gq_loss(m, x, Y, method=method, chunk_size=chunk, return_logits=True)
        loss = F.cross_entropy(logits, Y) + gq  # CE and GQ through the same forward
        results.append((gq.detach(), param_grads(m, loss)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    assert_same(results[0][1], results[1][1], rtol=1e-5)
    # The recomputation is redirected for regions entered inside GQ's passes only.
    assert torch.utils.checkpoint._checkpoint_without_reentrant_generator is original
    F.cross_entropy(model(x), Y).backward()  # the caller's own forward keeps its fused kernel


def test_the_math_switch_is_process_wide_while_a_gq_call_runs() -> None:
    # The documented limit (docs/models.md, "Threads"): PyTorch's SDPA backend flags are
    # process-wide, so while one thread is inside a GQ call, another thread's attention runs on
    # the math backend; its checkpointed regions entered then are recomputed on it too (so they
    # stay consistent), but a region entered before the call and recomputed during it fails.
    inside, release = threading.Event(), threading.Event()

    class Waiting(Attention):
        def forward(self, x: Tensor) -> Tensor:
            inside.set()
            release.wait(30)
            return super().forward(x)

    torch.manual_seed(0)
    other, plain = CheckpointedAttention().train(), Attention().train()
    plain.load_state_dict(other.state_dict())
    x = torch.randn(3, 4, 6)
    entered_before = F.cross_entropy(other(x), Y)
    errors: list[BaseException] = []

    def gq_step() -> None:
        try:
            gq_loss(Waiting().eval(), x, Y, method="loop").backward()
        except BaseException as err:  # reported below
            errors.append(err)

    worker = threading.Thread(target=gq_step)
    worker.start()
    try:
        assert inside.wait(30)
        plain.flash_seen.clear()
        entered_during = F.cross_entropy(other(x), Y)
        plain(x)
        assert plain.flash_seen == [False]  # this thread's forward: math, during the call
        with pytest.raises(torch.utils.checkpoint.CheckpointError):
            entered_before.backward()
    finally:
        release.set()
        worker.join(60)
    assert not errors
    got = param_grads(other, entered_during)  # recomputed after the call, on math as entered
    plain.flash_seen.clear()
    assert_same(got, param_grads(plain, F.cross_entropy(plain(x), Y)), rtol=1e-5)
    assert plain.flash_seen == [True]  # after the call: the fused kernel again


# --------------------------------------------------------------------------- torch.compile


def compiled(model: nn.Module) -> nn.Module:
    # aot_eager: the same aot_autograd graphs as inductor (no double backward), no C++ build.
    return torch.compile(model, backend="aot_eager")  # type: ignore[return-value]


def test_compiled_module_equals_eager() -> None:
    model = Attention().to(F64).eval()
    fast = compiled(model)
    x = torch.randn(3, 4, 6, dtype=F64)
    fast(x)  # compiled once, as in a training loop
    want = gq_loss(model, x, Y)
    want_grads = param_grads(model, want)
    for method, chunk in VARIANTS:
        got, logits = gq_loss(fast, x, Y, method=method, chunk_size=chunk, return_logits=True)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
        # the compiled wrapper shares the parameters: the gradient lands on the eager module's
        assert_same(param_grads(model, got + 0 * logits.sum()), want_grads)
    torch.testing.assert_close(GQLoss()(fast, x, Y), want)


def test_compiled_submodule_runs_eagerly_inside_gq() -> None:
    model = Encoder().to(F64).eval()
    reference = copy.deepcopy(model)
    model.layer = compiled(model.layer)  # type: ignore[assignment]
    x = torch.randn(3, 5, 8, dtype=F64)
    want = gq_loss(reference, x, Y)
    got = gq_loss(model, x, Y)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    assert_same(param_grads(model, got), param_grads(reference, want))


def test_odin_scores_a_compiled_model() -> None:
    from gq_loss import ODINDetector

    model = Attention().eval()
    x = torch.randn(5, 4, 6)
    want = ODINDetector(model).score(x)
    torch.testing.assert_close(ODINDetector(compiled(model)).score(x), want)
