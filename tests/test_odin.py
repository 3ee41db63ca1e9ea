from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from _models import mlp
from _plain_odin import plain_odin
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gq_loss import NotFittedError, odin_perturb, odin_score
from gq_loss.metrics import ood_metrics
from gq_loss.odin import ODINDetector
from gq_loss.scores import msp_score

STD = (0.5, 0.25, 2.0)


class ZeroGradNet(nn.Module):
    """Coordinates 0-5 pass through tanh; 6-11 only through ``relu(-x)``.

    Where ``x_k > 0`` (k >= 6) the input gradient is exactly zero, yet a step down by more than
    ``x_k`` changes the output: the two zero-gradient conventions give different scores.
    """

    def __init__(self) -> None:
        super().__init__()
        self.smooth = nn.Linear(6, 5)
        self.kinked = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return self.smooth(torch.tanh(flat[:, :6])) + 3 * self.kinked(torch.relu(-flat[:, 6:]))


class Bump(nn.Module):
    """Logits ``[5 exp(-1e5 (x - 0.005)^2), 0]`` of a scalar input: a single peak at 0.005."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = 5 * torch.exp(-1e5 * (x[:, 0] - 0.005) ** 2)
        return torch.stack([h, torch.zeros_like(h)], dim=1)


def conv_bn() -> nn.Module:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), bn, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 5)
    )
    return model.double()


def zero_grad_inputs(batch: int, steps: torch.Tensor) -> torch.Tensor:
    """Inputs (B, 3, 2, 2) whose kinked coordinates are dead but within half a step of the kink."""
    x = torch.randn(batch, 3, 2, 2, dtype=torch.float64)
    flat = x.view(batch, 12)
    channel = torch.arange(12) // 4
    dead = torch.tensor([6, 8, 10])
    flat[:, dead] = 0.5 * steps[channel[dead]]
    flat[:, [7, 9, 11]] = -0.5
    return x


MODELS = {"mlp": mlp, "conv_bn": conv_bn, "zero_grad": lambda: ZeroGradNet().double()}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("sign_of_zero", [0, 1])
@pytest.mark.parametrize("input_std", [None, STD])
@pytest.mark.parametrize("clamp", [None, (-0.8, (0.9, 1.0, 0.7))])
@pytest.mark.parametrize("temperature", [1.0, 1000.0])
def test_matches_plain_reference(name, sign_of_zero, input_std, clamp, temperature):
    model = MODELS[name]().eval()
    epsilon = 0.02
    steps = epsilon / torch.tensor(input_std or (1.0, 1.0, 1.0), dtype=torch.float64)
    x = zero_grad_inputs(6, steps) if name == "zero_grad" else torch.randn(6, 3, 2, 2).double()
    settings = dict(
        temperature=temperature,
        epsilon=epsilon,
        input_std=input_std,
        sign_of_zero=sign_of_zero,
        clamp=clamp,
    )
    expected, expected_x = plain_odin(model, x, **settings)
    detector = ODINDetector(model, **settings)
    torch.testing.assert_close(detector.score(x), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(detector.perturb(x), expected_x, rtol=0, atol=1e-15)
    clean, _ = plain_odin(model, x, **{**settings, "epsilon": 0.0, "clamp": None})
    assert (expected - clean).abs().max() > 1e-9  # the step matters in every case


def test_zero_gradient_conventions():
    model = ZeroGradNet().double().eval()
    epsilon = 0.02
    steps = epsilon / torch.tensor(STD, dtype=torch.float64)
    x = zero_grad_inputs(4, steps)
    per_coordinate = steps.repeat_interleave(4)  # channel of flat coordinate k is k // 4
    dead = torch.tensor([6, 8, 10])
    moved = {}
    for sign_of_zero in (0, 1):
        detector = ODINDetector(model, epsilon=epsilon, input_std=STD, sign_of_zero=sign_of_zero)
        delta = (detector.perturb(x) - x).view(4, 12)
        # Every other coordinate has a non-zero gradient and moves by exactly one step.
        alive = torch.ones(12, dtype=torch.bool)
        alive[dead] = False
        torch.testing.assert_close(delta[:, alive].abs(), per_coordinate[alive].expand(4, -1))
        moved[sign_of_zero] = delta[:, dead]
    assert (moved[0] == 0).all()  # torch.sign: no step
    # original code: (grad >= 0) * 2 - 1 = +1 for a zero gradient, and x̃ = x - eps * (+1) / std
    torch.testing.assert_close(moved[1], -per_coordinate[dead].expand(4, -1))
    s0 = ODINDetector(model, epsilon=epsilon, input_std=STD, sign_of_zero=0).score(x)
    s1 = ODINDetector(model, epsilon=epsilon, input_std=STD, sign_of_zero=1).score(x)
    assert (s0 - s1).abs().min() > 1e-6


@pytest.mark.parametrize("temperature", [1.0, 3.0, 1000.0])
def test_epsilon_zero_is_temperature_scaled_max_softmax(temperature):
    model = conv_bn().eval()
    x = torch.randn(7, 3, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        probs = torch.exp(model(x) / temperature)
        expected = (probs / probs.sum(1, keepdim=True)).max(1).values
    detector = ODINDetector(model, temperature=temperature, epsilon=0.0)
    torch.testing.assert_close(detector.score(x), expected, rtol=1e-13, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(detector.score(x), msp_score(model(x), temperature=temperature))
    # through the perturbed-forward path (a clamp that changes nothing)
    detector = ODINDetector(model, temperature=temperature, epsilon=0.0, clamp=(-100.0, 100.0))
    torch.testing.assert_close(detector.score(x), expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 1000.0])
@pytest.mark.parametrize("input_std", [None, STD])
def test_step_raises_predicted_class_log_softmax(temperature, input_std):
    model = mlp().eval()
    x = torch.randn(16, 3, 2, 2, dtype=torch.float64)
    detector = ODINDetector(model, temperature=temperature, epsilon=1e-4, input_std=input_std)
    with torch.no_grad():
        clean = torch.log_softmax(model(x) / temperature, 1)
        y_hat = model(x).argmax(1, keepdim=True)
        stepped = torch.log_softmax(model(detector.perturb(x)) / temperature, 1)
    assert (stepped.gather(1, y_hat) > clean.gather(1, y_hat)).all()


def test_each_batch_is_placed_once(monkeypatch):
    """ODIN places a batch once (`_runtime.place_inputs`: the copy it differentiates); the
    perturbed inputs and the logits reuse that placement (it used to place each batch 4 times)."""
    import gq_loss._runtime as runtime
    import gq_loss.functional as functional

    calls = []
    place = runtime.place_inputs

    def counted(model, inputs):
        calls.append(tuple(inputs.shape))
        return place(model, inputs)

    monkeypatch.setattr(runtime, "place_inputs", counted)
    monkeypatch.setattr(functional, "place_inputs", counted)
    model, x = conv_bn(), torch.rand(6, 3, 2, 2, dtype=torch.float64)
    want = odin_score(model, x, temperature=10.0, epsilon=0.01, clamp=(0.0, 1.0))
    assert calls == [(6, 3, 2, 2)]
    calls.clear()
    detector = ODINDetector(model, temperature=10.0, epsilon=0.01, clamp=(0.0, 1.0), batch_size=4)
    assert torch.equal(
        detector.score(x)[:4],
        odin_score(model, x[:4], temperature=10.0, epsilon=0.01, clamp=(0.0, 1.0)),
    )
    assert calls == [(4, 3, 2, 2), (2, 3, 2, 2), (4, 3, 2, 2)]  # one per batch, and one per call
    torch.testing.assert_close(detector.score(x), want, rtol=1e-12, atol=1e-12)


def test_no_side_effects_on_model_or_input():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).double()
    model.train()
    model[1].eval()  # a mixed-mode model keeps every module's own flag
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    x_before = x.detach().clone()
    first = ODINDetector(model).score(x)
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert x.requires_grad and x.grad is None and x.grad_fn is None
    assert torch.equal(x.detach(), x_before)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # eval mode: BatchNorm statistics untouched
    torch.testing.assert_close(ODINDetector(model).score(x), first, rtol=0, atol=0)  # no dropout
    assert not first.requires_grad


def test_mode_restored_after_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Unflatten(1, (5, 1))).double().train()
    with pytest.raises(ValueError, match="shape"):
        ODINDetector(model).score(torch.randn(2, 3, 2, 2, dtype=torch.float64))
    assert all(m.training for m in model.modules())


def test_works_under_no_grad_and_inference_mode():
    model = conv_bn().eval()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    detector = ODINDetector(model, temperature=1000.0, epsilon=0.01)
    expected = detector.score(x)
    assert (expected - ODINDetector(model, epsilon=0.0).score(x)).abs().max() > 1e-8
    with torch.no_grad():
        torch.testing.assert_close(detector.score(x), expected, rtol=0, atol=0)
    with torch.inference_mode():
        x_inference = x.clone()  # an inference tensor
        torch.testing.assert_close(detector.score(x_inference), expected, rtol=0, atol=0)
        torch.testing.assert_close(detector.perturb(x_inference), detector.perturb(x))


def test_bf16_autocast_on_cpu_still_perturbs():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
    ).eval()
    with torch.no_grad():
        model[3].weight.mul_(100)  # logits of a trained net's size, so the step shows in float32
    x = torch.rand(8, 3, 4, 4)
    detector = ODINDetector(model, temperature=1000.0, epsilon=0.001)
    float32 = detector.score(x)
    clean = ODINDetector(model, temperature=1000.0, epsilon=0.0).score(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # autocast is really active here
        mixed = detector.score(x)
    assert mixed.dtype == torch.float64  # the final softmax is float64
    torch.testing.assert_close(mixed, float32, rtol=1e-6, atol=0)
    assert (mixed - clean > 2e-6).all()  # the step raised every score (by about 8e-6)
    reference = ODINDetector(model.double(), temperature=1000.0, epsilon=0.001).score(x.double())
    torch.testing.assert_close(
        mixed.double() - clean.double(), reference - clean.double(), rtol=0, atol=5e-8
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_step_on_half_precision_inputs_is_refused(dtype):
    """On half-precision inputs ``x - ε·sign(g)`` rounds back to ``x``: ODIN would silently be
    max-softmax. A step is refused with the dtype's resolution and the fix; ε = 0 still works."""
    name = str(dtype).removeprefix("torch.")
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).eval()
    half = copy.deepcopy(model).to(dtype)
    x = 4 + 4 * torch.rand(16, 12)  # in [4, 8): a float16 step of 0.001 rounds away too
    assert torch.equal(x.to(dtype) - 0.001, x.to(dtype))  # the defect is real for these inputs
    message = rf"ODIN cannot take its step of epsilon=0\.001 on {name} inputs .* {name} numbers"
    fix = r"`model\.float\(\)`.*torch\.autocast"
    for call in (
        lambda: odin_score(half, x),
        lambda: odin_perturb(half, x),
        lambda: ODINDetector(half).score(x),
        lambda: ODINDetector(half).calibrate(x),
        lambda: ODINDetector(half, epsilon=0.0).tune(x, x, epsilons=(0.0, 0.001)),
    ):
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert info.match(fix)
        assert all(not m.training for m in half.modules())  # the mode it came in
    with pytest.raises(ValueError, match=rf"on {name} inputs \(as passed.*pass float32 inputs"):
        odin_score(lambda t: half(t), x.to(dtype))
    # epsilon = 0 takes no step: temperature-scaled max-softmax of the half-precision logits
    with torch.no_grad():
        expected = msp_score(half(x.to(dtype)), temperature=1000.0)
    assert torch.equal(odin_score(half, x, epsilon=0.0), expected)
    # the fix the message names: float32 weights; ODIN ignores autocast and steps in float32
    with torch.autocast("cpu", dtype=dtype):
        mixed = odin_score(model, x)
    assert torch.equal(mixed, odin_score(model, x))
    assert (mixed - odin_score(model, x, epsilon=0.0)).abs().min() > 0  # the step counts


def test_data_loaders_tensors_and_chunks_agree():
    model = mlp().eval()
    x = torch.randn(10, 3, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 5, (10,))
    expected = ODINDetector(model).score(x)
    for data in (
        DataLoader(TensorDataset(x), batch_size=3),  # batches are [x]
        DataLoader(TensorDataset(x, y), batch_size=4),  # batches are [x, y]
        [x[:6], x[6:]],
        ((x[:2], y[:2]), (x[2:2], y[2:2]), (x[2:], y[2:])),  # an empty batch is skipped
    ):
        got = ODINDetector(model).score(data)
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(ODINDetector(model, batch_size=3).score(x), expected)
    if importlib.util.find_spec("tqdm") is not None:  # an optional extra
        torch.testing.assert_close(ODINDetector(model, progress=True).score(x), expected)
    empty = ODINDetector(model).score(x[:0])
    assert empty.shape == (0,) and empty.dtype == torch.float64
    assert ODINDetector(model, ood_label=7).calibrate(x).predict(x[:0]).shape == (0,)
    # inputs are moved to the model's dtype
    torch.testing.assert_close(
        ODINDetector(model).score(x.float()), ODINDetector(model).score(x.float().double())
    )


def test_progress_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        ODINDetector(mlp(), progress=True).score(torch.randn(2, 12, dtype=torch.float64))


@pytest.mark.parametrize(("n", "tpr"), [(101, 0.95), (101, 0.5), (10, 0.7), (37, 1.0), (50, 0.01)])
def test_calibrate_accepts_target_share(n, tpr):
    model = mlp()
    x = torch.randn(n, 3, 2, 2, dtype=torch.float64)
    detector = ODINDetector(model, temperature=10.0, epsilon=0.01).calibrate(x, tpr=tpr)
    accepted = (detector.score(x) >= detector.threshold_).double().mean().item()
    assert tpr <= accepted < tpr + 1 / n


def test_predict():
    model = mlp()
    x = torch.randn(40, 3, 2, 2, dtype=torch.float64)
    detector = ODINDetector(model, temperature=10.0, epsilon=0.01, ood_label=99)
    with pytest.raises(NotFittedError, match=r"calibrate\(id_data\)"):
        detector.predict(x)
    detector.calibrate(x, tpr=0.5)
    scores = detector.score(x)
    predicted = detector.predict(x)
    with torch.no_grad():
        classes = model(x).argmax(1)
    expected = torch.where(scores >= detector.threshold_, classes, torch.tensor(99))
    assert predicted.dtype == torch.long
    assert torch.equal(predicted, expected)
    assert (predicted == 99).sum() == 20
    assert torch.equal(detector.predict(DataLoader(TensorDataset(x), batch_size=7)), expected)


def bump_data() -> tuple[torch.Tensor, torch.Tensor]:
    """ID near 0 (step +eps towards the peak), OOD near -0.001 (step +eps) and 0.008 (step -eps).

    ID beats the OOD cluster at -0.001 only for eps < 0.0055 and the one at 0.008 only for
    eps > 0.004: of the default grid, only eps = 0.005 separates them, at every temperature.
    """
    jitter = lambda n: (torch.rand(n, 1, dtype=torch.float64) - 0.5) * 2e-5  # noqa: E731
    ood = torch.cat([-0.001 + jitter(20), 0.008 + jitter(20)])
    return jitter(40), ood


def test_tune_finds_the_separating_epsilon():
    id_x, ood_x = bump_data()
    detector = ODINDetector(Bump()).calibrate(id_x)
    assert detector.tune(id_x, ood_x) is detector
    assert detector.epsilon == 0.005
    assert detector.temperature == 1.0  # all temperatures tie; the first grid point wins
    assert detector.threshold_ is None
    perfect = [
        (r["temperature"], r["epsilon"]) for r in detector.tuning_results_ if r["fpr95"] == 0
    ]
    assert perfect == [(t, 0.005) for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)]
    assert len(detector.tuning_results_) == 110
    detector.tune(id_x, ood_x, temperatures=(1000.0,), criterion="auroc")
    assert (detector.temperature, detector.epsilon) == (1000.0, 0.005)


def test_tune_id_only_maximises_mean_id_score():
    id_x, _ = bump_data()
    detector = ODINDetector(Bump(), temperature=1000.0, epsilon=0.0).tune(id_x)
    assert (detector.temperature, detector.epsilon) == (1000.0, 0.005)
    means = [r["mean_id_score"] for r in detector.tuning_results_]
    for r, eps in zip(
        detector.tuning_results_,
        (0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005, 0.01, 0.05, 0.1, 0.2),
        strict=True,
    ):
        assert r["epsilon"] == eps
        expected = ODINDetector(Bump(), temperature=1000.0, epsilon=eps).score(id_x).mean()
        torch.testing.assert_close(torch.tensor(r["mean_id_score"], dtype=torch.float64), expected)
    assert means.index(max(means)) == 6


@pytest.mark.parametrize("criterion", ["fpr95", "auroc"])
def test_tune_matches_brute_force(criterion):
    model = conv_bn()
    id_x = torch.randn(30, 3, 2, 2, dtype=torch.float64) * 0.5
    ood_x = torch.randn(25, 3, 2, 2, dtype=torch.float64) * 2.0
    temps, epss = (1.0, 10.0, 1000.0), (0.0, 0.01, 0.3)
    detector = ODINDetector(model, batch_size=8)
    detector.tune(id_x, ood_x, temperatures=temps, epsilons=epss, criterion=criterion)
    rows = []
    for t in temps:
        for e in epss:
            plain = ODINDetector(model, temperature=t, epsilon=e)
            rows.append({"temperature": t, "epsilon": e, **ood_metrics(plain(id_x), plain(ood_x))})
    assert len(detector.tuning_results_) == len(rows)
    for got, want in zip(detector.tuning_results_, rows, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-12), key
    better = max if criterion == "auroc" else min
    values = {(r["temperature"], r["epsilon"]): r[criterion] for r in rows}
    assert values[(detector.temperature, detector.epsilon)] == better(values.values())


def test_validation():
    model = mlp()
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    cases = [
        (dict(temperature=0.0), ValueError, r"`temperature` must be finite and > 0, got 0.0"),
        (dict(temperature=-1), ValueError, "`temperature`"),
        (dict(temperature=float("inf")), ValueError, "`temperature`"),
        (dict(temperature="1"), TypeError, "`temperature` must be a real number"),
        (dict(epsilon=-0.1), ValueError, r"`epsilon` must be finite and >= 0, got -0.1"),
        (dict(epsilon=True), TypeError, "`epsilon`"),
        (dict(input_std=(1.0, 0.0, 1.0)), ValueError, "`input_std` must hold one or more positive"),
        (dict(input_std=()), ValueError, "`input_std`"),
        (dict(input_std="abc"), TypeError, "`input_std` must be a float"),
        (dict(sign_of_zero=-1), ValueError, r"`sign_of_zero` must be one of \(0, 1\), got -1"),
        (dict(clamp=0.5), TypeError, r"`clamp` must be a pair"),
        (dict(clamp=(1.0, 0.0)), ValueError, "lo < hi"),
        (dict(clamp=((0.0, 0.0), (1.0, 1.0, 1.0))), ValueError, "matching lengths"),
        (dict(ood_label=0.5), TypeError, "`ood_label` must be an int"),
        (dict(batch_size=0), ValueError, "`batch_size` must be >= 1, got 0"),
        (dict(batch_size=2.0), TypeError, "`batch_size` must be an int or None"),
        (dict(progress="yes"), TypeError, "`progress` must be a bool"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            ODINDetector(model, **kwargs)
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module or a callable"):
        ODINDetector(3)
    detector = ODINDetector(model)
    with pytest.raises(ValueError, match="`temperature`"):
        detector.temperature = 0
    with pytest.raises(ValueError, match="`epsilon`"):
        detector.epsilon = -1e-3
    with pytest.raises(
        ValueError, match=r"`input_std` has 2 values but the input has shape \(3, 3, 2, 2\)"
    ):
        ODINDetector(model, input_std=(1.0, 2.0)).score(x)
    with pytest.raises(ValueError, match="`clamp` has 2 values"):
        ODINDetector(model, clamp=(-1.0, (1.0, 2.0))).score(x)
    with pytest.raises(TypeError, match="`inputs` must be a tensor"):
        detector.score(3)
    with pytest.raises(TypeError, match="`inputs` must be a tensor"):
        detector.score("abc")
    with pytest.raises(TypeError, match="`inputs` batches must be tensors, got str"):
        detector.score([("a", 1)])
    with pytest.raises(TypeError, match="`inputs` must be a floating tensor"):
        detector.score(torch.ones(3, 12, dtype=torch.long))
    with pytest.raises(
        ValueError,
        match=r"`inputs` must have shape \(B, \.\.\.\) with at least 1 dimension, got \(\)",
    ):
        detector.score(torch.tensor(1.0))
    with pytest.raises(ValueError, match="`inputs` yielded no samples"):
        detector.score([])
    with pytest.raises(TypeError, match="`inputs` must be a tensor"):
        detector.perturb([x])
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Unflatten(1, (5, 1))).double()
    with pytest.raises(ValueError, match=r"output must be floating-point logits of shape \(B, N\)"):
        ODINDetector(wrong).score(x)
    detached = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Identity()).double()
    detached[2].forward = lambda t: t.detach()
    with pytest.raises(ValueError, match="does not require grad"):
        ODINDetector(detached).score(x)
    for tpr in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"`tpr` must"):
            detector.calibrate(x, tpr=tpr)
    with pytest.raises(ValueError, match="`id_data` contains no samples"):
        detector.calibrate(x[:0])
    with pytest.raises(ValueError, match="`id_data` yielded no samples"):
        detector.calibrate([])
    with pytest.raises(ValueError, match="`criterion` must be one of"):
        detector.tune(x, x, criterion="aupr")
    with pytest.raises(ValueError, match="`criterion` 'fpr95' needs `ood_data`"):
        detector.tune(x, criterion="fpr95")
    with pytest.raises(ValueError, match="ID-only tuning takes one temperature"):
        detector.tune(x, temperatures=(1.0, 10.0))
    with pytest.raises(ValueError, match="`epsilons` must not be empty"):
        detector.tune(x, epsilons=())
    with pytest.raises(ValueError, match="`temperatures` must be finite and > 0"):
        detector.tune(x, x, temperatures=(1.0, 0.0))
    with pytest.raises(TypeError, match="`epsilons` must be a sequence"):
        detector.tune(x, epsilons="0.1")
    with pytest.raises(ValueError, match="`ood_data` contains no samples"):
        detector.tune(x, x[:0], temperatures=(1.0,), epsilons=(0.0,))


@pytest.mark.cuda
def test_cuda_fp16_autocast_and_devices():
    cpu_model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
    ).eval()
    with torch.no_grad():
        cpu_model[3].weight.mul_(100)
    model = copy.deepcopy(cpu_model).cuda()
    x = torch.rand(8, 3, 4, 4)
    expected = ODINDetector(cpu_model).score(x)
    clean = ODINDetector(cpu_model, epsilon=0.0).score(x)
    detector = ODINDetector(model)
    from_cpu = detector.score(x)  # CPU input, CUDA model: scores come back on the CPU
    assert from_cpu.device.type == "cpu"
    torch.testing.assert_close(from_cpu, expected, rtol=0, atol=1e-6)
    with torch.autocast("cuda", dtype=torch.float16):
        on_cuda = detector.score(x.cuda())
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), expected, rtol=0, atol=1e-6)
    assert (on_cuda.cpu() - clean > 2e-6).all()
    loader = DataLoader(TensorDataset(x, torch.zeros(8)), batch_size=3)
    torch.testing.assert_close(detector.score(loader), expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- the unit of epsilon


class Normalize(nn.Module):
    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def test_epsilon_is_in_pixel_units_in_both_input_conventions():
    """A model that normalises inside takes [0, 1] pixels: ε is already in pixel units and
    `input_std` must not be passed. `input_std` is for inputs fed already normalised: the step
    ε / σ_c in their units is ε in pixel units. Both give the same perturbed image."""
    torch.manual_seed(0)
    mean, std = (0.49, 0.48, 0.45), (0.247, 0.243, 0.261)
    net = conv_bn().eval()
    inside = nn.Sequential(Normalize(mean, std), net).eval()
    pixels = torch.rand(5, 3, 2, 2, dtype=torch.float64)
    epsilon = 0.001
    # 1. normalisation inside the model, [0, 1] pixels in: no input_std
    step_pixels = odin_perturb(inside, pixels, epsilon=epsilon) - pixels
    for c in range(3):
        torch.testing.assert_close(
            step_pixels[:, c].abs(), torch.full_like(step_pixels[:, c], epsilon), rtol=1e-9, atol=0
        )
    # 2. normalised inputs fed to the model: input_std brings ε back to pixel units
    normed = (pixels - inside[0].mean) / inside[0].std
    stepped = odin_perturb(net, normed, epsilon=epsilon, input_std=std)
    step_from_normed = (stepped - normed) * inside[0].std  # in pixel units
    torch.testing.assert_close(step_from_normed, step_pixels, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(
        odin_score(net, normed, epsilon=epsilon, input_std=std),
        odin_score(inside, pixels, epsilon=epsilon),
        rtol=1e-12,
        atol=0,
    )
    # the trap the docs used to set: input_std on a model fed pixels steps by ε / σ (≈ 4ε)
    wrong = odin_perturb(inside, pixels, epsilon=epsilon, input_std=std) - pixels
    for c in range(3):
        torch.testing.assert_close(
            wrong[:, c].abs().max().item(), epsilon / std[c], rtol=1e-9, atol=0
        )


def test_docs_say_input_std_is_only_for_inputs_fed_normalised():
    import pathlib

    import gq_loss
    from gq_loss import functional

    ood = (pathlib.Path(__file__).parents[1] / "docs" / "ood.md").read_text()
    assert "normalises its input inside (or you feed it normalised tensors), pass" not in ood
    assert "only for inputs fed already normalised" in " ".join(ood.split())
    for doc in (
        functional.__doc__,
        gq_loss.odin_perturb.__doc__,
        gq_loss.ODINDetector.__doc__,
    ):
        assert "already normalised" in " ".join((doc or "").split())
