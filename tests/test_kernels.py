"""class_gradient_norms and the methods behind it (loop, batched, jacrev, recompute) against
brute-force float64 references: identities, side effects, errors, and, through gq_loss, each
method's gradient (gradcheck), buffer updates and the recompute replay, second derivatives,
TorchScript and devices."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
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
    FirstOrderTanh,
    Flat,
    Shifted,
    batch_sum_norms,
    brute_gq,
    brute_norms,
    buffers,
    input_shape,
    low_precision_norms,
    make_model,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import spectral_norm

import gq_loss._backends as _backends
import gq_loss.kernels as kernels
from gq_loss import class_gradient_norms, gq_loss
from gq_loss._runtime import place_inputs
from gq_loss.kernels import GRADIENT_METHODS, OPERANDS, auto_choice


def test_variants_cover_every_method() -> None:
    assert {m for m, _ in VARIANTS} == set(GRADIENT_METHODS)
    assert not hasattr(kernels, "METHODS")  # renamed without an alias (1.0 API)
    assert set(OPERANDS) == {"softmax", "log_softmax", "logits"}


# --------------------------------------------------------------------------- helpers


def check_parity(
    model: nn.Module,
    x: Tensor,
    operand: str,
    p: float,
    temperature: float,
    classes: Tensor | None,
    oracle: Callable[..., Tensor] = brute_norms,
    seed: int | None = None,
) -> list[str]:
    """Runs every variant against ``oracle``; returns the list of mismatches."""
    if seed is not None:
        torch.manual_seed(seed)
    want_full = oracle(model, x, operand, temperature, p)
    want = want_full if classes is None else want_full.gather(1, classes)
    weights = torch.rand(want.shape, dtype=F64) + 0.5
    want_grads = grads(model, want, weights)
    errors: list[str] = []
    for method, chunk in VARIANTS:
        if seed is not None:
            torch.manual_seed(seed)
        got = class_gradient_norms(
            model,
            x,
            operand=operand,
            temperature=temperature,
            p=p,
            classes=classes,
            create_graph=True,
            method=method,
            chunk_size=chunk,
        )
        torch.rand(7)  # consume RNG between the call and its backward (recompute must replay)
        label = f"{method}/{chunk} {operand} p={p} T={temperature}"
        compare(errors, label + " value", got, want)
        compare(errors, label + " grad", grads(model, got, weights), want_grads)
    return errors


# --------------------------------------------------------------------------- oracle parity


@pytest.mark.parametrize("operand", ["softmax", "log_softmax", "logits"])
@pytest.mark.parametrize("p", NORMS)
def test_parity_grid(operand: str, p: float) -> None:
    model = make_model("conv_bn", (2, 3, 3), 4, seed=1)
    x = torch.randn(3, 2, 3, 3, dtype=F64)
    classes = torch.tensor([[0, 3], [2, 2], [1, 0]])
    errors = check_parity(model, x, operand, p, 0.7, None)
    errors += check_parity(model, x, operand, p, 2.5, classes)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("kind", ["conv_gn", "conv_ln"])
@pytest.mark.parametrize("rank", [3, 4])
def test_parity_groupnorm_and_layernorm_over_channels(kind: str, rank: int) -> None:
    # GroupNorm, and LayerNorm over (C, H, W) / (C, L): per-sample statistics over channels and
    # space, whose double backward the vmapped methods must batch.
    shape = input_shape(kind, rank)
    model = make_model(kind, shape, 4, seed=5)
    x = torch.randn(3, *shape, dtype=F64)
    classes = torch.tensor([[0, 3], [2, 2], [1, 0]])
    errors = check_parity(model, x, "softmax", 1, 1.3, None)
    errors += check_parity(model, x, "log_softmax", 2, 0.8, classes)
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
    k=st.one_of(st.none(), st.integers(1, 3)),
    seed=st.integers(0, 2**16),
)
def test_parity_hypothesis(
    kind: str,
    rank: int,
    batch: int,
    n: int,
    operand: str,
    p: float,
    temperature: float,
    k: int | None,
    seed: int,
) -> None:
    shape = input_shape(kind, rank)
    model = make_model(kind, shape, n, seed=seed)
    x = torch.randn(batch, *shape, dtype=F64)
    classes = None if k is None else torch.randint(0, n, (batch, k))
    errors = check_parity(model, x, operand, p, temperature, classes)
    assert not errors, "\n".join(errors)


def test_empty_batch_shapes() -> None:
    model = make_model("mlp_gelu", (4,), 3)
    for method, chunk in VARIANTS:
        out = class_gradient_norms(
            model, torch.zeros(0, 4, dtype=F64), method=method, chunk_size=chunk, create_graph=True
        )
        assert out.shape == (0, 3) and out.dtype == F64


# --------------------------------------------------------------------------- coupled batches


def dropout_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(5, 8),
        nn.Dropout(0.4),
        nn.GELU(),
        nn.Linear(8, 8),
        nn.Dropout(0.3),
        nn.Linear(8, 4),
    ).to(F64)


@pytest.mark.parametrize("operand", ["softmax", "logits"])
def test_dropout_train_mode_replays_masks(operand: str) -> None:
    model = dropout_model().train()
    x = torch.randn(4, 5, dtype=F64)
    # Dropout samples independently, so with the same seed the batch-sum oracle is per-sample.
    errors = check_parity(model, x, operand, 1, 1.5, None, oracle=batch_sum_norms, seed=11)
    assert not errors, "\n".join(errors)
    assert model.training
    # The masks matter: another seed gives other norms (so the comparison above can fail).
    torch.manual_seed(11)
    a = class_gradient_norms(model, x, operand=operand)
    torch.manual_seed(12)
    b = class_gradient_norms(model, x, operand=operand)
    assert not torch.allclose(a, b)


def bn_train_model() -> nn.Module:
    torch.manual_seed(4)
    return (
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.GELU(),
            Flat(),
            nn.Linear(3 * 9, 6),
            nn.BatchNorm1d(6),
            nn.Tanh(),
            nn.Linear(6, 3),
        )
        .to(F64)
        .train()
    )


@pytest.mark.parametrize("operand", ["softmax", "log_softmax"])
def test_train_batchnorm_batch_sum_and_running_stats(operand: str) -> None:
    base = bn_train_model()
    x = torch.randn(5, 2, 3, 3, dtype=F64)
    once = copy.deepcopy(base)
    once(x)  # one plain forward from the same state
    expected_stats = buffers(once)
    oracle_model = copy.deepcopy(base)
    want = batch_sum_norms(oracle_model, x, operand, 1.3, 1)
    weights = torch.rand(want.shape, dtype=F64) + 0.5
    want_grads = grads(oracle_model, want, weights)
    # The batch-sum definition really differs from per-sample derivatives here.
    per_sample = brute_norms(copy.deepcopy(base).eval(), x, operand, 1.3, 1)
    assert not torch.allclose(want, per_sample, rtol=1e-3)
    errors: list[str] = []
    for method, chunk in VARIANTS:
        model = copy.deepcopy(base)
        got = class_gradient_norms(
            model,
            x,
            operand=operand,
            temperature=1.3,
            create_graph=True,
            method=method,
            chunk_size=chunk,
        )
        label = f"{method}/{chunk}"
        compare(errors, label + " value", got, want)
        compare(errors, label + " grad", grads(model, got, weights), want_grads)
        compare(errors, label + " running stats", buffers(model), expected_stats, rtol=0)
        # backward() (the training-step path) must not update the statistics again either.
        model2 = copy.deepcopy(base)
        out = class_gradient_norms(
            model2, x, operand=operand, create_graph=True, method=method, chunk_size=chunk
        )
        (out * weights).sum().backward()
        compare(errors, label + " stats after backward", buffers(model2), expected_stats, rtol=0)
        assert model.training and model2.training
    assert not errors, "\n".join(errors)


def test_channels_last_cpu_passes_run_in_the_default_layout() -> None:
    # The BatchNorm CNN above in channels_last: every method's norms and parameter gradient equal
    # the float64 batch-sum oracle of the same model in the default layout. GQ's passes ran on
    # contiguous activations (torch's CPU reductions over the batch dimension of channels_last
    # tensors are slow); the model, its `.grad` and the caller's own forward keep channels_last.
    cl = torch.channels_last
    base = bn_train_model()
    x = torch.randn(5, 2, 3, 3, dtype=F64)
    oracle_model = copy.deepcopy(base)
    want = batch_sum_norms(oracle_model, x, "softmax", 1.0, 1)
    weights = torch.rand(want.shape, dtype=F64) + 0.5
    want_grads = grads(oracle_model, want, weights)
    errors: list[str] = []
    seen: list[bool] = []  # per BatchNorm2d call: whether its input was contiguous
    for method, chunk in VARIANTS:
        model = copy.deepcopy(base).to(memory_format=cl)
        conv, bn = model[0], model[1]
        seen.clear()
        hook = bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
        got = class_gradient_norms(model, x.contiguous(memory_format=cl), create_graph=True,
                                   method=method, chunk_size=chunk)  # fmt: skip
        label = f"{method}/{chunk}"
        compare(errors, label + " value", got, want)
        (got * weights).sum().backward()
        compare(errors, label + " grad", [q.grad for q in model.parameters()], want_grads)
        if not (seen and all(seen)):
            errors.append(f"{label}: a pass ran BatchNorm on channels_last inputs: {seen}")
        if not (conv.weight.is_contiguous(memory_format=cl) and conv.weight.grad.is_contiguous(
                memory_format=cl) and not conv.weight.is_contiguous()):  # fmt: skip
            errors.append(f"{label}: the weight or its .grad left channels_last")
        seen.clear()
        model(x.contiguous(memory_format=cl))
        hook.remove()
        if seen != [False]:
            errors.append(f"{label}: the caller's own forward left channels_last: {seen}")
    assert not errors, "\n".join(errors)


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_linear_model_logit_norms_are_weight_row_norms(p: float, temperature: float) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(Flat(), nn.Linear(12, 4)).to(F64)
    x = torch.randn(6, 3, 2, 2, dtype=F64)
    rows = torch.linalg.vector_norm(model[1].weight.detach(), ord=p, dim=1) / temperature
    for method, chunk in VARIANTS:
        got = class_gradient_norms(
            model,
            x,
            operand="logits",
            p=p,
            temperature=temperature,
            method=method,
            chunk_size=chunk,
        )
        torch.testing.assert_close(got, rows.expand(6, 4), rtol=1e-12, atol=0)


@pytest.mark.parametrize("operand", ["softmax", "log_softmax"])
@pytest.mark.parametrize("input_dependent", [False, True])
def test_invariance_to_common_shift(operand: str, input_dependent: bool) -> None:
    inner = make_model("softplus", (2, 3), 4)
    x = torch.randn(3, 2, 3, dtype=F64)
    base = class_gradient_norms(inner, x, operand=operand, p=2)
    for method, chunk in VARIANTS:
        got = class_gradient_norms(
            Shifted(inner, 37.0, input_dependent),
            x,
            operand=operand,
            p=2,
            method=method,
            chunk_size=chunk,
        )
        torch.testing.assert_close(got, base, rtol=1e-9, atol=1e-12)
    # Logit gradients are not invariant to an input-dependent shift: the check above can fail.
    if input_dependent:
        shifted = class_gradient_norms(Shifted(inner, 37.0, True), x, operand="logits")
        assert not torch.allclose(shifted, class_gradient_norms(inner, x, operand="logits"))


# --------------------------------------------------------------------------- side effects


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize("training", [False, True])
def test_no_side_effects(training: bool) -> None:
    model = make_model("conv_bn", (2, 3, 3), 3).train(training)
    x = torch.randn(4, 2, 3, 3, dtype=F64)
    x_copy = x.clone()
    stats = buffers(model)
    for method, chunk in VARIANTS:
        for create_graph in (False, True):
            out = class_gradient_norms(
                model, x, create_graph=create_graph, method=method, chunk_size=chunk
            )
            assert out.requires_grad == create_graph
            assert model.training == training
            assert all(q.grad is None for q in model.parameters())
            assert not x.requires_grad and x.grad is None
            assert torch.equal(x, x_copy)
            assert hook_count(model) == 0
            if not training:
                assert all(torch.equal(v, stats[k]) for k, v in model.named_buffers())


@pytest.mark.parametrize("leaf", [True, False])
@pytest.mark.parametrize("operand", ["softmax", "logits"])
def test_input_gradient_flows_to_caller(leaf: bool, operand: str) -> None:
    model = make_model("mlp_gelu", (2, 3), 4)
    data = torch.randn(3, 2, 3, dtype=F64)
    weights = torch.rand(3, 4, dtype=F64)

    def make_inputs() -> tuple[Tensor, Tensor]:
        root = data.clone().requires_grad_(True)
        return root, (root if leaf else root * 1.5)

    root, inputs = make_inputs()
    want = brute_norms(model, inputs, operand, 1.2, 1)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), root)
    assert want_grad.abs().sum() > 0
    for method, chunk in VARIANTS:
        root, inputs = make_inputs()
        got = class_gradient_norms(
            model,
            inputs,
            operand=operand,
            temperature=1.2,
            create_graph=True,
            method=method,
            chunk_size=chunk,
        )
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        (got_grad,) = torch.autograd.grad((got * weights).sum(), root)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-12)
        assert root.grad is None and inputs.requires_grad
        assert all(q.grad is None for q in model.parameters())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_value_without_grad_mode(context: Callable[[], object]) -> None:
    # Validation loops (Lightning runs them under inference mode): the value, detached.
    model = make_model("softplus", (5,), 3)
    x = torch.randn(4, 5, dtype=F64)
    want = brute_norms(model, x, "softmax", 1.0, 1).detach()
    for method, chunk in VARIANTS:
        with context():  # type: ignore[attr-defined]
            inputs = x.clone()  # an inference tensor under inference_mode
            got = class_gradient_norms(
                model, inputs, method=method, chunk_size=chunk, create_graph=True
            )
        assert not got.requires_grad
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert all(q.grad is None for q in model.parameters())
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_float32_model_gives_float32_norms() -> None:
    model = make_model("mlp_gelu", (4,), 3).float()
    x = torch.randn(2, 4)
    got = class_gradient_norms(model, x)
    assert got.dtype == torch.float32
    want = brute_norms(model.double(), x.double(), "softmax", 1.0, 1).detach()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_gives_float32_norms(dtype: torch.dtype) -> None:
    # Documented: float32 or wider. The norms of a bf16/fp16 gradient are accumulated in float32.
    model = make_model("conv_bn", (2, 3, 3), 4).to(dtype)
    x = torch.randn(3, 2, 3, 3)
    want = low_precision_norms(model, x, dtype)
    for method, chunk in VARIANTS:
        got = class_gradient_norms(model, x, method=method, chunk_size=chunk, create_graph=True)
        assert got.dtype == torch.float32, (method, chunk)
        # loop and recompute take the very gradient of the oracle; vmap may round it otherwise
        resolved = auto_choice(model).method if method == "auto" else method  # type: ignore[union-attr]
        rtol = 1e-6 if resolved in ("loop", "recompute") else 2e-2
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)


# --------------------------------------------------------------------------- validation


def tiny() -> nn.Module:
    return nn.Sequential(Flat(), nn.Linear(4, 3)).to(F64)


X = torch.zeros(2, 4, dtype=F64)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"operand": "probs"}, ValueError, r"`operand` must be one of .*'probs'"),
        ({"operand": None}, ValueError, r"`operand` must be one of"),
        ({"method": "vmap"}, ValueError, r"`method` must be one of .*'vmap'"),
        ({"p": 3}, ValueError, r"`p` must be one of 1, 2 or math.inf, got 3"),
        ({"p": 0}, ValueError, r"`p` must be one of"),
        ({"p": True}, ValueError, r"`p` must be one of .*True"),
        ({"p": "inf"}, ValueError, r"`p` must be one of"),
        ({"p": math.nan}, ValueError, r"`p` must be one of"),
        ({"temperature": 0}, ValueError, r"`temperature` must be finite and > 0, got 0"),
        ({"temperature": -1.0}, ValueError, r"`temperature` must be finite and > 0, got -1.0"),
        ({"temperature": math.nan}, ValueError, r"`temperature` must be finite and > 0, got nan"),
        ({"temperature": math.inf}, ValueError, r"`temperature` must be finite and > 0, got inf"),
        ({"temperature": True}, TypeError, r"`temperature` must be a real number, got bool"),
        ({"temperature": "1"}, TypeError, r"`temperature` must be a real number, got str"),
        ({"chunk_size": 0, "method": "recompute"}, ValueError, r"`chunk_size` must be >= 1, got 0"),
        ({"chunk_size": -1}, ValueError, r"`chunk_size` must be >= 1, got -1"),
        ({"chunk_size": 1.5}, TypeError, r"`chunk_size` must be an int or None, got float"),
        ({"chunk_size": True}, TypeError, r"`chunk_size` must be an int or None, got bool"),
        ({"chunk_size": 2, "method": "loop"}, ValueError, r"`chunk_size` has no effect"),
        ({"classes": [[0], [1]]}, TypeError, r"`classes` must be a torch.Tensor .*list"),
        ({"classes": torch.zeros(2, 1)}, TypeError, r"`classes` must hold int64 .*float32"),
        (
            {"classes": torch.zeros(2, 1, dtype=torch.int32)},
            TypeError,
            r"`classes` must hold int64 .*int32",
        ),
        (
            {"classes": torch.zeros(2, dtype=torch.long)},
            ValueError,
            r"`classes` must have shape \(B, K\) with B = 2, got \(2,\)",
        ),
        (
            {"classes": torch.zeros(3, 1, dtype=torch.long)},
            ValueError,
            r"`classes` must have shape .*got \(3, 1\)",
        ),
        (
            {"classes": torch.tensor([[0], [3]])},
            ValueError,
            r"`classes` must hold class indices in \[0, 3\) .*\[0, 3\]",
        ),
        (
            {"classes": torch.tensor([[-1], [0]])},
            ValueError,
            r"`classes` must hold class indices in \[0, 3\) .*\[-1, 0\]",
        ),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        class_gradient_norms(tiny(), X, **kwargs)


@pytest.mark.parametrize(
    ("inputs", "error", "match"),
    [
        ([[0.0] * 4] * 2, TypeError, r"`inputs` must be a torch.Tensor, got list"),
        (
            torch.zeros(2, 4, dtype=torch.long),
            TypeError,
            r"`inputs` must be a floating-point .*int64",
        ),
        (
            torch.zeros(4, dtype=F64),
            ValueError,
            r"`inputs` must have shape \(B, ...\) .*got \(4,\)",
        ),
        (torch.zeros((), dtype=F64), ValueError, r"at least 2 dimensions, got \(\)"),
    ],
)
def test_bad_inputs(inputs: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        class_gradient_norms(tiny(), inputs)


class Returns(nn.Module):
    def __init__(self, fn: Callable[[Tensor], object]) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).to(F64)
        self.fn = fn

    def forward(self, x: Tensor) -> object:
        return self.fn(self.lin(x))


@pytest.mark.parametrize(
    ("fn", "error", "match"),
    [
        (lambda z: z.sum(1), ValueError, r"shape \(B, N\) with B = 2, got shape \(2,\)"),
        (lambda z: z[:1], ValueError, r"with B = 2, got shape \(1, 3\)"),
        (lambda z: z[:, :, None], ValueError, r"got shape \(2, 3, 1\)"),
        (lambda z: z.long(), ValueError, r"floating-point logits .*torch.int64"),
        (lambda z: z[:, :1], ValueError, r"N >= 2 classes, got N = 1"),
        (lambda z: (z,), TypeError, r"tensor of logits .*got tuple .*`output=0`"),
        (lambda z: {"scores": z}, TypeError, r"got dict with keys \['scores'\].*`output='scores'`"),
        (lambda z: object(), TypeError, r"got object; .*`output=lambda out: <the logits in out>`"),
    ],
)
def test_bad_model_output(
    fn: Callable[[Tensor], object], error: type[Exception], match: str
) -> None:
    for method in GRADIENT_METHODS:
        with pytest.raises(error, match=match):
            class_gradient_norms(Returns(fn), X, method=method)


def test_inputs_cast_to_the_model_dtype() -> None:
    # A float64 model given float32 inputs: the inputs follow the model (documented rule).
    model = make_model("mlp_gelu", (4,), 3)
    x = torch.randn(3, 4)
    want = brute_norms(model, x.double()).detach()
    for method, chunk in VARIANTS:
        got = class_gradient_norms(model, x, method=method, chunk_size=chunk)
        assert got.dtype == F64
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # The cast is differentiable: a caller's float32 input graph continues.
    root = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(class_gradient_norms(model, root, create_graph=True).sum(), root)
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


def test_place_inputs_rule() -> None:
    model = nn.Linear(4, 3).to(F64)
    x = torch.randn(2, 4)
    assert place_inputs(model, x).dtype == F64
    same = x.double()
    assert place_inputs(model, same) is same  # no copy when device and dtype already match
    ids = torch.tensor([1, 2])
    assert place_inputs(model, ids).dtype == torch.long  # only floating inputs are cast
    assert place_inputs(lambda t: model(t), x) is x  # plain callables: unchanged
    assert place_inputs(nn.ReLU(), x) is x  # no floating parameter: unchanged
    meta = nn.Linear(4, 3, device="meta")
    assert place_inputs(meta, x).device.type == "meta"  # inputs follow the parameters' device


def model_error(model: Callable[[Tensor], object], x: Tensor) -> Exception:
    """What the model itself raises on ``x``."""
    with pytest.raises(Exception) as info:
        model(x)
    return info.value


@pytest.mark.parametrize("batchnorm", [False, True])
def test_single_image_says_unsqueeze(batchnorm: bool) -> None:
    norm = nn.BatchNorm2d(2) if batchnorm else nn.Identity()
    model = nn.Sequential(nn.Conv2d(3, 2, 3), norm, Flat(), nn.Linear(2 * 4, 3))
    image = torch.randn(3, 6, 6)
    own = model_error(model, image)  # BatchNorm: ValueError; the Linear: RuntimeError
    for method in ("loop", "batched", "recompute", "jacrev"):
        with pytest.raises(type(own)) as info:
            class_gradient_norms(model, image, method=method)
        # The model's own error, with a note: the type and message are kept.
        assert str(own) in str(info.value)
        notes = " ".join(getattr(info.value, "__notes__", []))
        assert "for a single (C, H, W) image pass `x.unsqueeze(0)`" in notes


class Text(nn.Module):
    """A (B, L, D) text model that fails on its own (a width mismatch, a bad mask)."""

    def __init__(self, error: type[Exception] | None) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.error = error

    def forward(self, x: Tensor) -> Tensor:
        if self.error is not None:
            raise self.error("attention mask has 4 positions, inputs have 6")
        return self.lin(x).mean(1)


@pytest.mark.parametrize("error", [None, KeyError, IndexError, ValueError, RuntimeError])
def test_batch_of_sequences_keeps_the_models_error(error: type[Exception] | None) -> None:
    # A (B, L, D) batch is not a single image: no unsqueeze hint, the model's own type and message.
    model, x = Text(error), torch.randn(2, 6, 4)  # D = 4, the model takes 5 when error is None
    own = model_error(model, x)
    for method in ("loop", "batched", "recompute", "jacrev"):
        with pytest.raises(type(own)) as info:
            class_gradient_norms(model, x, method=method)
        assert str(info.value) == str(own) and not getattr(info.value, "__notes__", [])


def test_bad_model() -> None:
    with pytest.raises(TypeError, match=r"`model` must be callable .*got int"):
        class_gradient_norms(3, X)
    linear = tiny()

    def plain(x: Tensor) -> Tensor:
        return linear(x)

    # A plain function works with the methods that never replay the model...
    for method in ("auto", "loop", "batched", "jacrev"):
        torch.testing.assert_close(
            class_gradient_norms(plain, X, method=method),
            class_gradient_norms(linear, X),
        )
    # ...but recompute needs the module to find and replay its parameters.
    with pytest.raises(
        TypeError, match=r"method='recompute' needs an nn.Module model, got function"
    ):
        class_gradient_norms(plain, X, method="recompute")
    with pytest.raises(TypeError, match=r"needs an nn.Module"):
        class_gradient_norms(plain, X, chunk_size=2)  # auto -> recompute


# --------------------------------------------------------------------------- jacrev (torch.func)


class CountsCalls(nn.Module):
    """Mutates a captured, unregistered tensor in place: torch.func refuses that."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).to(F64)
        self.calls = torch.zeros((), dtype=F64)

    def forward(self, x: Tensor) -> Tensor:
        out = self.lin(x)
        self.calls.add_(out.sum().detach())
        return out


class OldStyleSquare(torch.autograd.Function):
    """An autograd.Function without setup_context: autograd runs it, torch.func does not."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)  # type: ignore[attr-defined]
        return x * x

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return 2 * x * grad


class UsesOldFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).to(F64)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(OldStyleSquare.apply(x))


@pytest.mark.parametrize("make", [CountsCalls, UsesOldFunction])
def test_jacrev_refuses_what_torch_func_cannot_run(make: Callable[[], nn.Module]) -> None:
    model = make()
    # The other methods run it (so the refusal is about torch.func, not the model)...
    class_gradient_norms(model, X, method="loop", create_graph=True)
    # ...jacrev says what to use instead, never a wrong number.
    with pytest.raises(RuntimeError, match=r"method='jacrev' could not run .*use method='loop'"):
        class_gradient_norms(model, X, method="jacrev", create_graph=True)


def test_jacrev_names_the_function_without_setup_context() -> None:
    # The cause is the Function (not reentrant checkpointing, which the model does not use)...
    model, x = UsesOldFunction(), torch.randn(3, 4, dtype=F64)
    message = (
        r"^gq_loss: method='jacrev' .*the custom autograd.Function OldStyleSquare has no "
        r"setup_context .*use method='loop', 'recompute' or 'batched'.*or give it a setup_context"
    )
    with pytest.raises(RuntimeError, match=message) as info:
        class_gradient_norms(model, x, method="jacrev", create_graph=True)
    assert "use_reentrant" not in str(info.value)
    # ...and the methods named there give the loop's values and parameter gradients.
    want = class_gradient_norms(model, x, method="loop", create_graph=True)
    weights = torch.rand(want.shape, dtype=F64)
    want_grads = grads(model, want, weights)
    for method in ("recompute", "batched"):
        got = class_gradient_norms(model, x, method=method, create_graph=True)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        assert got.min() > 0
        torch.testing.assert_close(grads(model, got, weights), want_grads)


def test_jacrev_keeps_other_graphs_on_the_model_valid() -> None:
    # An eval-mode BatchNorm saves its running statistics in every graph through it; jacrev
    # writes back only the buffers its forward changed, so an earlier graph still backwards.
    model = make_model("conv_bn", (2, 3, 3), 3)
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    earlier = class_gradient_norms(model, x, create_graph=True, method="loop")
    later = class_gradient_norms(model, x, create_graph=True, method="jacrev")
    torch.testing.assert_close(later, earlier, rtol=1e-10, atol=1e-12)
    (earlier.sum() + later.sum()).backward()
    assert all(q.grad is not None for q in model.parameters())


def test_jacrev_chunk_size_reaches_vmap(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    vmap = torch.func.vmap

    def spy(fn: Callable[..., Tensor], **kwargs: object) -> Callable[..., Tensor]:
        seen.append(kwargs.get("chunk_size"))
        return vmap(fn, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.func, "vmap", spy)
    model = make_model("mlp_gelu", (4,), 5)
    x = torch.randn(3, 4, dtype=F64)
    a = class_gradient_norms(model, x, method="jacrev", chunk_size=2)
    b = class_gradient_norms(model, x, method="jacrev")
    assert seen == [2, None]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_jacrev_refuses_ddp_wrapper() -> None:
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)  # a module without a process group
    with pytest.raises(TypeError, match=r"method='jacrev' cannot run a DistributedDataParallel"):
        class_gradient_norms(ddp, X, method="jacrev")


@pytest.mark.parametrize("kind", ["conv_bn", "conv_gn", "conv_ln"])
def test_batched_under_cpu_bf16_autocast_equals_loop(kind: str) -> None:
    # Each of PyTorch's vmaps breaks one of these double backwards in torch 2.13 (the older one
    # GroupNorm's, torch.func's BatchNorm's and LayerNorm's under bf16): batched takes the other.
    model = make_model(kind, (2, 3, 3), 4, seed=3).float()
    x = torch.randn(3, 2, 3, 3)
    weights = torch.rand(3, 4) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = class_gradient_norms(model, x, method="loop", create_graph=True)
        got = class_gradient_norms(model, x, method="batched", create_graph=True)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-4)
    for g, w in zip(grads(model, got, weights), grads(model, want, weights), strict=True):
        torch.testing.assert_close(g, w, rtol=5e-2, atol=2e-2)  # bf16: steps of 2^-7 near 1


def test_batched_says_loop_when_neither_vmap_can() -> None:
    # LayerNorm on bf16 activations and GroupNorm under bf16 autocast: each vmap fails on one.
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.LayerNorm([4, 3, 3]), nn.GroupNorm(2, 4), Flat(),
        nn.Linear(36, 3),
    )  # fmt: skip
    x = torch.randn(3, 2, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = class_gradient_norms(model, x, method="loop", create_graph=True)
        with pytest.raises(RuntimeError, match=r"gq_loss: method='batched' could not .*'loop'"):
            class_gradient_norms(model, x, method="batched", create_graph=True)
        # without a graph (the values) both vmaps run
        torch.testing.assert_close(
            class_gradient_norms(model, x, method="batched"), want.detach(), rtol=2e-2, atol=1e-4
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_jacrev_under_cpu_autocast_with_batchnorm_equals_loop(dtype: torch.dtype) -> None:
    # torch 2.13's vmapped BatchNorm backward rejects the mixed half/float32 operands of CPU
    # autocast ("expected scalar type BFloat16 but found Float"); jacrev then runs its pullback
    # one class at a time, and gives loop's numbers.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Flat(), nn.Linear(4 * 4 * 4, 5))
    x = torch.rand(3, 3, 6, 6)
    weights = torch.rand(3, 5) + 0.5
    for mode in (model.eval, model.train):
        mode()
        start = copy.deepcopy(model.state_dict())
        with torch.autocast("cpu", dtype=dtype):
            want = class_gradient_norms(model, x, method="loop", create_graph=True)
        want_grads = grads(model, want, weights)
        model.load_state_dict(start)  # the same BatchNorm statistics for both
        with torch.autocast("cpu", dtype=dtype):
            got = class_gradient_norms(model, x, method="jacrev", create_graph=True)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
        for g, w in zip(grads(model, got, weights), want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=2e-2, atol=1e-3)


@pytest.fixture
def one_process_group() -> object:
    """A gloo process group of one process (a real DistributedDataParallel can be built)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


class _Step(nn.Module):
    """A LightningModule's shape: the DDP-wrapped module whose forward runs GQ on its network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        gq, logits = gq_loss(self.net, x, y, return_logits=True)
        return torch.nn.functional.cross_entropy(logits, y) + gq


def test_ddp_static_graph_is_refused_where_gq_sees_it(one_process_group: object) -> None:
    # With static_graph=True, GQ's own backward passes inside the call set off DDP's one-time
    # static-graph bookkeeping before any gradient exists: the processes' gradients were never
    # all-reduced, silently (ranks 2.2 apart after one step on two processes).
    DDP = nn.parallel.DistributedDataParallel
    x, y = torch.randn(4, 4, dtype=F64), torch.tensor([0, 1, 2, 0])
    message = r"static_graph=True.*never be all-reduced; build it with static_graph=False"
    static = DDP(make_model("mlp_gelu", (4,), 3), static_graph=True)
    fabric_like = nn.ModuleDict({"forward_module": static})  # a wrapper holding the DDP
    for model in (static, fabric_like):
        with pytest.raises(ValueError, match=message):
            gq_loss(model, x, y)
        with pytest.raises(ValueError, match=message), torch.no_grad():
            class_gradient_norms(model, x)
    # The default DDP runs, equal to its module (one process: nothing to average)
    inner = make_model("mlp_gelu", (4,), 3)
    plain = DDP(copy.deepcopy(inner))
    torch.testing.assert_close(gq_loss(plain, x, y), gq_loss(inner, x, y), rtol=1e-12, atol=0)
    # ...and so does a DDP with a static graph around a module that runs GQ inside its own
    # forward, as Lightning's Trainer does: GQ's passes end before DDP's output exists.
    step = DDP(_Step(copy.deepcopy(inner)), static_graph=True)
    reference = _Step(copy.deepcopy(inner))
    for _ in range(2):
        step(x, y).backward()
        reference(x, y).backward()
    for got, want in zip(step.module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- gradcheck of gq_loss, each method


def tanh_model() -> nn.Module:
    torch.manual_seed(8)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)


class LossOf(nn.Module):
    """Wraps the model so that functional_call can swap its parameters for gradcheck inputs."""

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__()
        self.model, self.options = model, options

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return gq_loss(self.model, x, y, reduction="none", **self.options)


GRADCHECK_VARIANTS = [
    ("loop", None),
    ("recompute", None),
    ("recompute", 1),
    ("batched", 2),
    ("jacrev", None),
]


@pytest.mark.parametrize(("method", "chunk"), GRADCHECK_VARIANTS)
def test_gradcheck_parameters(method: str, chunk: int | None) -> None:
    model = tanh_model()
    x, y = torch.randn(2, 3, dtype=F64), torch.tensor([0, 2])
    wrapper = LossOf(model, method=method, chunk_size=chunk, p=2)
    names = [f"model.{n}" for n, _ in model.named_parameters()]
    params = tuple(q.detach().clone().requires_grad_(True) for q in model.parameters())

    def f(*ps: Tensor) -> Tensor:
        return functional_call(wrapper, dict(zip(names, ps, strict=True)), (x, y))

    assert torch.autograd.gradcheck(f, params)
    if method != "recompute":  # recompute is first-order only
        assert torch.autograd.gradgradcheck(f, params)


@pytest.mark.parametrize(("method", "chunk"), GRADCHECK_VARIANTS)
def test_gradcheck_inputs(method: str, chunk: int | None) -> None:
    model, y = tanh_model(), torch.tensor([1, 0])
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)

    def f(inp: Tensor) -> Tensor:
        return gq_loss(model, inp, y, reduction="none", method=method, chunk_size=chunk)

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize(("method", "chunk"), GRADCHECK_VARIANTS)
def test_functional_call_gradients_reach_the_swapped_parameters(
    method: str, chunk: int | None
) -> None:
    # torch.func.functional_call (ensembles, meta-learning, gradcheck above) swaps the module's
    # parameters only while the call runs; the GQ gradient must reach the tensors passed in.
    model, y = tanh_model(), torch.tensor([0, 2])
    x = torch.randn(2, 3, dtype=F64)
    wrapper = LossOf(model, method=method, chunk_size=chunk)
    names = [f"model.{n}" for n, _ in model.named_parameters()]
    params = [(q.detach() * 1.5).requires_grad_(True) for q in model.parameters()]
    with torch.no_grad():
        scaled = copy.deepcopy(model)
        for q in scaled.parameters():
            q.mul_(1.5)
    want = brute_gq(scaled, x, y)
    value = functional_call(wrapper, dict(zip(names, params, strict=True)), (x, y))
    torch.testing.assert_close(value, want, rtol=1e-9, atol=1e-12)
    got = torch.autograd.grad(value.sum(), params, allow_unused=True)
    assert all(g is not None for g in got), "no GQ gradient reached the swapped parameters"
    torch.testing.assert_close(list(got), grads(scaled, want), rtol=1e-8, atol=1e-12)
    assert all(q.grad is None for q in model.parameters())


def test_recompute_under_create_graph_is_right_or_refused() -> None:
    # loss.backward(create_graph=True) (gradient penalties, second-order optimisers): recompute
    # must either refuse with a RuntimeError or give the right first-order gradient, and then the
    # second-order one must be right or refused too -- never silently wrong.
    model, y = tanh_model(), torch.tensor([0, 2])
    x = torch.randn(2, 3, dtype=F64)
    params = list(model.parameters())
    gq, logits = gq_loss(model, x, y, method="loop", return_logits=True)
    want = torch.autograd.grad(F.cross_entropy(logits, y) + gq, params, create_graph=True)
    (want_hvp,) = torch.autograd.grad(sum((g * g).sum() for g in want), params[:1])
    gq, logits = gq_loss(model, x, y, method="recompute", return_logits=True)
    try:
        got = torch.autograd.grad(F.cross_entropy(logits, y) + gq, params, create_graph=True)
    except RuntimeError:
        return  # refused
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
    try:
        (got_hvp,) = torch.autograd.grad(sum((g * g).sum() for g in got), params[:1])
    except RuntimeError:
        return  # refused
    torch.testing.assert_close(got_hvp, want_hvp, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- forwards that update buffers, and the recompute replay


@pytest.mark.parametrize(
    ("method", "chunk"), [("loop", None), ("recompute", 1), ("batched", None), ("jacrev", None)]
)
def test_train_batchnorm_stats_updated_once_per_step(method: str, chunk: int | None) -> None:
    torch.manual_seed(9)
    base = (
        nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
        .to(F64)
        .train()
    )
    x, y = torch.randn(5, 4, dtype=F64), torch.tensor([0, 1, 2, 1, 0])
    once = copy.deepcopy(base)
    once(x)
    model = copy.deepcopy(base)
    gq, logits = gq_loss(model, x, y, method=method, chunk_size=chunk, return_logits=True)
    (F.cross_entropy(logits, y) + 1e-2 * gq).backward()
    for (name, got), want in zip(model.named_buffers(), once.buffers(), strict=True):
        assert torch.equal(got, want), name
    assert all(q.grad is not None for q in model.parameters())
    assert not torch.equal(buffers(base)["1.running_mean"], buffers(model)["1.running_mean"])


@pytest.mark.parametrize(("method", "chunk"), VARIANTS)
def test_spectral_norm_in_train_mode(method: str, chunk: int | None) -> None:
    # spectral_norm in train mode runs a power iteration on its buffers in every forward; the
    # recompute replay used to start from the buffers as that forward left them, so it
    # differentiated another function (relative gradient error 1e-3 here).
    torch.manual_seed(0)
    base = nn.Sequential(
        spectral_norm(nn.Linear(5, 8)), nn.Tanh(), spectral_norm(nn.Linear(8, 4))
    ).to(F64)
    x, y = torch.randn(6, 5, dtype=F64), torch.tensor([0, 1, 2, 3, 0, 1])
    # Float64 oracle: the function of the one forward, i.e. W / sigma with the vectors after one
    # power iteration from the state before the call, which eval mode computes without iterating.
    oracle = copy.deepcopy(base).train()
    with torch.no_grad():
        oracle(x)
    oracle.eval()
    want = brute_gq(oracle, x, y).mean()
    want_grads = named_grads(oracle, want)
    model = copy.deepcopy(base).train()
    got = gq_loss(model, x, y, method=method, chunk_size=chunk)
    got_grads = named_grads(model, got)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(got_grads, want_grads, rtol=1e-9, atol=1e-12)
    # ...the same as loop's, and the buffers moved once, as one forward moves them.
    loop = copy.deepcopy(base).train()
    torch.testing.assert_close(got_grads, named_grads(loop, gq_loss(loop, x, y, method="loop")))
    for (name, buf), once in zip(model.named_buffers(), oracle.buffers(), strict=True):
        assert torch.equal(buf, once), name


class Decaying(nn.Module):
    """A forward that updates a buffer its output depends on (any buffer a forward mutates).

    `update="data"` writes through `.data`, the EMA idiom, which does not bump the buffer's
    version counter.
    """

    def __init__(self, update: str = "in place") -> None:
        super().__init__()
        self.update = update
        self.lin = nn.Linear(4, 3).to(F64)
        self.register_buffer("scale", torch.ones((), dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        if self.update == "data":
            self.scale.data.mul_(0.5)
        else:
            self.scale.mul_(0.5)
        return torch.tanh(self.lin(x)) * self.scale


@pytest.mark.parametrize("update", ["in place", "data"])
@pytest.mark.parametrize(("method", "chunk"), VARIANTS)
def test_forward_that_mutates_a_buffer(method: str, chunk: int | None, update: str) -> None:
    # recompute used to replay from the pre-forward copies of the buffers whose version moved
    # only, so a `.data` update was replayed from the updated value (relative error 0.5).
    torch.manual_seed(1)
    base = Decaying(update)
    x, y = torch.randn(5, 4, dtype=F64), torch.tensor([0, 1, 2, 1, 0])
    want = brute_gq(lambda t: torch.tanh(base.lin(t)) * 0.5, x, y).mean()  # scale 1 -> 0.5
    want_grads = named_grads(base, want)
    model = copy.deepcopy(base)
    got = gq_loss(model, x, y, method=method, chunk_size=chunk)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(named_grads(model, got), want_grads, rtol=1e-9, atol=1e-12)
    assert model.scale.item() == 0.5  # one forward's update, not two


@pytest.mark.parametrize(
    ("method", "chunk"), [("loop", None), ("recompute", None), ("recompute", 2)]
)
def test_qat_observers_that_do_not_bump_versions(method: str, chunk: int | None) -> None:
    # torch.ao's fused fake-quant updates its observer's min/max, scale and zero point in place
    # without bumping their version counters; recompute replayed from the updated ones (relative
    # gradient error 5e-3 here). Oracle: the function of the one forward, i.e. the fake-quant
    # with the observer state after one update from the state before the call, observer off.
    from torch.ao.quantization import FusedMovingAvgObsFakeQuantize

    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Linear(4, 8), FusedMovingAvgObsFakeQuantize(), nn.Tanh(), nn.Linear(8, 3)
    )
    with torch.no_grad():
        base(torch.randn(6, 4))  # an observer that has seen data
    x, y = 3 * torch.randn(6, 4), torch.tensor([0, 1, 2, 1, 0, 2])
    oracle = copy.deepcopy(base)
    with torch.no_grad():
        oracle(x)
    oracle[1].disable_observer()
    want = brute_gq(oracle, x, y).mean()
    want_grads = named_grads(oracle, want)
    model = copy.deepcopy(base)
    got = gq_loss(model, x, y, method=method, chunk_size=chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(named_grads(model, got), want_grads, rtol=1e-5, atol=1e-7)
    for (name, buf), once in zip(model.named_buffers(), oracle.buffers(), strict=True):
        assert torch.equal(buf, once) or name.endswith("observer_enabled"), name


def test_recompute_replays_under_the_callers_autocast() -> None:
    # The value comes from a bf16 forward; the replayed gradient must come from a bf16 forward
    # too (a float32 replay differed from loop by 3e-2, relative).
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 5)
    )
    x, y = torch.randn(8, 16), torch.randint(0, 5, (8,))

    def run(method: str, chunk: int | None, around_backward: bool = True) -> tuple[Tensor, Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = gq_loss(model, x, y, method=method, chunk_size=chunk)
        # the replay's autocast is the recorded one, not the one around backward()
        with torch.autocast("cpu", enabled=not around_backward):
            flat = torch.cat([g.flatten() for g in grads(model, value)])
        return value, flat

    want_value, want = run("loop", None)
    # Same classes per backward as loop: the same bf16 gradient. Other groupings (chunks, the
    # vmapped backward of jacrev and batched) add up bf16 terms in another order: about 4e-3.
    for method, chunk, tol in (
        ("recompute", None, 1e-3),
        ("recompute", 5, 1e-3),
        ("recompute", 2, 1e-2),
        ("jacrev", None, 1e-2),
        ("batched", None, 1e-2),
    ):
        for around_backward in (True, False):
            value, got = run(method, chunk, around_backward)
            torch.testing.assert_close(value, want_value, rtol=1e-6, atol=0)
            relative = float((got - want).norm() / want.norm())
            assert relative <= tol, (method, chunk, around_backward, relative)


# --------------------------------------------------------------------------- second derivatives and TorchScript


class FirstOrder(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return FirstOrderTanh.apply(x)  # type: ignore[no-any-return]


class Distances(nn.Module):
    """Distances to prototypes: aten's cdist has no double backward."""

    def __init__(self) -> None:
        super().__init__()
        self.proto = nn.Parameter(torch.randn(5, 5))

    def forward(self, x: Tensor) -> Tensor:
        return -torch.cdist(x, self.proto)


class Switchable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act, self.head = nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)
        self.first_order = False

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.lin(x)
        hidden = FirstOrderTanh.apply(hidden) if self.first_order else self.act(hidden)
        return self.head(hidden)  # type: ignore[no-any-return]


@pytest.mark.parametrize("change", ["swap", "flag", "swap_cdist"])
@pytest.mark.parametrize("method", ["loop", "recompute", "batched", "jacrev"])
def test_second_derivative_check_follows_the_model(method: str, change: str) -> None:
    # The check passed on the first call; a later change inside the model must not be dropped
    # silently (batched and jacrev dropped a @once_differentiable Function's second-order
    # terms, loop failed in backward() with PyTorch's bare message).
    torch.manual_seed(0)
    model = Switchable()
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    gq_loss(model, x, y, method=method).backward()
    if change == "swap":
        model.act = FirstOrder()
    elif change == "flag":
        model.first_order = True
    else:
        model.act = Distances()
    names = (
        r"_cdist_backward"
        if change == "swap_cdist"
        else r"custom autograd.Functions marked @once_differentiable: \['FirstOrderTanh'\]"
    )
    message = rf"^gq_loss: GQ differentiates the model's input gradients .*{names}"
    with pytest.raises(RuntimeError, match=message):
        gq_loss(model, x, y, method=method).backward()


class Body(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)  # type: ignore[no-any-return]


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
@pytest.mark.parametrize("kind", ["script", "trace", "scripted_submodule"])
def test_torchscript_modules(kind: str) -> None:
    # jacrev returned GQ without a graph on a scripted model (CE + lam * GQ then trained on CE
    # alone), recompute failed in backward() with PyTorch's stateless-API message: every method
    # either gives the float64 oracle's value and gradient or refuses, naming loop.
    torch.manual_seed(0)
    eager = Body(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))).to(F64)
    x, y = torch.randn(5, 4, dtype=F64), torch.tensor([0, 1, 2, 1, 0])
    want = brute_gq(eager, x, y).mean()
    want_grads = grads(eager, want)
    model = copy.deepcopy(eager)
    if kind == "script":
        model = torch.jit.script(model)
    elif kind == "trace":
        model = torch.jit.trace(model, x)
    else:
        model.body = torch.jit.script(model.body)  # type: ignore[assignment]
    for method, chunk in VARIANTS:
        resolved = method if method != "auto" else "loop" if chunk is None else "recompute"
        if resolved == "loop" or (resolved == "recompute" and kind == "scripted_submodule"):
            for _ in range(3):  # TorchScript's profiling executor optimises after two runs
                got = gq_loss(model, x, y, method=method, chunk_size=chunk)
                torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
                torch.testing.assert_close(grads(model, got), want_grads, rtol=1e-9, atol=1e-12)
            continue
        message = (
            rf"method='{resolved}' cannot run this model, which .*TorchScript.*use method='loop'"
        )
        with pytest.raises(TypeError, match=message):
            gq_loss(model, x, y, method=method, chunk_size=chunk)


def test_batched_names_loop_for_an_operation_vmap_cannot_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A scripted function inside an eager model fails under vmap once TorchScript's profiling
    # executor has optimised it (when depends on the executor's state): PyTorch's message
    # comes back with what to use instead.
    backend = _backends.BACKENDS["batched"]

    def no_rule(run: Any, columns: Any) -> Tensor:
        raise RuntimeError("Batching rule not implemented for prim::RequiresGradCheck")

    monkeypatch.setitem(_backends.BACKENDS, "batched", dataclasses.replace(backend, norms=no_rule))
    model, x, y = nn.Linear(4, 3), torch.randn(3, 4), torch.tensor([0, 1, 2])
    message = r"^gq_loss: method='batched' .*no batching rule .*prim::RequiresGradCheck.*'loop'"
    with pytest.raises(RuntimeError, match=message):
        gq_loss(model, x, y, method="batched")


# --------------------------------------------------------------------------- devices


def _device_parity(device: str) -> None:
    """Every method on ``device`` (float64 and float32) against the CPU float64 oracle, and the
    Dropout masks of ``recompute`` (replayed) and ``jacrev`` (one torch.func forward) on
    ``device`` against ``loop`` there."""
    cpu = make_model("conv_bn", input_shape("conv_bn", 4), 5)
    x = torch.randn(6, *input_shape("conv_bn", 4), dtype=F64)
    y = torch.randint(0, 5, (6,))
    expected = brute_gq(cpu, x, y).mean()
    expected_grads = grads(cpu, expected)
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-4)):
        model = copy.deepcopy(cpu).to(device=device, dtype=dtype)
        for method, chunk in VARIANTS:
            value = gq_loss(
                model, x.to(device, dtype), y.to(device), method=method, chunk_size=chunk
            )
            got = [g.double().cpu() for g in grads(model, value)]
            torch.testing.assert_close(value.double().cpu(), expected, rtol=tol, atol=tol)
            for g, e in zip(got, expected_grads, strict=True):
                torch.testing.assert_close(g, e, rtol=tol, atol=tol)
    drop = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 4)
    )
    drop = drop.to(device=device, dtype=F64).train()
    xd, yd = (
        torch.randn(5, 3, 2, 2, dtype=F64, device=device),
        torch.randint(0, 4, (5,), device=device),
    )
    results = []
    for method, chunk in (("loop", None), ("recompute", 2), ("jacrev", None), ("jacrev", 2)):
        torch.manual_seed(3)
        value = gq_loss(drop, xd, yd, method=method, chunk_size=chunk)
        results.append([value, *grads(drop, value)])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_device_parity_runs_on_cpu() -> None:
    _device_parity("cpu")


@pytest.mark.cuda
def test_cuda_matches_cpu_float64() -> None:
    _device_parity("cuda")
