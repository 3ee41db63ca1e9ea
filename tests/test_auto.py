"""`method="auto"`: the timed choice per model and set-up, without timing anything here.

The probe's clock is replaced by a fake that still runs every step (so failures are real) but
reports the times of a given ranking; the tests check what `auto` may choose, what it must never
choose, that its result is exact, that the probe leaves no trace, and the cache.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import warnings
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _oracles import (
    F64,
    FirstOrderTanh,
    Flat,
    batch_sum_norms,
    brute_gq,
    buffers,
    make_model,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gq_loss import GQLoss, _auto, _backends, _probe, class_gradient_norms, gq_loss
from gq_loss.kernels import auto_choice

X = torch.randn(4, 2, 3, 3, dtype=F64)
Y = torch.tensor([0, 3, 1, 2])


def grads(model: nn.Module, value: Tensor) -> list[Tensor]:
    params = list(model.parameters())
    out = torch.autograd.grad(value.sum(), params, allow_unused=True)
    return [torch.zeros_like(q) if g is None else g for q, g in zip(params, out, strict=True)]


@pytest.fixture
def ranking(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[str]]:
    """`ranking(*methods)`: the probe's clock says the methods are fastest in that order, all
    within 1.5x (a method not named is slowest); returns the list of methods the probe ran."""

    def install(*order: str) -> list[str]:
        ran: list[str] = []

        def fake(step: Callable[[str], None], method: str, device: torch.device) -> float:
            step(method)  # the real step: a method that fails here fails for real
            ran.append(method)
            return 1.0 + 0.1 * order.index(method) if method in order else 1.5

        monkeypatch.setattr(_probe, "_measure", fake)
        monkeypatch.setattr(_probe, "ENOUGH_SECONDS", math.inf)  # the fake steps are slow
        return ran

    return install


def test_slow_steps_are_timed_in_one_round(
    ranking: Callable[..., list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Steps of a second or more (the fake clock's) rank alike in one run each: a warm-up and one
    # timed round, then the choice.
    ran = ranking("jacrev")
    monkeypatch.setattr(_probe, "ENOUGH_SECONDS", 1.0)
    model = make_model("conv_bn", (2, 3, 3), 4)
    gq_loss(model, X, Y)
    assert len(ran) == 3 * 2 and auto_choice(model).method == "jacrev"  # type: ignore[union-attr]


@pytest.mark.parametrize("fastest", ["loop", "batched", "jacrev"])
def test_auto_takes_the_fastest_and_is_exact(
    ranking: Callable[..., list[str]], fastest: str
) -> None:
    model = make_model("conv_bn", (2, 3, 3), 4)
    ran = ranking(fastest)
    got = gq_loss(model, X, Y)
    choice = auto_choice(model)
    assert choice is not None and choice.method == fastest
    assert set(choice.seconds) == {"loop", "batched", "jacrev"} and not choice.excluded
    assert len(ran) == 3 * (1 + _auto.ROUNDS)  # a warm-up and the timed rounds, each method
    want = brute_gq(model, X, Y).mean()  # float64, one sample and one class at a time
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    for g, w in zip(grads(model, got), grads(model, want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


class FakeDDP(nn.parallel.DistributedDataParallel):
    """A DistributedDataParallel instance around a module, without a process group."""

    def __init__(self, module: nn.Module) -> None:
        nn.Module.__init__(self)
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


def test_ddp_and_multi_process_runs_are_loop_without_timing(
    ranking: Callable[..., list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = ranking("jacrev", "batched")
    inner = make_model("conv_bn", (2, 3, 3), 4)
    ddp = FakeDDP(inner)
    torch.testing.assert_close(
        gq_loss(ddp, X, Y), gq_loss(inner, X, Y, method="loop"), rtol=1e-12, atol=0
    )
    choice = auto_choice(ddp)
    assert choice is not None and choice.method == "loop"
    assert "DistributedDataParallel" in choice.excluded["jacrev"]
    # Processes of one run must choose alike, and timing would run the model's collectives.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    model = make_model("conv_bn", (2, 3, 3), 4)
    gq_loss(model, X, Y)
    choice = auto_choice(model)
    assert choice is not None and choice.method == "loop"
    assert "multi-process" in choice.excluded["jacrev"]
    assert ran == []


def test_deterministic_algorithms_make_auto_loop_without_timing(
    ranking: Callable[..., list[str]],
) -> None:
    # A run that asks for reproducible results must not get a method picked by a clock.
    ran = ranking("jacrev", "batched")
    model = make_model("conv_bn", (2, 3, 3), 4)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        gq_loss(model, X, Y)
    finally:
        torch.use_deterministic_algorithms(before)
    choice = auto_choice(model)
    assert choice is not None and choice.method == "loop" and ran == []
    assert "use_deterministic_algorithms" in choice.excluded["jacrev"]


def test_bf16_autocast_with_batchnorm_can_take_jacrev(ranking: Callable[..., list[str]]) -> None:
    # torch 2.13's vmapped BatchNorm backward rejects CPU autocast's mixed dtypes; jacrev runs
    # its pullback one class at a time there, so auto may take it (it used to fail in the probe).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Flat(), nn.Linear(64, 5)).eval()
    x, y = torch.rand(3, 3, 6, 6), torch.tensor([0, 4, 2])
    ranking("jacrev", "loop")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gq_loss(model, x, y)
        want = gq_loss(model, x, y, method="loop")
    choice = auto_choice(model)
    assert choice is not None and choice.method == "jacrev" and not choice.excluded
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(18, 6), nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        hidden = checkpoint(self.body, x.flatten(1), use_reentrant=False)
        return self.head(torch.tanh(hidden))


def test_checkpointing_never_takes_the_failing_jacrev(ranking: Callable[..., list[str]]) -> None:
    model = Checkpointed().to(F64)
    ranking("jacrev", "batched", "loop")
    got = gq_loss(model, X, Y)
    choice = auto_choice(model)
    assert choice is not None and choice.method == "batched" and "jacrev" in choice.excluded
    plain = copy.deepcopy(model)
    plain.forward = lambda t: plain.head(torch.tanh(plain.body(t.flatten(1))))  # type: ignore[method-assign]
    want = brute_gq(plain, X, Y).mean()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


def dropout_model() -> nn.Module:
    torch.manual_seed(2)
    return (
        nn.Sequential(Flat(), nn.Linear(18, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 4))
        .to(F64)
        .train()
    )


def test_train_mode_dropout_never_takes_jacrev_and_draws_loops_masks(
    ranking: Callable[..., list[str]],
) -> None:
    # torch.func may draw Dropout masks in another order than eager mode; auto's result must not
    # depend on which method the clock favoured: with the same seed it equals loop's.
    model, twin = dropout_model(), dropout_model()
    ran = ranking("jacrev", "batched", "loop")
    torch.manual_seed(5)
    got = gq_loss(model, X, Y)
    after_auto = torch.rand(3)
    torch.manual_seed(5)
    want = gq_loss(twin, X, Y, method="loop")
    after_loop = torch.rand(3)
    choice = auto_choice(model)
    assert choice is not None and choice.method == "batched" and "jacrev" not in ran
    assert "random numbers" in choice.excluded["jacrev"]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    for g, w in zip(grads(model, got), grads(twin, want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # The probe's draws are not the caller's: the next random numbers are those after loop.
    assert torch.equal(after_auto, after_loop)


def test_many_classes_leave_loop_without_timing(ranking: Callable[..., list[str]]) -> None:
    n = _auto.VMAP_MAX_CLASSES + 1
    model = make_model("mlp_gelu", (2, 3, 3), n)
    ran = ranking("jacrev", "batched")
    gq_loss(model, X, Y)
    choice = auto_choice(model)
    assert choice is not None and choice.method == "loop" and ran == []
    assert f"{n} classes per sample" in choice.excluded["jacrev"]
    # The sampled estimator differentiates 1 + num_sampled classes per sample: timed again.
    gq_loss(model, X, Y, estimator="sampled", num_sampled=3)
    assert auto_choice(model).method == "jacrev"  # type: ignore[union-attr]
    # so does class_gradient_norms with `classes`
    other = make_model("mlp_gelu", (2, 3, 3), n)
    class_gradient_norms(other, X, classes=torch.zeros(4, 2, dtype=torch.long))
    assert auto_choice(other).method == "jacrev"  # type: ignore[union-attr]


def test_chunk_size_is_recompute_and_plain_functions_are_loop(
    ranking: Callable[..., list[str]],
) -> None:
    ran = ranking("jacrev")
    model = make_model("conv_bn", (2, 3, 3), 4)
    GQLoss(chunk_size=2)(model, X, Y)
    assert auto_choice(model).method == "recompute"  # type: ignore[union-attr]

    def plain(x: Tensor) -> Tensor:
        return model(x)

    class_gradient_norms(plain, X)
    assert auto_choice(plain).method == "loop" and ran == []  # type: ignore[union-attr]


class FromStem(nn.Module):
    """A model whose first layer the caller applies (as with text models' input embeddings):
    its inputs carry a graph back to the model's own parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Conv2d(2, 2, 1)
        self.body = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Dropout(0.2),
            nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), Flat(), nn.Linear(27, 4),
        )  # fmt: skip
        self.to(F64).train()
        self.body[5].eval()

    def forward(self, h: Tensor) -> Tensor:
        return self.body(h)


def test_the_probe_leaves_no_trace(ranking: Callable[..., list[str]]) -> None:
    # Train-mode BatchNorm and Dropout, one submodule in eval mode, inputs with a graph to the
    # model's parameters: after the call the model is as after a loop call (statistics moved
    # once, no .grad, modes kept), and the caller's graph still backpropagates.
    model, twin = FromStem(), FromStem()
    ranking("batched", "loop")
    torch.manual_seed(4)
    got = gq_loss(model, model.stem(X), Y)
    torch.manual_seed(4)
    want = gq_loss(twin, twin.stem(X), Y, method="loop")
    assert auto_choice(model).method == "batched"  # type: ignore[union-attr]
    assert [m.training for m in model.modules()] == [m.training for m in twin.modules()]
    assert all(q.grad is None for q in model.parameters())
    for (name, a), b in zip(buffers(model).items(), buffers(twin).values(), strict=True):
        assert torch.equal(a, b), name
    assert int(model.body[1].num_batches_tracked) == 1
    for g, w in zip(grads(model, got), grads(twin, want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert grads(model, gq_loss(model, model.stem(X), Y))[0].abs().sum() > 0  # reaches the stem


def test_choice_is_cached_per_model_and_setup_and_held_weakly(
    ranking: Callable[..., list[str]],
) -> None:
    ran = ranking("jacrev")
    model = make_model("conv_bn", (2, 3, 3), 4)
    assert auto_choice(model) is None
    gq_loss(model, X, Y)
    probed = len(ran)
    gq_loss(model, X, Y)
    assert len(ran) == probed  # same model and set-up: looked up
    with torch.no_grad():  # the value only (no double-backward graph): another set-up
        gq_loss(model, X, Y)
    model.train()  # another mode
    gq_loss(model, X, Y)
    other = make_model("conv_bn", (2, 3, 3), 4)
    gq_loss(other, X, Y)  # another model
    assert len(ran) == 4 * probed
    # The cache does not keep a model alive.
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_new_shapes_are_timed_within_a_budget_then_take_the_nearest_choice(
    ranking: Callable[..., list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dynamic padding gives a new shape every few batches. The fake clock says each step takes
    # 1-1.5 s: the first shape is timed in extra rounds up to PROBE_SECONDS, later shapes in
    # ROUNDS rounds while the set-up's probes took less than SHAPES_SECONDS, then none.
    monkeypatch.setattr(_auto, "PROBE_SECONDS", 20.0)
    monkeypatch.setattr(_auto, "SHAPES_SECONDS", 50.0)
    model = make_model("conv_bn", (2, 3, 3), 4)
    ran = ranking("jacrev")
    gq_loss(model, X, Y)  # a warm-up and 5 timed rounds of 4 fake seconds: 24 s
    assert len(ran) == 3 * (1 + 5)
    ran = ranking("batched")
    gq_loss(model, X[:3], Y[:3])  # 24 s < 50 s: timed, in the fewest rounds (16 s)
    assert len(ran) == 3 * (1 + _auto.ROUNDS)
    assert auto_choice(model).method == "batched"  # type: ignore[union-attr]
    ran = ranking("loop")
    gq_loss(model, X[:1], Y[:1])  # 40 s < 50 s: timed
    assert len(ran) == 3 * (1 + _auto.ROUNDS) and auto_choice(model).method == "loop"  # type: ignore[union-attr]
    ran = ranking("jacrev")
    gq_loss(model, X[:2], Y[:2])  # 56 s: not timed; nearest, (3, ...) and (1, ...): the first
    assert ran == [] and auto_choice(model).method == "batched"  # type: ignore[union-attr]
    gq_loss(model, torch.cat([X, X]), torch.cat([Y, Y]))  # nearest (4, ...): jacrev
    assert ran == [] and auto_choice(model).method == "jacrev"  # type: ignore[union-attr]
    # At most MAX_SHAPES shapes are timed per set-up, whatever the budget.
    monkeypatch.setattr(_auto, "SHAPES_SECONDS", 1e9)
    monkeypatch.setattr(_auto, "MAX_SHAPES", 3)
    gq_loss(model, X[:2], Y[:2])
    assert ran == []


def test_the_cache_records_which_modules_train_and_which_dropout_draws(
    ranking: Callable[..., list[str]],
) -> None:
    # Two models' worth of modes with the same number of training modules are two set-ups; so
    # are a Dropout at p = 0 (draws nothing: jacrev may run) and at p = 0.5 (scheduled dropout).
    torch.manual_seed(1)
    model = nn.Sequential(
        Flat(), nn.Linear(18, 8), nn.BatchNorm1d(8), nn.Dropout(0.0), nn.Tanh(), nn.Linear(8, 4)
    ).to(F64)
    model.train()
    model[2].eval()
    ran = ranking("jacrev")
    gq_loss(model, X, Y)
    probed = len(ran)
    assert auto_choice(model).method == "jacrev"  # type: ignore[union-attr]
    model[2].train()
    model[1].eval()  # as many training modules as before, others
    gq_loss(model, X, Y)
    assert len(ran) == 2 * probed
    model[3].p = 0.5
    gq_loss(model, X, Y)
    choice = auto_choice(model)
    assert choice is not None and choice.method != "jacrev"
    assert "random numbers" in choice.excluded["jacrev"]
    model[3].p = 0.3  # another p that draws: the same set-up
    gq_loss(model, X, Y)
    assert auto_choice(model) is choice


def test_a_model_every_method_refuses_gets_the_usual_error(
    ranking: Callable[..., list[str]],
) -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(18, 4).to(F64)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(FirstOrderTanh.apply(x.flatten(1)))

    ranking("jacrev")
    with pytest.raises(RuntimeError, match=r"@once_differentiable: \['FirstOrderTanh'\]"):
        gq_loss(Model(), X, Y)
    # the value alone needs first derivatives only
    with torch.no_grad():
        assert torch.isfinite(gq_loss(Model(), X, Y))


def test_auto_choice_of_an_unknown_object_is_none() -> None:
    assert auto_choice(nn.Linear(2, 2)) is None
    assert auto_choice(3) is None
    model = nn.Sequential(Flat(), nn.Linear(18, 4)).to(F64)
    F.cross_entropy(model(X), Y)  # a model used without GQ
    assert auto_choice(model) is None


def test_a_hopeless_method_is_not_timed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    fake_seconds = {"loop": 0.01, "batched": 0.025, "jacrev": 0.012}  # fast: ROUNDS rounds

    def fake(step: Callable[[str], None], method: str, device: torch.device) -> float:
        step(method)
        ran.append(method)
        return fake_seconds[method]

    monkeypatch.setattr(_probe, "_measure", fake)
    model = make_model("conv_bn", (2, 3, 3), 4)
    gq_loss(model, X, Y)
    choice = auto_choice(model)
    assert choice is not None and choice.method == "loop"
    assert "more than 2x the fastest" in choice.excluded["batched"]
    assert (
        ran.count("batched") == 2 and ran.count("loop") == ran.count("jacrev") == 1 + _auto.ROUNDS
    )


def test_a_method_that_needs_more_memory_than_is_left_is_left_out(
    ranking: Callable[..., list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The allocator's mark after each warm-up run (loop, batched, jacrev) and the free memory
    # after them, as on CUDA: jacrev took 300 bytes beyond loop with only 100 left free.
    marks = iter([1000, 1050, 1300])
    monkeypatch.setattr(_probe, "_memory_mark", lambda device: next(marks))
    monkeypatch.setattr(_probe, "_memory_free", lambda device: 100)
    ranking("jacrev", "batched", "loop")
    model = make_model("conv_bn", (2, 3, 3), 4)
    gq_loss(model, X, Y)
    choice = auto_choice(model)
    assert choice is not None and choice.method == "batched"
    assert "more than loop" in choice.excluded["jacrev"] and "batched" not in choice.excluded


def test_when_every_other_method_fails_auto_is_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(step: Callable[[str], None], method: str, device: torch.device) -> float:
        if method != "loop":
            raise RuntimeError(f"{method} refused")
        step(method)
        return 1.0

    monkeypatch.setattr(_probe, "_measure", fake)
    model = make_model("conv_bn", (2, 3, 3), 4)
    got = gq_loss(model, X, Y)
    choice = auto_choice(model)
    assert choice is not None and choice.method == "loop" and choice.seconds == {}
    assert choice.excluded == {
        "batched": "failed: RuntimeError: batched refused",
        "jacrev": "failed: RuntimeError: jacrev refused",
    }
    torch.testing.assert_close(got, brute_gq(model, X, Y).mean(), rtol=1e-9, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
def test_torchscript_models_get_loop_without_an_error(ranking: Callable[..., list[str]]) -> None:
    # batched and jacrev refuse TorchScript; auto times only what runs.
    model = torch.jit.script(make_model("mlp_gelu", (2, 3, 3), 4))
    ranking("jacrev", "batched")
    got = gq_loss(model, X, Y)
    choice = auto_choice(model)
    assert choice is not None and choice.method == "loop"
    assert all("TorchScript" in choice.excluded[m] for m in ("batched", "jacrev"))
    torch.testing.assert_close(got, brute_gq(model, X, Y).mean(), rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- the CE + GQ loop


class PositionIds(nn.Module):
    """A text model with Hugging Face's `position_ids` buffer (an index the embedding saves)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("position_ids", torch.arange(6).expand((1, -1)), persistent=False)
        self.positions, self.head = nn.Embedding(6, 3), nn.Linear(3, 4)

    def forward(self, h: Tensor) -> Tensor:
        length = h.shape[1]
        hidden = torch.tanh(h + self.positions(self.position_ids[:, :length]))
        return self.head(hidden.mean(dim=1))


class LogitScale(nn.Module):
    """A fixed logit scale held as a buffer (the product saves it for backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.7))
        self.body = nn.Sequential(Flat(), nn.Linear(18, 6), nn.Tanh(), nn.Linear(6, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) * self.scale


def ce_loop_model(kind: str) -> tuple[nn.Module, Tensor]:
    """A train-mode float64 model with buffers and a batch for it."""
    torch.manual_seed(6)
    if kind == "batchnorm":
        model, x = make_model("conv_bn", (2, 3, 3), 4), X
    elif kind == "position_ids":
        model, x = PositionIds(), torch.randn(4, 5, 3, dtype=F64)
    else:
        model, x = LogitScale(), X
    return model.to(F64).train(), x


def gq_oracle(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean Eq. 7 from the batch-sum norms of a float64 loop written out (`_oracles`)."""
    n = batch_sum_norms(model, x)
    target = n.gather(1, y[:, None]).squeeze(1)
    return (target / (n.sum(dim=1) - target + 1e-12)).mean()


@pytest.mark.parametrize("kind", ["batchnorm", "position_ids", "logit_scale"])
@pytest.mark.parametrize(
    "method",
    ["loop", "batched", "jacrev", "recompute", "auto=loop", "auto=batched", "auto=jacrev"],
)
def test_every_method_runs_the_ce_plus_gq_loop(
    ranking: Callable[..., list[str]], kind: str, method: str
) -> None:
    # loss = CE(model(x), y) + lam * GQ(model, x, y): the cross-entropy graph saved buffers (the
    # running mean, position_ids, the scale) before GQ's forward ran; GQ must leave it valid and
    # move the buffers as one more forward pass does.
    model, x = ce_loop_model(kind)
    twin = copy.deepcopy(model)
    forced = method.removeprefix("auto=")
    if method.startswith("auto="):
        ranking(forced)
    loss = F.cross_entropy(model(x), Y) + 0.5 * GQLoss(method=method.partition("=")[0])(model, x, Y)
    loss.backward()
    if method.startswith("auto="):
        assert auto_choice(model).method == forced  # type: ignore[union-attr]
    want = F.cross_entropy(twin(x), Y) + 0.5 * gq_oracle(twin, x, Y)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)
    for (name, q), w in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, w.grad, rtol=1e-9, atol=1e-12, msg=name)
    for (name, a), b in zip(buffers(model).items(), buffers(twin).values(), strict=True):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- TorchScript functions


def _bent(h: Tensor) -> Tensor:
    return torch.tanh(h) + 0.5 * h * h


with warnings.catch_warnings():  # torch.jit is deprecated
    warnings.simplefilter("ignore", DeprecationWarning)
    _scripted_bent = torch.jit.script(_bent)


class ScriptedActivation(nn.Module):
    """Calls a @torch.jit.script *function* (no ScriptModule anywhere), or its Python original
    (`scripted=False`: the brute-force twin)."""

    def __init__(self, scripted: bool = True) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.a, self.b = nn.Linear(18, 5), nn.Linear(5, 4)
        self.scripted = scripted
        self.to(F64)

    def forward(self, x: Tensor) -> Tensor:
        bent = _scripted_bent if self.scripted else _bent
        return self.b(bent(self.a(x.flatten(1))))


def _warm_scripted() -> None:
    """The TorchScript executor records its one-node graph from a function's second call on."""
    for _ in range(3):
        _scripted_bent(torch.randn(2, 5, dtype=F64, requires_grad=True)).sum().backward()


@pytest.mark.parametrize("method", ["batched", "jacrev"])
def test_vmapped_methods_refuse_torchscript_functions(method: str) -> None:
    _warm_scripted()
    with pytest.raises(TypeError, match=rf"method='{method}' cannot run .* TorchScript .*'loop'"):
        gq_loss(ScriptedActivation(), X, Y, method=method)


@pytest.mark.parametrize("method", ["loop", "recompute", "auto"])
def test_torchscript_functions_are_exact_with_loop_recompute_and_auto(method: str) -> None:
    _warm_scripted()
    model, twin = ScriptedActivation(), ScriptedActivation(scripted=False)
    got = gq_loss(model, X, Y, method=method)
    want = brute_gq(twin, X, Y).mean()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    for g, w in zip(grads(model, got), grads(twin, want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    if method == "auto":
        choice = auto_choice(model)
        assert choice is not None and choice.method == "loop"
        assert all("TorchScript" in choice.excluded[m] for m in ("batched", "jacrev"))


@pytest.mark.parametrize("chosen", ["batched", "jacrev"])
def test_a_cached_vmapped_choice_that_meets_torchscript_falls_back_to_loop(
    ranking: Callable[..., list[str]], chosen: str
) -> None:
    # The choice was made while the model ran no TorchScript; a later call of the same set-up
    # that does is run by loop (exactly), and auto_choice says why.
    _warm_scripted()
    model, twin = ScriptedActivation(scripted=False), ScriptedActivation(scripted=False)
    ranking(chosen)
    gq_loss(model, X, Y)
    assert auto_choice(model).method == chosen  # type: ignore[union-attr]
    model.scripted = True
    got = gq_loss(model, X, Y)
    choice = auto_choice(model)
    assert (
        choice is not None and choice.method == "loop" and "TorchScript" in choice.excluded[chosen]
    )
    want = brute_gq(twin, X, Y).mean()
    for g, w in zip(grads(model, got), grads(twin, want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    gq_loss(model, X, Y)  # later calls: loop from the start
    assert auto_choice(model).method == "loop"  # type: ignore[union-attr]


def test_the_probe_leaves_out_a_method_that_disagrees_with_loop(
    ranking: Callable[..., list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second line of defence: with the TorchScript check switched off, jacrev runs this
    # model and comes back with a wrong parameter gradient (two of four parameters get none);
    # the probe checks every run against loop's on the probe batch and leaves it out, so auto
    # stays exact.
    _warm_scripted()
    monkeypatch.setattr(_backends, "torchscript_nodes", lambda graph: [])
    ran = ranking("jacrev", "loop")
    model, twin = ScriptedActivation(), ScriptedActivation(scripted=False)
    got = gq_loss(model, X, Y)
    choice = auto_choice(model)
    assert choice is not None and choice.method == "loop" and ran.count("jacrev") == 1
    assert choice.excluded["jacrev"].startswith(
        "disagreed with loop on the probe batch (relative error of the parameter gradient"
    )
    want = brute_gq(twin, X, Y).mean()
    for g, w in zip(grads(model, got), grads(twin, want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- the probe's traces


class OwnNoise(nn.Module):
    """Train-mode noise drawn from the model's own generator."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.generator = torch.Generator().manual_seed(11)
        self.body, self.head = nn.Linear(18, 6), nn.Linear(6, 4)
        self.to(F64).train()

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x.flatten(1))
        noise = torch.randn(h.shape, generator=self.generator, dtype=h.dtype)
        return self.head(torch.tanh(h + 0.3 * noise))


def test_the_probe_leaves_the_models_own_generator_where_it_was(
    ranking: Callable[..., list[str]],
) -> None:
    model, twin = OwnNoise(), OwnNoise()
    ranking("jacrev", "batched", "loop")
    got = gq_loss(model, X, Y)
    choice = auto_choice(model)
    assert choice is not None and choice.method == "batched"
    assert "random numbers" in choice.excluded["jacrev"]
    assert torch.equal(model.generator.get_state(), _advanced(OwnNoise().generator, 24))
    want = gq_oracle(twin, X, Y)  # one forward pass, the same draws
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    for g, w in zip(grads(model, got), grads(twin, want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert torch.equal(model.generator.get_state(), twin.generator.get_state())


def _advanced(generator: torch.Generator, count: int) -> Tensor:
    torch.randn(count, generator=generator, dtype=F64)
    return generator.get_state()


def lazy_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        Flat(),
        nn.LazyLinear(6, dtype=F64),
        nn.LazyBatchNorm1d(dtype=F64),
        nn.Tanh(),
        nn.Linear(6, 4, dtype=F64),
    ).train()


def test_lazy_modules_run_loop_first_and_the_rng_is_as_after_loop(
    ranking: Callable[..., list[str]],
) -> None:
    # The probe would initialise LazyLinear (drawing its weights from the RNG) and cannot copy
    # LazyBatchNorm1d's uninitialised buffers: the first call is loop, untimed, and the next
    # one (initialised) is timed.
    model, twin = lazy_model(), lazy_model()
    ran = ranking("jacrev")
    torch.manual_seed(5)
    got = gq_loss(model, X, Y)
    after = torch.rand(3)
    choice = auto_choice(model)
    assert choice is not None and choice.method == "loop" and ran == []
    assert "lazy modules" in choice.excluded["jacrev"]
    torch.manual_seed(5)
    twin(X)  # initialises it, as the call did
    assert torch.equal(after, torch.rand(3))
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    want = gq_oracle(twin, X, Y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    for g, w in zip(grads(model, got), grads(twin, want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    gq_loss(model, X, Y)
    assert ran and auto_choice(model).method == "jacrev"  # type: ignore[union-attr]


def adapted_head(model: nn.Module) -> Tensor:
    """One MAML-style inner step on the head only (ANIL): the head's parameters become
    `w - 0.1 * grad`, tensors with a graph back to every parameter; returns the inner loss."""
    inner = F.cross_entropy(model(X), Y)
    head = model[3]
    names = list(head._parameters)
    steps = torch.autograd.grad(inner, [head._parameters[n] for n in names], create_graph=True)
    for name, step in zip(names, steps, strict=True):
        head._parameters[name] = head._parameters[name] - 0.1 * step
    return inner


def test_fast_weights_run_loop_and_keep_the_callers_graph(
    ranking: Callable[..., list[str]],
) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(Flat(), nn.Linear(18, 6), nn.Tanh(), nn.Linear(6, 4)).to(F64)
    twin = copy.deepcopy(model)
    leaves, twin_leaves = list(model.parameters()), list(twin.parameters())
    ran = ranking("jacrev")
    adapted_head(model)
    outer = F.cross_entropy(model(X), Y) + gq_loss(model, X, Y)
    outer.backward()  # needs the inner step's graph
    choice = auto_choice(model)
    assert choice is not None and choice.method == "loop" and ran == []
    assert "fast weights" in choice.excluded["jacrev"]
    adapted_head(twin)
    (F.cross_entropy(twin(X), Y) + brute_gq(twin, X, Y).mean()).backward()
    for a, b in zip(leaves, twin_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_each_probe_is_logged_once_with_the_choice_and_its_time(
    ranking: Callable[..., list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    model = make_model("conv_bn", (2, 3, 3), 4)
    ranking("batched")
    with caplog.at_level(logging.INFO, logger="gq_loss"):
        gq_loss(model, X, Y)
        gq_loss(model, X, Y)  # looked up: not logged again
        gq_loss(model, X, Y, method="loop")  # an explicit method: no probe
    (record,) = caplog.records
    assert record.name == "gq_loss" and record.levelno == logging.INFO
    message = record.getMessage()
    assert "chose 'batched' for Sequential with inputs (4, 2, 3, 3) in " in message
    assert "batched 1e+03 ms" in message and "explicit method" in message
