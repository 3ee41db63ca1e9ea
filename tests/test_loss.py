"""gq_loss / GQLoss against brute-force float64 references, identities, training-step behaviour."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _helpers import compare, grads, named_grads
from _oracles import (
    F64,
    HYPO,
    NORMS,
    VARIANTS,
    Flat,
    Shifted,
    brute_gq,
    brute_norms,
    input_shape,
    low_precision_norms,
    make_model,
    reference_formulation,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import gq_loss._runtime as gq_loss_runtime
from gq_loss import GQLoss, class_gradient_norms, gq_loss
from gq_loss._sampled import draw_columns
from gq_loss.kernels import auto_choice
from gq_loss.loss import ESTIMATORS, FORMULATIONS, REDUCTIONS


def reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_sample
    if per_sample.numel() == 0:
        return per_sample.new_zeros(())
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


# --------------------------------------------------------------------------- paper formulation


def check_paper(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    operand: str,
    p: float,
    temperature: float,
    reduction: str,
) -> list[str]:
    want = reduce(brute_gq(model, x, y, temperature, p, 1e-12, operand), reduction)
    weights = torch.rand(want.shape, dtype=F64) + 0.5 if reduction == "none" else None
    want_grads = grads(model, want, weights)
    errors: list[str] = []
    for method, chunk in VARIANTS:
        got = gq_loss(
            model,
            x,
            y,
            operand=operand,
            p=p,
            temperature=temperature,
            reduction=reduction,
            method=method,
            chunk_size=chunk,
        )
        label = f"{method}/{chunk} {operand} p={p} T={temperature} {reduction}"
        compare(errors, label + " value", got, want)
        compare(errors, label + " grad", grads(model, got, weights), want_grads)
    return errors


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("p", NORMS)
def test_paper_matches_brute_force(reduction: str, p: float) -> None:
    model = make_model("conv_bn", (2, 3, 3), 4, seed=2)
    x = torch.randn(3, 2, 3, 3, dtype=F64)
    y = torch.tensor([3, 0, 1])
    errors = check_paper(model, x, y, "softmax", p, 1.0, reduction)
    errors += check_paper(model, x, y, "softmax", p, 2.5, reduction)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("kind", ["conv_gn", "conv_ln"])
@pytest.mark.parametrize("rank", [3, 4])
def test_paper_groupnorm_and_layernorm_over_channels(kind: str, rank: int) -> None:
    shape = input_shape(kind, rank)
    model = make_model(kind, shape, 4, seed=6)
    x = torch.randn(3, *shape, dtype=F64)
    y = torch.tensor([3, 0, 1])
    errors = check_paper(model, x, y, "softmax", 1, 1.0, "mean")
    errors += check_paper(model, x, y, "log_softmax", 2, 2.5, "none")
    assert not errors, "\n".join(errors)


@HYPO
@given(
    kind=st.sampled_from(["mlp_gelu", "softplus", "conv_bn", "conv_gn", "conv_ln"]),
    rank=st.integers(2, 4),
    batch=st.integers(0, 4),
    n=st.integers(2, 5),
    operand=st.sampled_from(["softmax", "log_softmax", "logits"]),
    p=st.sampled_from(NORMS),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    reduction=st.sampled_from(REDUCTIONS),
    seed=st.integers(0, 2**16),
)
def test_paper_hypothesis(
    kind: str,
    rank: int,
    batch: int,
    n: int,
    operand: str,
    p: float,
    temperature: float,
    reduction: str,
    seed: int,
) -> None:
    if n == 2 and operand == "softmax":
        n = 3  # refused at N = 2 (identically 1): test_two_classes_softmax_refused
    shape = input_shape(kind, rank)
    model = make_model(kind, shape, n, seed=seed)
    x = torch.randn(batch, *shape, dtype=F64)
    y = torch.randint(0, n, (batch,))
    errors = check_paper(model, x, y, operand, p, temperature, reduction)
    assert not errors, "\n".join(errors)


def test_module_equals_function_and_holds_no_state() -> None:
    model = make_model("mlp_gelu", (5,), 4)
    x, y = torch.randn(3, 5, dtype=F64), torch.tensor([0, 3, 2])
    settings_ = dict(temperature=2.0, p=2, reduction="sum", method="recompute", chunk_size=2)
    criterion = GQLoss(**settings_)
    got = criterion(model, x, y)
    want = gq_loss(model, x, y, **settings_)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(grads(model, got), grads(model, want), rtol=1e-12, atol=0)
    assert list(criterion.parameters()) == [] and list(criterion.buffers()) == []
    assert criterion.state_dict() == {}
    assert (criterion.temperature, criterion.p, criterion.chunk_size) == (2.0, 2, 2)
    assert criterion.method == "recompute" and criterion.operand is None
    text = repr(criterion)
    for part in ("temperature=2.0", "p=2", "reduction='sum'", "method='recompute'", "chunk_size=2"):
        assert part in text, text
    assert "formulation='paper'" in text and "estimator='exact'" in text
    # The model is a call argument, not a submodule.
    assert list(criterion.children()) == []


def test_module_settings_are_attributes() -> None:
    model = make_model("mlp_gelu", (5,), 4)
    x, y = torch.randn(3, 5, dtype=F64), torch.tensor([0, 3, 2])
    criterion = GQLoss()
    criterion.temperature = 3.0
    criterion.method = "jacrev"
    assert "temperature=3.0" in repr(criterion) and "method='jacrev'" in repr(criterion)
    torch.testing.assert_close(criterion(model, x, y), gq_loss(model, x, y, temperature=3.0))
    criterion.reduction = "avg"  # a bad value set later fails on the next call, by name
    with pytest.raises(ValueError, match=r"`reduction` must be one of .*'avg'"):
        criterion(model, x, y)


# --------------------------------------------------------------------------- identities


@HYPO
@given(
    kind=st.sampled_from(["mlp_gelu", "softplus", "conv_bn", "conv_gn", "conv_ln"]),
    n=st.integers(3, 6),
    p=st.sampled_from(NORMS),
    temperature=st.sampled_from([0.3, 1.0, 4.0]),
    scale=st.sampled_from([0.1, 1.0, 20.0]),
    seed=st.integers(0, 2**16),
)
def test_softmax_gq_at_most_one(
    kind: str, n: int, p: float, temperature: float, scale: float, seed: int
) -> None:
    # sum_j grad S_j = 0, so ||grad S_y|| <= sum_{j != y} ||grad S_j|| (triangle inequality).
    shape = input_shape(kind, 4)
    model = make_model(kind, shape, n, seed=seed)
    x = scale * torch.randn(5, *shape, dtype=F64)
    y = torch.randint(0, n, (5,))
    gq = gq_loss(model, x, y, p=p, temperature=temperature, reduction="none")
    assert (gq >= 0).all() and (gq <= 1 + 1e-9).all(), gq


@pytest.mark.parametrize("operand", ["softmax", "log_softmax"])
@pytest.mark.parametrize("input_dependent", [False, True])
def test_invariance_to_common_shift(operand: str, input_dependent: bool) -> None:
    inner = make_model("mlp_gelu", (2, 3), 5)
    x, y = torch.randn(4, 2, 3, dtype=F64), torch.tensor([0, 4, 2, 2])
    want = gq_loss(inner, x, y, operand=operand, reduction="none")
    want_grads = grads(inner, want, torch.arange(1.0, 5.0, dtype=F64))
    shifted = Shifted(inner, -12.5, input_dependent)
    for method, chunk in VARIANTS:
        got = gq_loss(
            shifted,
            x,
            y,
            operand=operand,
            reduction="none",
            method=method,
            chunk_size=chunk,
        )
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            grads(inner, got, torch.arange(1.0, 5.0, dtype=F64)), want_grads, rtol=1e-8, atol=1e-12
        )


class Centred(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        return out - out.mean(dim=1, keepdim=True)


def test_large_temperature_limit_is_centred_logit_gq() -> None:
    # grad S_j = S_j (grad f_j - sum_k S_k grad f_k) / T and S_k -> 1/N as T -> inf, so the softmax
    # GQ tends to the logit GQ of the CENTRED logits f - mean_k f_k (which softmax cannot tell from
    # f); it equals the plain logit GQ only when sum_k grad f_k = 0.
    model = make_model("softplus", (2, 3), 4, seed=7)
    x, y = torch.randn(5, 2, 3, dtype=F64), torch.tensor([0, 1, 2, 3, 1])
    limit = gq_loss(Centred(model), x, y, operand="logits", reduction="none").detach()
    gaps = [
        (gq_loss(model, x, y, temperature=t, reduction="none").detach() - limit).abs().max().item()
        for t in (1.0, 10.0, 100.0, 1e4)
    ]
    assert all(a > b for a, b in itertools.pairwise(gaps)), gaps
    assert gaps[0] > 1e-2 and gaps[-1] < 1e-4, gaps  # the gap shrinks like 1/T
    # Logit GQ does not depend on T; with sum_k grad f_k != 0 it is not the limit.
    plain = gq_loss(model, x, y, operand="logits", reduction="none").detach()
    torch.testing.assert_close(
        gq_loss(model, x, y, operand="logits", temperature=1e4, reduction="none").detach(), plain
    )
    assert (plain - limit).abs().max() > 1e-2


# --------------------------------------------------------------------------- training step


class Counter:
    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        model.register_forward_hook(self.hook)

    def hook(self, *args: Any) -> None:
        self.calls += 1


@pytest.mark.parametrize(
    ("method", "chunk", "forwards_in_backward"),
    [
        ("auto", None, 0),
        ("loop", None, 0),
        ("batched", None, 0),
        ("recompute", 2, 1),
        ("auto", 2, 1),
        ("jacrev", None, 0),
        ("jacrev", 2, 0),
    ],
)
def test_return_logits_one_forward(
    method: str, chunk: int | None, forwards_in_backward: int
) -> None:
    """One forward pass for the loss and the logits; recompute replays it once more in backward."""
    model = make_model("conv_bn", (2, 3, 3), 4)
    x, y = torch.randn(3, 2, 3, 3, dtype=F64), torch.tensor([1, 0, 3])
    counter = Counter(model)
    if method == "auto" and chunk is None:
        # The first call for a model and set-up times the candidate methods (their forward
        # passes run the hooks too); every later call runs one forward.
        gq_loss(model, x, y, return_logits=True)
        assert counter.calls > 1
        counter.calls = 0
    gq, logits = gq_loss(model, x, y, method=method, chunk_size=chunk, return_logits=True)
    assert counter.calls == 1
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    counter.calls = 0
    lam = 0.3
    loss = F.cross_entropy(logits, y) + lam * gq
    got = grads(model, loss)
    assert counter.calls == forwards_in_backward
    # The combined gradient is CE's plus lam times the brute-force GQ gradient.
    ce = grads(model, F.cross_entropy(model(x), y))
    gq_want = grads(model, brute_gq(model, x, y).mean())
    torch.testing.assert_close(
        got, [a + lam * b for a, b in zip(ce, gq_want, strict=True)], rtol=1e-8, atol=1e-12
    )


# --------------------------------------------------------------------------- reference formulation


@pytest.mark.parametrize("operand", ["logits", "log_softmax"])
@pytest.mark.parametrize("p", NORMS)
def test_reference_matches_independent_implementation(operand: str, p: float) -> None:
    model = make_model("conv_bn", (2, 3, 3), 5, seed=3)
    x, y = torch.randn(4, 2, 3, 3, dtype=F64), torch.tensor([4, 0, 0, 2])
    for temperature in (1.0, 2.0):
        want = reference_formulation(model, x, y, p, 1e-12, operand, temperature)
        want_grads = grads(model, want)
        got = gq_loss(
            model, x, y, formulation="reference", operand=operand, p=p, temperature=temperature
        )
        assert got.shape == ()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grads(model, got), want_grads, rtol=1e-8, atol=1e-12)
    # Default operand of the reference formulation is the logits (the authors' published models).
    torch.testing.assert_close(
        gq_loss(model, x, y, formulation="reference"), reference_formulation(model, x, y)
    )
    # It is not the paper's per-sample mean.
    assert not torch.allclose(
        reference_formulation(model, x, y), gq_loss(model, x, y, operand="logits")
    )


def test_reference_softmax_is_degenerate_and_refused() -> None:
    model = make_model("mlp_gelu", (5,), 6, seed=4)
    x, y = torch.randn(8, 5, dtype=F64), torch.randint(0, 6, (8,))
    # Independently of the package: sum_{j != y} S_j = 1 - S_y, so num == den.
    value = reference_formulation(model, x, y, 1, 0.0, "softmax")
    torch.testing.assert_close(value, torch.ones((), dtype=F64), rtol=1e-12, atol=0)
    assert max(g.abs().max().item() for g in grads(model, value)) < 1e-12
    # ... while the logits version has a real gradient.
    assert (
        max(g.abs().max().item() for g in grads(model, reference_formulation(model, x, y))) > 1e-3
    )
    with pytest.raises(ValueError, match=r"identically 1"):
        gq_loss(model, x, y, formulation="reference", operand="softmax")
    with pytest.raises(ValueError, match=r"identically 1"):
        GQLoss(formulation="reference", operand="softmax")


# --------------------------------------------------------------------------- sampled estimator


def test_sampled_with_enough_classes_is_exact() -> None:
    model = make_model("mlp_gelu", (4,), 5)
    x, y = torch.randn(4, 4, dtype=F64), torch.tensor([0, 4, 1, 1])
    want = gq_loss(model, x, y, reduction="none")
    weights = torch.arange(1.0, 5.0, dtype=F64)
    want_grads = grads(model, want, weights)
    for k in (4, 9):
        got = gq_loss(model, x, y, estimator="sampled", num_sampled=k, reduction="none")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(grads(model, got, weights), want_grads, rtol=1e-12, atol=0)


def denominators(
    model: nn.Module, x: Tensor, y: Tensor, draws: int, operand: str = "softmax"
) -> tuple[Tensor, Tensor]:
    """Exact denominators ``(B,)`` (float64 brute force) and ``draws`` sampled-estimator
    denominators ``(draws, B)``."""
    norms = brute_norms(model, x, operand).detach()
    num = norms.gather(1, y[:, None]).squeeze(1)
    exact = norms.sum(1) - num
    gen = torch.Generator().manual_seed(1234)
    estimates = []
    for _ in range(draws):
        gq = gq_loss(
            model,
            x,
            y,
            operand=operand,
            estimator="sampled",
            num_sampled=6,
            eps=0.0,
            reduction="none",
            generator=gen,
        ).detach()
        estimates.append(num / gq)
    return exact, torch.stack(estimates)


def twenty_classes(peaked: bool) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 20)).to(F64)
    if peaked:
        with torch.no_grad():
            model[2].weight.mul_(10.0)
            model[2].bias.mul_(10.0)
    return model, torch.randn(6, 6, dtype=F64), torch.tensor([0, 5, 19, 7, 7, 12])


def test_sampled_columns_same_for_every_method() -> None:
    # The sampled estimator's class columns (target, top, draws) go to every backend alike.
    model = make_model("conv_bn", (2, 3, 3), 9)
    x, y = torch.randn(4, 2, 3, 3, dtype=F64), torch.tensor([0, 8, 3, 3])
    weights = torch.arange(1.0, 5.0, dtype=F64)
    results = []
    for method, chunk in VARIANTS:
        gen = torch.Generator().manual_seed(5)
        value = gq_loss(
            model, x, y, estimator="sampled", num_sampled=4, reduction="none",
            generator=gen, method=method, chunk_size=chunk,
        )  # fmt: skip
        results.append((method, chunk, value, grads(model, value, weights)))
    _, _, want, want_grads = results[0]
    assert not torch.allclose(want, gq_loss(model, x, y, reduction="none"))  # really sampled
    for method, chunk, value, got_grads in results[1:]:
        torch.testing.assert_close(value, want, rtol=1e-10, atol=0, msg=f"{method}/{chunk}")
        torch.testing.assert_close(got_grads, want_grads, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("operand", ["softmax", "log_softmax", "logits"])
@pytest.mark.parametrize("peaked", [False, True])
def test_sampled_denominator_is_unbiased(peaked: bool, operand: str) -> None:
    model, x, y = twenty_classes(peaked)
    exact, estimates = denominators(model, x, y, 300, operand)
    rel = ((estimates.mean(0) - exact) / exact).abs()
    assert rel.max() < 0.03, rel
    # Not exact per draw: the estimator really samples (so the mean is a real test).
    single = gq_loss(
        model, x, y, operand=operand, estimator="sampled", num_sampled=6, reduction="none"
    )
    exact_gq = gq_loss(model, x, y, operand=operand, reduction="none")
    assert not torch.allclose(single, exact_gq, rtol=1e-6)


@pytest.mark.parametrize("operand", ["log_softmax", "logits"])
def test_sampled_proposal_fits_the_operand(operand: str) -> None:
    # Logit and log-softmax gradient norms do not shrink with S_j: a proposal proportional to
    # the softmax draws the tail classes that carry most of their denominator almost never, and
    # one draw missed the denominator by 80-450 % (relative std) on this peaked model.
    model, x, y = twenty_classes(peaked=True)
    exact, estimates = denominators(model, x, y, 300, operand)
    spread = estimates.std(0) / exact
    assert spread.max() < 0.25, spread
    # The classes besides the target: K distinct non-targets, each weighted (N - 1) / K.
    columns, weights = draw_columns(model(x), y, 1.0, operand, "sampled", 6, None)
    assert columns is not None and weights is not None and columns.shape == (6, 7)
    assert (columns[:, 0] == y).all() and (columns[:, 1:] != y[:, None]).all()
    assert all(len(set(row.tolist())) == 6 for row in columns[:, 1:])
    torch.testing.assert_close(weights, torch.full((6, 6), 19 / 6, dtype=F64), rtol=0, atol=0)


def test_sampled_generator_reproducible() -> None:
    model = make_model("mlp_gelu", (4,), 12)
    x, y = torch.randn(5, 4, dtype=F64), torch.randint(0, 12, (5,))

    def run(seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return gq_loss(
            model, x, y, estimator="sampled", num_sampled=3, reduction="none", generator=gen
        )

    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert not torch.equal(run(1), run(2))
    criterion = GQLoss(estimator="sampled", num_sampled=3, reduction="none")
    torch.testing.assert_close(
        criterion(model, x, y, generator=torch.Generator().manual_seed(1)), run(1), rtol=0, atol=0
    )


def lacking_float64(monkeypatch: pytest.MonkeyPatch, kind: str) -> list[torch.device]:
    """Devices of type ``kind`` taken as lacking float64 (as MPS does); returns the list of the
    devices that the float64 rule is asked about."""
    asked: list[torch.device] = []

    def lacks(device: torch.device) -> bool:
        asked.append(device)
        return device.type == kind

    monkeypatch.setattr(gq_loss_runtime, "lacks_float64", lacks)
    return asked


def test_sampled_draws_follow_the_float64_device_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    # The draws are float64 work: they run where the detectors' float64 rule says (on MPS: the
    # CPU), not in float64 on the logits' device, which MPS cannot do.
    model = make_model("mlp_gelu", (4,), 12).float()
    x, y = torch.randn(5, 4), torch.randint(0, 12, (5,))

    def run() -> Tensor:
        gen = torch.Generator().manual_seed(4)
        return gq_loss(model, x, y, estimator="sampled", num_sampled=3, generator=gen)

    want = run()
    asked = lacking_float64(monkeypatch, "cpu")
    torch.testing.assert_close(run(), want, rtol=0, atol=0)
    assert asked == [torch.device("cpu")]  # the rule was asked about the logits' device


@pytest.mark.cuda
def test_sampled_on_a_device_without_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA taken as lacking float64: the draws run on the CPU (with a CPU generator), the columns
    # and the result come back to the logits' device, equal to the CPU run's.
    model = make_model("mlp_gelu", (4,), 12)
    x, y = torch.randn(5, 4, dtype=F64), torch.randint(0, 12, (5,))
    options: dict[str, Any] = {"estimator": "sampled", "num_sampled": 3, "reduction": "none"}
    want = gq_loss(model, x, y, generator=torch.Generator().manual_seed(4), **options)
    lacking_float64(monkeypatch, "cuda")
    cuda = copy.deepcopy(model).cuda()
    got = gq_loss(cuda, x, y, generator=torch.Generator().manual_seed(4), **options)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match=r"`generator` must be on the device where .* cpu"):
        gq_loss(cuda, x, y, generator=torch.Generator(device="cuda"), **options)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize(("method", "chunk"), VARIANTS)
def test_empty_batch(method: str, chunk: int | None) -> None:
    model = make_model("mlp_gelu", (4,), 3)
    x, y = torch.zeros(0, 4, dtype=F64), torch.zeros(0, dtype=torch.long)
    for reduction in ("mean", "sum"):
        value = gq_loss(model, x, y, reduction=reduction, method=method, chunk_size=chunk)
        assert value.shape == () and value.item() == 0.0 and value.requires_grad
        value.backward()
        assert all(q.grad is not None and not q.grad.any() for q in model.parameters())
        model.zero_grad(set_to_none=True)
    none = gq_loss(model, x, y, reduction="none", method=method, chunk_size=chunk)
    assert none.shape == (0,) and none.dtype == F64


class Constant(nn.Module):
    """Logits whose input gradient is zero: cut off from the input, or through dead ReLUs."""

    def __init__(self, connected: bool) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(3, dtype=F64))
        self.lin = nn.Linear(2, 3).to(F64)
        self.connected = connected

    def forward(self, x: Tensor) -> Tensor:
        if self.connected:
            return self.bias + torch.relu(self.lin(x) - 100.0)
        return self.bias.expand(x.shape[0], 3) + 0.0 * self.lin(torch.ones_like(x))


@pytest.mark.parametrize("connected", [True, False])
@pytest.mark.parametrize(("method", "chunk"), VARIANTS)
def test_eps_gives_finite_value_for_zero_gradients(
    method: str, chunk: int | None, connected: bool
) -> None:
    model = Constant(connected)
    x, y = torch.randn(3, 2, dtype=F64), torch.tensor([0, 1, 2])
    value = gq_loss(model, x, y, method=method, chunk_size=chunk)
    assert value.item() == 0.0
    assert all(torch.isfinite(g).all() for g in grads(model, value))
    # Without eps the quotient is 0 / 0.
    assert torch.isnan(gq_loss(model, x, y, eps=0.0, method=method, chunk_size=chunk)).item()


# --------------------------------------------------------------------------- validation

OPTION_ERRORS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"temperature": 0.0}, ValueError, r"`temperature` must be finite and > 0, got 0.0"),
    ({"temperature": -2}, ValueError, r"`temperature` must be finite and > 0, got -2"),
    ({"temperature": math.nan}, ValueError, r"`temperature` must be finite and > 0, got nan"),
    ({"temperature": False}, TypeError, r"`temperature` must be a real number, got bool"),
    ({"temperature": "1"}, TypeError, r"`temperature` must be a real number, got str"),
    ({"p": 3}, ValueError, r"`p` must be one of 1, 2 or math.inf, got 3"),
    ({"p": "l1"}, ValueError, r"`p` must be one of .*'l1'"),
    ({"operand": "probs"}, ValueError, r"`operand` must be one of .*'probs'"),
    ({"formulation": "authors"}, ValueError, r"`formulation` must be one of .*'authors'"),
    ({"reduction": "avg"}, ValueError, r"`reduction` must be one of .*'avg'"),
    ({"reduction": None}, ValueError, r"`reduction` must be one of .*None"),
    ({"estimator": "topk"}, ValueError, r"`estimator` must be one of .*'topk'"),
    ({"estimator": "sampled"}, ValueError, r"`num_sampled` must be given exactly when .*None"),
    ({"num_sampled": 3}, ValueError, r"`num_sampled` must be given exactly when .*'exact'"),
    ({"estimator": "sampled", "num_sampled": 0}, ValueError, r"`num_sampled` must be >= 1, got 0"),
    ({"estimator": "sampled", "num_sampled": 2.0}, TypeError, r"`num_sampled` must be an int"),
    ({"eps": -1e-3}, ValueError, r"`eps` must be finite and >= 0, got -0.001"),
    ({"eps": math.inf}, ValueError, r"`eps` must be finite and >= 0, got inf"),
    ({"eps": True}, TypeError, r"`eps` must be a real number, got bool"),
    ({"method": "vmap"}, ValueError, r"`method` must be one of .*'vmap'"),
    ({"method": None}, ValueError, r"`method` must be one of .*'jacrev'.*None"),
    ({"chunk_size": 0}, ValueError, r"`chunk_size` must be >= 1, got 0"),
    ({"chunk_size": 2, "method": "loop"}, ValueError, r"`chunk_size` has no effect"),
    ({"formulation": "reference", "reduction": "none"}, ValueError, r"reduction='none'"),
    # one ratio per batch: a "sum" would silently equal the mean
    ({"formulation": "reference", "reduction": "sum"}, ValueError, r"reduction='mean'.*'sum'"),
    ({"formulation": "reference", "method": "loop"}, ValueError, r"method='loop'"),
    ({"formulation": "reference", "chunk_size": 2}, ValueError, r"chunk_size=2"),
    (
        {"formulation": "reference", "estimator": "sampled", "num_sampled": 2},
        ValueError,
        r"estimator='sampled'",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), OPTION_ERRORS)
def test_bad_options(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    model = nn.Sequential(nn.Linear(4, 3)).to(F64)
    x, y = torch.zeros(2, 4, dtype=F64), torch.tensor([0, 1])
    with pytest.raises(error, match=match):
        gq_loss(model, x, y, **kwargs)
    with pytest.raises(error, match=match):
        GQLoss(**kwargs)


def test_generator_only_with_the_sampled_estimator() -> None:
    model = make_model("mlp_gelu", (4,), 5)
    x, y = torch.randn(3, 4, dtype=F64), torch.tensor([0, 4, 1])
    gen = torch.Generator().manual_seed(0)
    # The exact estimator draws nothing: a generator there would be silently ignored.
    message = r"`generator` draws the classes of estimator='sampled' .*estimator='exact'"
    with pytest.raises(ValueError, match=message):
        gq_loss(model, x, y, generator=gen)
    with pytest.raises(ValueError, match=message):
        GQLoss()(model, x, y, generator=gen)
    with pytest.raises(TypeError, match=r"`generator` must be a torch.Generator or None, got int"):
        gq_loss(model, x, y, estimator="sampled", num_sampled=2, generator=0)  # type: ignore[arg-type]
    gq_loss(model, x, y, estimator="sampled", num_sampled=2, generator=gen)


def test_choices_are_the_dispatched_constants() -> None:
    assert set(FORMULATIONS) == {"paper", "reference"}
    assert set(REDUCTIONS) == {"none", "mean", "sum"}
    assert set(ESTIMATORS) == {"exact", "sampled"}


@pytest.mark.parametrize(
    ("targets", "error", "match"),
    [
        ([0, 1], TypeError, r"`targets` must be a torch.Tensor of class indices, got list"),
        (torch.tensor([0.0, 1.0]), TypeError, r"`targets` must hold int64 .*float32"),
        (torch.tensor([0, 1], dtype=torch.int32), TypeError, r"`targets` must hold int64 .*int32"),
        (
            torch.tensor([0, 1, 2]),
            ValueError,
            r"`targets` must have shape \(B,\) with B = 2, got \(3,\)",
        ),
        (torch.tensor([[0], [1]]), ValueError, r"`targets` must have shape \(B,\) .*got \(2, 1\)"),
        (
            torch.tensor([-1, 0]),
            ValueError,
            r"`targets` must hold class indices in \[0, 3\) .*\[-1, 0\]",
        ),
        (
            torch.tensor([0, 3]),
            ValueError,
            r"`targets` must hold class indices in \[0, 3\) .*\[0, 3\]",
        ),
    ],
)
def test_bad_targets(targets: object, error: type[Exception], match: str) -> None:
    model = nn.Sequential(Flat(), nn.Linear(4, 3)).to(F64)
    x = torch.zeros(2, 4, dtype=F64)
    with pytest.raises(error, match=match):
        gq_loss(model, x, targets)
    with pytest.raises(error, match=match):
        GQLoss()(model, x, targets)


def test_bad_model_and_inputs() -> None:
    linear = nn.Linear(4, 3).to(F64)
    y = torch.tensor([0, 1])
    with pytest.raises(TypeError, match=r"`inputs` must be a floating-point"):
        gq_loss(linear, torch.zeros(2, 4, dtype=torch.long), y)
    with pytest.raises(ValueError, match=r"logits of shape \(B, N\) with B = 2, got shape \(2,\)"):
        gq_loss(lambda z: linear(z).sum(1), torch.zeros(2, 4, dtype=F64), y)
    with pytest.raises(TypeError, match=r"method='recompute' needs an nn.Module"):
        GQLoss(method="recompute")(lambda z: linear(z), torch.zeros(2, 4, dtype=F64), y)


# --------------------------------------------------------------------------- degenerate class counts


def test_two_classes_softmax_refused() -> None:
    model = make_model("softplus", (2, 3), 2, seed=1)
    x, y = torch.randn(6, 2, 3, dtype=F64), torch.tensor([0, 1, 1, 0, 1, 0])
    # Independently of the package: grad S_0 = -grad S_1, so Eq. 7 is 1 with zero gradient.
    value = brute_gq(model, x, y, eps=0.0).mean()
    torch.testing.assert_close(value, torch.ones((), dtype=F64), rtol=1e-12, atol=0)
    assert max(g.abs().max().item() for g in grads(model, value)) < 1e-8
    for call in (lambda: gq_loss(model, x, y), lambda: GQLoss()(model, x, y)):
        with pytest.raises(ValueError, match=r"identically 1 .*N = 2 outputs.*operand='logits'"):
            call()
    with pytest.raises(ValueError, match=r"N = 2"):
        gq_loss(model, x, y, estimator="sampled", num_sampled=1)
    # log_softmax at N = 2 is S_other / S_y: a confidence term, no input-gradient information.
    probs = torch.softmax(model(x), dim=1).detach()
    other = probs.gather(1, (1 - y)[:, None]).squeeze(1)
    torch.testing.assert_close(
        gq_loss(model, x, y, operand="log_softmax", reduction="none").detach(),
        other / probs.gather(1, y[:, None]).squeeze(1),
        rtol=1e-9,
        atol=0,
    )
    # The recommended logits operand is a real gradient ratio, with a real gradient.
    got = gq_loss(model, x, y, operand="logits", reduction="none")
    torch.testing.assert_close(got, brute_gq(model, x, y, operand="logits"), rtol=1e-9, atol=0)
    assert max(g.abs().max().item() for g in grads(model, got)) > 1e-3
    # Three classes are fine with softmax.
    assert gq_loss(make_model("softplus", (2, 3), 3), x, y).item() < 1.0


def test_one_class_refused() -> None:
    model = nn.Linear(4, 1).to(F64)
    x, y = torch.zeros(2, 4, dtype=F64), torch.zeros(2, dtype=torch.long)
    for operand in ("softmax", "logits"):
        with pytest.raises(ValueError, match=r"N >= 2 classes, got N = 1"):
            gq_loss(model, x, y, operand=operand)


# --------------------------------------------------------------------------- grad mode off


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"method": "recompute", "chunk_size": 2},
        {"method": "batched"},
        {"method": "jacrev"},
        {"estimator": "sampled", "num_sampled": 2},
        {"formulation": "reference"},
    ],
)
def test_value_without_grad_mode(context: Any, options: dict[str, Any]) -> None:
    # Lightning logs GQ in validation under inference mode: the value, detached, no .grad.
    model = make_model("conv_bn", (2, 3, 3), 4)
    x, y = torch.randn(3, 2, 3, 3, dtype=F64), torch.tensor([1, 0, 3])

    def seeded() -> torch.Generator | None:  # the exact estimator takes no generator
        return torch.Generator().manual_seed(0) if "num_sampled" in options else None

    want, want_logits = gq_loss(model, x, y, generator=seeded(), return_logits=True, **options)
    with context():
        inputs = x.clone()  # an inference tensor under inference_mode
        got, logits = gq_loss(
            model,
            inputs,
            y,
            generator=seeded(),
            return_logits=True,
            **options,
        )
        module_value = GQLoss(**options)(model, inputs, y, generator=seeded())
    for t in (got, logits, module_value):
        assert not t.requires_grad and t.grad_fn is None
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(module_value, got, rtol=0, atol=0)
    torch.testing.assert_close(logits, want_logits.detach(), rtol=0, atol=0)
    assert all(q.grad is None for q in model.parameters())
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_no_grad_builds_no_double_backward_graph() -> None:
    # Before: no_grad quietly built the whole double-backward graph. Now the graph that lives is
    # at most the forward's and is dropped with the detached result.
    model = make_model("mlp_gelu", (5,), 4)
    x, y = torch.randn(3, 5, dtype=F64), torch.tensor([0, 1, 3])
    seen: list[bool] = []

    def pack(t: Tensor) -> Tensor:
        seen.append(torch.is_grad_enabled())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.no_grad():
        gq_loss(model, x, y)
    with_graph = len(seen)
    seen.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gq_loss(model, x, y)
    assert with_graph < len(seen)


# --------------------------------------------------------------------------- model types and dtypes


class Fields:
    """An output object with fields, like a Hugging Face ``ModelOutput`` (not a Mapping)."""

    def __init__(self, logits: Tensor, hidden: Tensor) -> None:
        self.logits, self.hidden = logits, hidden


class AnyOutput(nn.Module):
    """Linear logits wrapped by ``wrap`` (dict, tuple, object...)."""

    def __init__(self, wrap: Any) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).to(F64)
        self.wrap = wrap

    def forward(self, x: Tensor) -> Any:
        return self.wrap(self.lin(x), x)


@pytest.mark.parametrize(
    ("wrap", "output"),
    [
        (lambda z, x: {"logits": z, "hidden": x}, None),  # the Hugging Face key, unnamed
        (lambda z, x: Fields(z, x), None),  # the Hugging Face attribute, unnamed
        (lambda z, x: {"hidden": x, "scores": z}, "scores"),
        (lambda z, x: Fields(x, z), "hidden"),
        (lambda z, x: (x, z), 1),
        (lambda z, x: [x, z], -1),
        (lambda z, x: {"out": (x, z)}, lambda out: out["out"][1]),
    ],
)
def test_output_names_the_logits(wrap: Any, output: Any) -> None:
    model = AnyOutput(wrap)
    x, y = torch.randn(3, 4, dtype=F64), torch.tensor([0, 2, 1])
    want = brute_gq(model.lin, x, y)
    want_grads = grads(model, want.mean())
    errors: list[str] = []
    for method, chunk in VARIANTS:
        got, logits = gq_loss(
            model, x, y, method=method, chunk_size=chunk, output=output, return_logits=True
        )
        compare(errors, f"{method}/{chunk} value", got, want.mean())
        compare(errors, f"{method}/{chunk} grads", grads(model, got), want_grads)
        compare(errors, f"{method}/{chunk} logits", logits, model.lin(x))
    criterion = GQLoss(reduction="none", output=output)
    compare(errors, "GQLoss", criterion(model, x, y), want)
    assert f"output={output!r}" in repr(criterion)
    norms = class_gradient_norms(model, x, output=output)
    compare(errors, "class_gradient_norms", norms, brute_norms(model.lin, x))
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("wrap", "output", "error", "match"),
    [
        (
            lambda z, x: {"hidden": x, "scores": z},
            None,
            TypeError,
            r"got dict with keys \['hidden', 'scores'\]; name the logits with the `output` "
            r"argument, e.g. `output='hidden'`",
        ),
        (lambda z, x: (z, x), None, TypeError, r"got tuple of length 2; .*e\.g\. `output=0`"),
        (lambda z, x: Fields(x, z), "nope", ValueError, r"`output`='nope' names no key or attr"),
        (lambda z, x: {"a": z}, "b", ValueError, r"names no key .*dict with keys \['a'\]"),
        (lambda z, x: (z, x), 2, ValueError, r"`output`=2 is an index .*tuple of length 2"),
        (lambda z, x: z, 0, ValueError, r"`output`=0 is an index .*a tensor of shape \(2, 3\)"),
        (lambda z, x: (z, x), 1.0, TypeError, r"`output` must be None, a key .*got float 1\.0"),
        (lambda z, x: (z, x), True, TypeError, r"`output` must be .*got bool True"),
        (lambda z, x: (z, x), [0], TypeError, r"`output` must be .*got list \[0\]"),
        (lambda z, x: (z, x), lambda out: out, TypeError, r"got tuple of length 2"),
    ],
)
def test_bad_output(wrap: Any, output: Any, error: type[Exception], match: str) -> None:
    model = AnyOutput(wrap)
    x, y = torch.randn(2, 4, dtype=F64), torch.tensor([0, 2])
    with pytest.raises(error, match=match):
        gq_loss(model, x, y, output=output)
    with pytest.raises(error, match=match):
        class_gradient_norms(model, x, output=output)
    if isinstance(output, (bool, float, list)):  # a setting of the wrong type fails at build time
        with pytest.raises(error, match=match):
            GQLoss(output=output)


@pytest.mark.cuda
def test_inputs_and_targets_follow_a_cuda_model() -> None:
    model = nn.Linear(4, 3).to(F64)
    x, y = torch.randn(3, 4, dtype=F64), torch.tensor([0, 2, 1])
    want = gq_loss(model, x, y)
    got = gq_loss(copy.deepcopy(model).cuda(), x, y)  # CPU inputs and targets
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=0)


def test_float64_model_with_float32_inputs() -> None:
    model = make_model("mlp_gelu", (4,), 3)
    x, y = torch.randn(3, 4), torch.tensor([0, 2, 1])
    for method, chunk in VARIANTS:
        got = gq_loss(model, x, y, method=method, chunk_size=chunk)
        assert got.dtype == F64
        torch.testing.assert_close(got, brute_gq(model, x.double(), y).mean(), rtol=1e-9, atol=0)


def test_bf16_model_gives_float32_gq() -> None:
    # Norms and GQ are accumulated in float32 for a bf16 model (they were bf16, every method).
    model = make_model("conv_bn", (2, 3, 3), 4).to(torch.bfloat16)
    x, y = torch.randn(3, 2, 3, 3), torch.tensor([3, 0, 1])
    norms = low_precision_norms(model, x, torch.bfloat16)
    num = norms.gather(1, y[:, None]).squeeze(1)
    want = (num / (norms.sum(1) - num)).mean()
    for method, chunk in VARIANTS:
        got = gq_loss(model, x, y, method=method, chunk_size=chunk)
        assert got.dtype == torch.float32, (method, chunk)
        resolved = auto_choice(model).method if method == "auto" else method  # type: ignore[union-attr]
        if resolved in ("loop", "recompute"):  # the oracle's very gradient
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
        got.backward()
    assert gq_loss(model, x, y, formulation="reference").dtype == torch.float32


def test_single_image_error_says_unsqueeze() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    # The model's own error (the Linear's RuntimeError), with a note that says what to do.
    with pytest.raises(RuntimeError, match=r"(?s)mat1 and mat2 .*pass `x.unsqueeze\(0\)`"):
        gq_loss(model, torch.randn(3, 6, 6), torch.tensor([1]))


def test_help_shows_real_docstrings() -> None:
    init, forward = GQLoss.__init__.__doc__ or "", GQLoss.forward.__doc__ or ""
    assert "settings" in init and "Raises:" in init
    assert "Args:" in forward and "Examples:" in forward
    for doc in (init, forward):
        assert "Define the computation" not in doc and "Initialize internal Module" not in doc


class TwoInputs(nn.Module):
    """A classifier of an image and a side vector: ``head(conv(x1) + proj(x2))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten())
        self.proj = nn.Linear(4, 3)
        self.head = nn.Linear(3, 5)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x1) + self.proj(x2)))


class WithSecond(nn.Module):
    """The pattern the refusal gives: the differentiated input alone, the other one held."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.x2: Tensor | None = None

    def forward(self, x1: Tensor) -> Tensor:
        return self.model(x1, self.x2)


@pytest.mark.parametrize("method", ["auto", "loop", "batched", "jacrev", "recompute"])
def test_several_inputs_are_refused_with_the_wrapper_pattern_which_is_exact(method: str) -> None:
    """``GQLoss()(model, (x1, x2), y)`` used to say only "got tuple"; it now names the pattern,
    and that pattern equals a float64 brute force with the second input held per sample."""
    torch.manual_seed(0)
    model = TwoInputs().double()
    x1, x2 = torch.randn(3, 2, 3, 3, dtype=F64), torch.randn(3, 4, dtype=F64)
    y = torch.tensor([4, 0, 2])
    for inputs in ((x1, x2), [x1, x2], {"pixel_values": x1, "extra": x2}):
        with pytest.raises(
            TypeError,
            match=r"`inputs` must be a torch.Tensor, got a (tuple|list|dict) with .*"
            r"GQ differentiates one input tensor.*inputs\['pixel_values'\].*def forward\(self, x1\)",
        ):
            GQLoss()(model, inputs, y)  # type: ignore[arg-type]
    wrapped = WithSecond(model)
    wrapped.x2 = x2
    got = GQLoss(method=method)(wrapped, x1, y)
    want = torch.stack([
        brute_gq(lambda xi, i=i: model(xi, x2[i : i + 1]), x1[i : i + 1], y[i : i + 1])[0]
        for i in range(3)
    ]).mean()  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    params = list(model.parameters())
    for g, w in zip(
        torch.autograd.grad(got, params), torch.autograd.grad(want, params), strict=True
    ):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- float16 models


def test_float16_overflow_in_the_double_backward_is_an_error() -> None:
    # A float16 Hugging Face ConvNext (random weights from a config): GQ's value was fine but its
    # parameter gradient had NaN in 7,504 of 16,346 entries, written to .grad with no warning.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], drop_path_rate=0.0, num_labels=10
    )
    model = transformers.ConvNextForImageClassification(config).half()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    message = (
        r"^gq_loss: GQ's parameter gradient overflowed float16 in its second backward pass .* "
        r"\d+ of \d+ entries are not finite, and nothing was written to .grad.*keep the weights "
        r"in float32 \(model.float\(\)\).*bfloat16"
    )
    for method in ("loop", "recompute"):
        with pytest.raises(RuntimeError, match=message):
            gq, logits = gq_loss(model, x, y, method=method, return_logits=True)
            (F.cross_entropy(logits.float(), y) + gq).backward()
        assert all(q.grad is None for q in model.parameters())
    with torch.no_grad():  # the value alone is finite
        assert torch.isfinite(gq_loss(model, x, y))


class Steep(nn.Module):
    """`head(tanh(lin(x)))` whose input gradient overflows float16 while its logits do not."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        with torch.no_grad():
            self.lin.weight.mul_(scale)
            self.head.weight.mul_(scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin(x)))  # type: ignore[no-any-return]


def test_float16_gq_is_float64s_or_an_error_naming_the_pass() -> None:
    torch.manual_seed(0)
    x, y = 1e-3 * torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    base = Steep(1.0)
    # A float16 model within float16's range: its GQ gradient (taken within the call and
    # checked) is float64's to float16 precision.
    oracle = copy.deepcopy(base).to(F64)
    want = brute_gq(oracle, x.to(F64), y).mean()
    want_grads = named_grads(oracle, want)
    for method in ("loop", "recompute", "batched", "jacrev"):
        model = copy.deepcopy(base).half()
        gq = gq_loss(model, x, y, method=method)
        torch.testing.assert_close(gq.double(), want, rtol=1e-2, atol=0)
        gq.backward()
        for name, param in model.named_parameters():
            assert param.grad is not None and param.grad.dtype == torch.float16
            torch.testing.assert_close(param.grad.double(), want_grads[name], rtol=3e-2, atol=1e-3)
    # Its input gradient on the logits overflows with steeper weights (logits still finite): the value is
    # refused, naming the pass, in training and for the value alone.
    steep = Steep(2000.0).half()
    assert bool(torch.isfinite(steep(x.half())).all())
    message = r"^gq_loss: GQ's value is not finite .* per-class input-gradient pass overflowed"
    with pytest.raises(RuntimeError, match=message):
        gq_loss(steep, x, y, operand="logits")
    with pytest.raises(RuntimeError, match=message), torch.no_grad():
        gq_loss(steep, x, y, operand="logits")
    with pytest.raises(ValueError, match=r"reduction='none' cannot be trained with float16"):
        gq_loss(steep, x, y, reduction="none")
