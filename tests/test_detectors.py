"""The detector protocol shared by ODIN, MSP, energy and Mahalanobis, the functional ODIN core,
and the rules every detector follows: non-finite scores, model outputs, dtype, N >= 2."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gq_loss import (
    Detector,
    EnergyDetector,
    MahalanobisScore,
    MSPDetector,
    NotFittedError,
    ODINDetector,
    energy_score,
    msp_score,
    odin_perturb,
    odin_score,
)
from gq_loss.metrics import ood_metrics


def mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).to(dtype)


def conv_bn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5)
    )
    return model.double()


# Mahalanobis reads the output of layer "1" (the first Linear of `mlp`)
DETECTORS = {
    "odin": lambda m: ODINDetector(m, temperature=10.0, epsilon=0.01),
    "msp": lambda m: MSPDetector(m, temperature=2.0),
    "energy": lambda m: EnergyDetector(m),
    "mahalanobis": lambda m: MahalanobisScore(m, layer="1", ridge=1e-3).fit(
        (torch.randn(80, 3, 2, 2, dtype=torch.float64), torch.arange(80) % 4)
    ),
}


class NaNFor(nn.Module):
    """``mlp`` whose output is NaN (or ``value``) for the samples where ``x[:, 0, 0, 0] > 100``."""

    def __init__(self, value: float = float("nan")) -> None:
        super().__init__()
        self.net = mlp()
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        bad = (x[:, 0, 0, 0] > 100)[:, None]
        return torch.where(bad, torch.full_like(out, self.value), out)


# --------------------------------------------------------------------------- functional core


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"temperature": 1.0, "epsilon": 0.05},
        {"epsilon": 0.0},
        {"input_std": (0.5, 0.25, 2.0), "sign_of_zero": 1},
        {"clamp": (-0.8, (0.9, 1.0, 0.7)), "epsilon": 0.1},
    ],
)
def test_detector_score_equals_odin_score(settings):
    model = conv_bn().eval()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    detector = ODINDetector(model, **settings)
    assert torch.equal(detector.score(x), odin_score(model, x, **settings))
    assert torch.equal(detector.perturb(x), odin_perturb(model, x, **settings))
    assert torch.equal(ODINDetector(model, batch_size=4, **settings).score(x), detector.score(x))


def test_odin_functions_leave_no_trace_and_restore_mode():
    model = conv_bn().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    with torch.inference_mode():
        scores = odin_score(model, x)
        stepped = odin_perturb(model, x)
    assert scores.dtype == torch.float64 and stepped.shape == x.shape
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():  # eval mode: BatchNorm statistics untouched
        assert torch.equal(value, state[key]), key


def test_odin_functions_validate():
    model, x = mlp(), torch.randn(3, 12, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module or a callable"):
        odin_score("model", x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`x` batches must be tensors, got list"):
        odin_score(model, [[1.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`x` must be a floating tensor"):
        odin_perturb(model, x.long())
    with pytest.raises(ValueError, match=r"`temperature` must be finite and > 0, got 0"):
        odin_score(model, x, temperature=0)
    with pytest.raises(ValueError, match=r"`epsilon` must be finite and >= 0, got -1"):
        odin_perturb(model, x, epsilon=-1)
    with pytest.raises(ValueError, match=r"`sign_of_zero` must be one of \(0, 1\), got 2"):
        odin_score(model, x, sign_of_zero=2)
    with pytest.raises(ValueError, match=r"`sign_of_zero` must be one of \(0, 1\), got True"):
        odin_perturb(model, x, sign_of_zero=True)
    with pytest.raises(ValueError, match=r"`input_std` must hold one or more positive"):
        odin_score(model, x, input_std=-1.0)
    with pytest.raises(TypeError, match=r"`clamp` must be a pair"):
        odin_perturb(model, x, clamp=1.0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the protocol


@pytest.mark.parametrize("name", list(DETECTORS))
def test_every_detector_calibrates_and_predicts(name):
    model = mlp()
    detector = DETECTORS[name](model)
    assert isinstance(detector, Detector)
    x = torch.randn(40, 3, 2, 2, dtype=torch.float64)
    with pytest.raises(NotFittedError, match=r"call calibrate\(id_data\) before predict\(\)"):
        detector.predict(x)
    assert detector.calibrate(x, tpr=0.75) is detector
    scores = detector.score(x)
    assert scores.shape == (40,) and scores.dtype == torch.float64
    assert torch.equal(detector(x), scores)
    assert torch.equal(detector.score((x, torch.arange(40))), scores)  # one labelled batch
    assert (scores >= detector.threshold).sum() == 30  # ceil(0.75 * 40), scores distinct
    predicted = detector.predict(x)
    assert predicted.dtype == torch.long
    accepted = scores >= detector.threshold
    assert torch.equal(predicted == -1, ~accepted)
    if name != "mahalanobis":  # the classifier's argmax
        with torch.no_grad():
            assert torch.equal(predicted[accepted], model(x).argmax(1)[accepted])
    loader = DataLoader(TensorDataset(x, torch.zeros(40)), batch_size=7)
    torch.testing.assert_close(detector.score(loader), scores, rtol=1e-12, atol=1e-12)
    assert torch.equal(detector.predict(loader), predicted)


def test_logit_detectors_equal_their_functions_and_restore_mode():
    model = conv_bn().train()
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        logits = model.eval()(x)
    model.train()
    assert torch.equal(MSPDetector(model, temperature=3.0).score(x), msp_score(logits, 3.0))
    assert torch.equal(EnergyDetector(model, temperature=3.0).score(x), energy_score(logits, 3.0))
    assert all(m.training for m in model.modules())
    assert MSPDetector(model).fit(None).threshold is None  # nothing to fit
    with pytest.raises(ValueError, match=r"`temperature` must be finite and > 0"):
        EnergyDetector(model, temperature=-1.0)
    with pytest.raises(TypeError, match=r"`ood_label` must be an int"):
        MSPDetector(model, ood_label=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module or a callable"):
        MSPDetector(3)  # type: ignore[arg-type]


def test_mahalanobis_predicts_the_nearest_class_mean():
    x = torch.tensor([[0.0, 0], [2, 0], [0, 2], [2, 2], [10, 10], [12, 10], [10, 12], [12, 12]])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    maha = MahalanobisScore(feature_fn=lambda t: t, ood_label=9).fit((x, y))
    query = torch.tensor([[1.0, 1.0], [11.0, 11.0], [5.0, 5.0], [7.0, 7.0]])
    maha.threshold = -10.0
    assert maha.predict(query).tolist() == [0, 1, 9, 9]  # scores 0, 0, -32, -32
    maha.threshold = -40.0
    assert maha.predict(query).tolist() == [0, 1, 0, 1]


def test_not_fitted_error_is_a_value_error():
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    with pytest.raises(ValueError, match="not fitted"):
        MahalanobisScore(feature_fn=lambda t: t).score(torch.zeros(2, 3))


# --------------------------------------------------------------------------- non-finite scores


@pytest.mark.parametrize("name", list(DETECTORS))
def test_nan_scores_are_never_accepted(name):
    x = torch.randn(20, 3, 2, 2, dtype=torch.float64)
    # a model whose every output is NaN cannot be calibrated
    broken = NaNFor()
    with pytest.raises(ValueError, match=r"`id_data` must give finite scores to calibrate on, got"):
        DETECTORS[name](nn.Sequential(broken, nn.Identity())).calibrate(x + 1000)
    # a clean model and one all-NaN image: NaN score, never a class
    model = mlp()
    detector = DETECTORS[name](model).calibrate(x, tpr=1.0)
    batch = x[:4].clone()
    batch[2] = float("nan")
    scores = detector.score(batch)
    assert torch.isnan(scores[2]) and torch.isfinite(scores[[0, 1, 3]]).all()
    predicted = detector.predict(batch)
    assert predicted[2] == -1 and (predicted[[0, 1, 3]] >= 0).all()
    with pytest.raises(ValueError, match=r"`id_scores` must be finite, got 1 NaN/inf"):
        ood_metrics(scores, scores[:2])


def test_infinite_score_gets_the_ood_label():
    model = NaNFor(value=float("inf"))
    x = torch.randn(10, 3, 2, 2, dtype=torch.float64)
    detector = EnergyDetector(model, ood_label=7).calibrate(x, tpr=1.0)
    x[3, 0, 0, 0] = 1000.0
    scores = detector.score(x)
    assert scores[3] == float("inf")  # above any threshold, yet not scored: rejected
    assert detector.predict(x)[3] == 7


def test_tune_refuses_non_finite_scores():
    x = torch.randn(10, 3, 2, 2, dtype=torch.float64)
    x[0] = float("nan")
    with pytest.raises(ValueError, match=r"`id_data` must give finite scores to tune on"):
        ODINDetector(mlp()).tune(x, epsilons=(0.0, 0.01))


# --------------------------------------------------------------------------- model outputs


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": self.net(x)}


@pytest.mark.parametrize("make", [lambda m: ODINDetector(m), MSPDetector, EnergyDetector])
def test_model_outputs_one_rule(make):
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    wrapped = DictOut().eval()
    with pytest.raises(TypeError, match=r"pass a callable .* `lambda x: model\(x\)\['logits'\]`"):
        make(wrapped).score(x)
    # the fix from the message: a plain callable, used as it is
    expected = make(wrapped.net).score(x)
    assert torch.equal(make(lambda t: wrapped(t)["logits"]).score(x), expected)
    one_output = nn.Sequential(nn.Flatten(), nn.Linear(12, 1)).double()
    with pytest.raises(ValueError, match=r"must have N >= 2 classes, got N = 1"):
        make(one_output).score(x)  # ODIN used to score every input 1.0
    with pytest.raises(ValueError, match=r"for a single \(C, H, W\) image pass `x.unsqueeze\(0\)`"):
        make(conv_bn()).score(x[0])


def test_inputs_cast_to_a_module_dtype_but_not_for_a_callable():
    model = mlp(torch.float64)
    x = torch.randn(4, 3, 2, 2)  # float32
    for make in (lambda m: ODINDetector(m), MSPDetector, EnergyDetector):
        assert torch.equal(make(model).score(x), make(model).score(x.double()))
    seen = []

    def spy(t: Tensor) -> Tensor:
        seen.append(t.dtype)
        return model(t.double())

    odin_score(spy, x)
    MSPDetector(spy).score(x)
    assert set(seen) == {torch.float32}


# --------------------------------------------------------------------------- score resolution


def test_float32_model_scores_have_float64_resolution():
    """At T = 1000 a float32 softmax rounds scores onto a grid of 7.5e-9 and ties them."""
    torch.manual_seed(0)
    model32 = nn.Sequential(nn.Flatten(), nn.Linear(12, 10)).eval()
    with torch.no_grad():
        model32[1].weight.mul_(0.05)
    model64 = nn.Sequential(nn.Flatten(), nn.Linear(12, 10)).double().eval()
    model64.load_state_dict({k: v.double() for k, v in model32.state_dict().items()})
    x = torch.rand(400, 3, 2, 2)
    with torch.no_grad():
        logits32 = model32(x)
    float32_msp = torch.softmax(logits32 / 1000.0, dim=1).amax(dim=1)
    assert len(float32_msp.unique()) < 390  # the defect this test guards against is real here
    for make in (
        lambda m: ODINDetector(m, temperature=1000.0, epsilon=0.0),
        lambda m: ODINDetector(m, temperature=1000.0, epsilon=0.001),
        lambda m: MSPDetector(m, temperature=1000.0),
        lambda m: EnergyDetector(m, temperature=1000.0),
    ):
        got, reference = make(model32).score(x), make(model64).score(x.double())
        assert got.dtype == torch.float64
        assert len(got.unique()) == len(reference.unique()) == 400
        torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-9)
