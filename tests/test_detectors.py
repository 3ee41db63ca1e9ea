"""The detector protocol shared by ODIN, MSP, energy and Mahalanobis, the functional ODIN core,
and the rules every detector follows: non-finite scores, model outputs, dtype, N >= 2."""

from __future__ import annotations

import math
import re

import pytest
import torch
from _detectors import ALL_DETECTORS, DETECTORS, LABELLED, NaNFor
from _models import mlp
from torch import Tensor, nn

from gq_loss import (
    EnergyDetector,
    MahalanobisDetector,
    MSPDetector,
    NotFittedError,
    ODINDetector,
    energy_score,
    msp_score,
    odin_perturb,
    odin_score,
)


def conv_bn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5)
    )
    return model.double()


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
    chunked = ODINDetector(model, batch_size=4, **settings).score(x)  # conv: batch-size ulps
    torch.testing.assert_close(chunked, detector.score(x), rtol=1e-14, atol=1e-15)


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


def test_a_0d_input_gets_one_value_error_from_the_loss_and_every_detector():
    """The one input rule (`_runtime.check_input`): a 0-d tensor has no batch dimension, and GQ,
    the ODIN functions and every detector refuse it with the same ValueError (the detectors'
    per-batch check used to raise a TypeError about its dtype, which is floating)."""
    from gq_loss import class_gradient_norms, gq_loss

    model, x = mlp(), torch.tensor(1.0, dtype=torch.float64)
    calls = {
        "class_gradient_norms": lambda: class_gradient_norms(model, x),
        "gq_loss": lambda: gq_loss(model, x, torch.zeros(1, dtype=torch.long)),
        "odin_score": lambda: odin_score(model, x),
        "odin_perturb": lambda: odin_perturb(model, x),
        "ODINDetector.perturb": lambda: ODINDetector(model).perturb(x),
        **{f"{n}.score": lambda n=n: DETECTORS[n](model).score(x) for n in DETECTORS},
        **{f"{n}.score of batches": lambda n=n: DETECTORS[n](model).score([x]) for n in DETECTORS},
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"`inputs` must have shape \(B, \.\.\.\)") as info:
            call()
        assert re.search(r"with at least [12] dimensions?, got \(\)$", str(info.value)), name


def test_odin_functions_validate():
    model, x = mlp(), torch.randn(3, 12, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module or a callable"):
        odin_score("model", x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`inputs` batches must be tensors, got list"):
        odin_score(model, [[1.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`inputs` must be a floating tensor"):
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


def test_logit_detectors_equal_their_functions_and_restore_mode():
    model = conv_bn().train()
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        logits = model.eval()(x)
    model.train()
    msp, energy = msp_score(logits, temperature=3.0), energy_score(logits, temperature=3.0)
    assert torch.equal(MSPDetector(model, temperature=3.0).score(x), msp)
    assert torch.equal(EnergyDetector(model, temperature=3.0).score(x), energy)
    assert all(m.training for m in model.modules())
    assert MSPDetector(model).fit(None).threshold_ is None  # nothing to fit
    with pytest.raises(ValueError, match=r"`temperature` must be finite and > 0"):
        EnergyDetector(model, temperature=-1.0)
    with pytest.raises(TypeError, match=r"`ood_label` must be an int"):
        MSPDetector(model, ood_label=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module or a callable"):
        MSPDetector(3)  # type: ignore[arg-type]


def test_not_fitted_error_is_a_value_error():
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    with pytest.raises(ValueError, match="not fitted"):
        MahalanobisDetector(feature_fn=lambda t: t).score(torch.zeros(2, 3))


# --------------------------------------------------------------------------- non-finite scores


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


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize(
    "make",
    [
        lambda m: MSPDetector(m, temperature=1000.0),
        lambda m: ODINDetector(m),
        EnergyDetector,
        lambda m: MahalanobisDetector(m, layer="2", ridge=1e-6).fit(
            (torch.rand(60, 3, 2, 2), torch.arange(60) % 5)
        ),
    ],
    ids=["msp", "odin", "energy", "mahalanobis"],
)
def test_calibration_promise_holds_whatever_the_batch_size(make):
    """A float32 model's scores change in their last bits with the batch (1e-11 for MSP at
    T = 1000): calibrated on the whole tensor, predict on the same data with other batch sizes
    still accepts at least ceil(tpr · n) samples, and the margin adds no more than it must."""
    n, tpr, changed = 100, 0.95, 0
    for seed in range(12):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 64), nn.Tanh(), nn.Linear(64, 5))
        x = torch.rand(n, 3, 2, 2)
        detector = make(model).calibrate(x, tpr=tpr)
        whole = detector.score(x)
        assert int((whole >= detector.threshold_).sum()) == math.ceil(tpr * n)  # no extra here
        detector.batch_size = 1
        assert int((detector.predict(x) != -1).sum()) >= math.ceil(tpr * n), seed
        detector.batch_size = 7
        scores = detector.score(x)
        assert int((scores >= detector.threshold_).sum()) >= math.ceil(tpr * n), seed
        changed += not torch.equal(scores, whole)
    assert changed > 0  # the batch effect is real here


@pytest.mark.parametrize("corrupted", [0, 1, 20])
def test_corrupted_samples_do_not_move_the_threshold(corrupted):
    """Unscaled images (0-255 instead of 0-1) among 1,000 Mahalanobis calibration samples: their
    scores are ~1e5 times lower. The margin used to be 1e-5 of the range, which they widen, so
    `tpr=0.95` accepted 98 % of the clean data; it now scales with the median distance to the
    threshold's score: exactly ``ceil(tpr · n)`` calibration samples are accepted, the accepted
    share of the clean data agrees with scikit-learn's ROC curve, and the threshold stays
    where the clean data put it."""
    from sklearn.metrics import roc_curve

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 5))
    train = (torch.rand(200, 3, 2, 2), torch.arange(200) % 5)
    detector = MahalanobisDetector(model, layer="1", ridge=1e-6).fit(train)
    clean = torch.rand(1000, 3, 2, 2)
    x = torch.cat([clean, 255 * torch.rand(corrupted, 3, 2, 2)])
    tpr, n = 0.95, len(x)
    scores = detector.calibrate(x, tpr=tpr).score(x)
    if corrupted:  # far out: the range is theirs
        assert float(scores[1000:].max()) < 1e3 * float(scores[:1000].min())
    k = math.ceil(tpr * n)
    assert int((scores >= detector.threshold_).sum()) == k
    clean_scores = scores[:1000].numpy()
    negatives = [float(clean_scores.min()) - 1.0] * 1000  # below every ID score
    _, tpr_curve, thresholds = roc_curve(
        [1] * 1000 + [0] * 1000, list(clean_scores) + negatives, drop_intermediate=False
    )
    accepted = float(tpr_curve[thresholds >= detector.threshold_].max())
    assert accepted == pytest.approx(float((scores[:1000] >= detector.threshold_).double().mean()))
    assert accepted <= k / 1000  # the corrupted samples can only raise the threshold
    clean_threshold = MahalanobisDetector(model, layer="1", ridge=1e-6).fit(train)
    clean_threshold = clean_threshold.calibrate(clean, tpr=tpr).threshold_
    spread = float((scores[:1000] - scores[:1000].quantile(0.05)).abs().median())
    assert detector.threshold_ - clean_threshold < 0.1 * spread * (corrupted + 1)


# --------------------------------------------------------------------------- model outputs


@pytest.mark.parametrize("make", [lambda m: ODINDetector(m), MSPDetector, EnergyDetector])
def test_model_outputs_one_rule(make):
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    wrapped = Wrapped(mlp(), lambda z: {"scores": z}).eval()
    with pytest.raises(TypeError, match=r"name the logits with the `output` argument.*'scores'"):
        make(wrapped).score(x)
    one_output = nn.Sequential(nn.Flatten(), nn.Linear(12, 1)).double()
    with pytest.raises(ValueError, match=r"must have N >= 2 classes, got N = 1"):
        make(one_output).score(x)  # ODIN used to score every input 1.0
    with pytest.raises(ValueError, match=r"for a single \(C, H, W\) image pass `x.unsqueeze\(0\)`"):
        make(conv_bn()).score(x[0])


def test_a_ddp_wrapped_model_is_scored_through_its_module(monkeypatch):
    """DDP's own forward runs collectives (here the BatchNorm buffer broadcast): on one rank
    alone it hangs. Every detector and the ODIN functions score through ``.module``."""
    import socket

    import torch.distributed as dist

    ddp_class = nn.parallel.DistributedDataParallel
    calls: list[int] = []
    forward = ddp_class.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = conv_bn().train()
        ddp = ddp_class(model)
        monkeypatch.setattr(ddp_class, "forward", counted)
        x = torch.randn(12, 3, 2, 2, dtype=torch.float64)
        labelled = (torch.randn(40, 3, 2, 2, dtype=torch.float64), torch.arange(40) % 4)
        makers = [
            lambda m, layer: ODINDetector(m, temperature=10.0, epsilon=0.01),
            lambda m, layer: MSPDetector(m),
            lambda m, layer: EnergyDetector(m),
            lambda m, layer: MahalanobisDetector(m, layer=layer, ridge=1e-3).fit(labelled),
        ]
        for make in makers:
            wrapped, plain = make(ddp, "module.3"), make(model, "3")
            assert torch.equal(wrapped.calibrate(x).score(x), plain.calibrate(x).score(x))
            assert torch.equal(wrapped.predict(x), plain.predict(x))
        assert torch.equal(odin_score(ddp, x), odin_score(model, x))
        assert torch.equal(odin_perturb(ddp, x), odin_perturb(model, x))
        assert calls == []  # DDP's forward never ran
        assert all(m.training for m in ddp.modules())
    finally:
        dist.destroy_process_group()


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


# --------------------------------------------------------------------------- settings (1.0)


# (detector, setting, a new value that changes scores); `model` is swapped for a copy of the
# model with other weights.
CHANGES = [
    ("odin", "temperature", 3.0),
    ("odin", "epsilon", 0.05),
    ("odin", "input_std", (0.5, 0.25, 2.0)),
    ("odin", "sign_of_zero", 1),
    ("odin", "clamp", (-0.1, 0.1)),
    ("odin", "output", lambda out: 2 * out),
    ("msp", "temperature", 7.0),
    ("msp", "output", lambda out: 2 * out),
    ("energy", "temperature", 7.0),
    ("energy", "output", lambda out: 2 * out),
    ("mahalanobis", "layer", "2"),
    ("mahalanobis", "ridge", 10.0),
    ("mahalanobis", "num_classes", 4),
    ("mahalanobis", "output", lambda out: 2 * out),
    ("feature_mahalanobis", "feature_fn", lambda t: t.flatten(1)[:, :6]),
]
KEEPS_SCORES = {"ood_label": 5, "batch_size": 3, "input_key": "x", "progress": False}


@pytest.mark.parametrize(
    ("name", "setting", "value"), CHANGES + [(n, "model", None) for n in ALL_DETECTORS]
)
def test_a_setting_that_changes_scores_drops_the_threshold(name, setting, value):
    torch.manual_seed(0)
    model = mlp()
    detector = ALL_DETECTORS[name](model)
    x = torch.randn(30, 3, 2, 2, dtype=torch.float64)
    before = detector.calibrate(x, tpr=0.8).score(x)
    assert detector.threshold_ is not None
    if setting == "model":
        value = mlp()  # other weights, same architecture
    setattr(detector, setting, value)
    assert detector.threshold_ is None
    with pytest.raises(NotFittedError):
        detector.predict(x)
    if name.endswith("mahalanobis"):  # the features changed: the fit is gone too
        assert detector.means_ is None and detector.precision_ is None
        with pytest.raises(NotFittedError, match="not fitted"):
            detector.score(x)
        detector.fit(LABELLED)
    if (setting, name) not in (("sign_of_zero", "odin"), ("model", "feature_mahalanobis")):
        assert not torch.equal(detector.score(x), before)  # the setting does change scores
    assert detector.calibrate(x, tpr=0.8).predict(x).shape == (30,)


def test_every_score_setting_is_covered_and_the_others_keep_the_threshold():
    from gq_loss._settings import settings_of

    x = torch.randn(30, 3, 2, 2, dtype=torch.float64)
    for name, make in ALL_DETECTORS.items():
        detector = make(mlp())
        both = {"mahalanobis", "feature_mahalanobis"}
        family = both if name in both else {name}
        changing = {s for n, s, _ in CHANGES if n in family} | {"model"}
        names = set(settings_of(type(detector)))
        # a new setting needs a row in CHANGES or in KEEPS_SCORES
        expected = changing | set(KEEPS_SCORES)
        assert names == expected, name
        detector.calibrate(x, tpr=0.8)
        threshold = detector.threshold_
        for setting, value in KEEPS_SCORES.items():
            setattr(detector, setting, value)
        assert detector.threshold_ == threshold
        assert (detector.predict(x) == 5).any()  # the new ood_label
        if name.endswith("mahalanobis"):  # a second fit drops the threshold
            assert detector.fit(LABELLED).threshold_ is None


def test_tune_drops_the_threshold_even_when_the_best_setting_is_the_current_one():
    x = torch.randn(20, 3, 2, 2, dtype=torch.float64)
    detector = ODINDetector(mlp(), epsilon=0.0).calibrate(x)
    detector.tune(x, epsilons=(0.0,))
    assert detector.epsilon == 0.0 and detector.threshold_ is None
    assert len(detector.tuning_results_) == 1


# (detector, setting, bad value, error, message): the same check on assignment as at construction
BAD_SETTINGS = [
    ("odin", "temperature", 0.0, ValueError, r"`temperature` must be finite and > 0"),
    ("odin", "epsilon", -1.0, ValueError, r"`epsilon` must be finite and >= 0"),
    ("odin", "input_std", (1.0, 0.0), ValueError, r"`input_std` must hold one or more positive"),
    ("odin", "sign_of_zero", 7, ValueError, r"`sign_of_zero` must be one of \(0, 1\), got 7"),
    ("odin", "clamp", (1.0, 0.0), ValueError, r"`clamp` must satisfy lo < hi"),
    ("odin", "output", 1.5, TypeError, r"`output` must be None, a key"),
    ("msp", "temperature", float("nan"), ValueError, r"`temperature` must be finite and > 0"),
    ("energy", "output", [0], TypeError, r"`output` must be None, a key"),
    ("msp", "model", 3, TypeError, r"`model` must be a torch\.nn\.Module or a callable"),
    ("energy", "ood_label", 1.0, TypeError, r"`ood_label` must be an int"),
    ("odin", "batch_size", 0, ValueError, r"`batch_size` must be >= 1"),
    ("msp", "progress", 1, TypeError, r"`progress` must be a bool"),
    ("mahalanobis", "ridge", -0.1, ValueError, r"`ridge` must be finite and >= 0"),
    ("mahalanobis", "num_classes", 0, ValueError, r"`num_classes` must be >= 1"),
    ("mahalanobis", "layer", "nope", ValueError, r"`layer` 'nope' is not a submodule"),
    ("mahalanobis", "layer", None, ValueError, r"pass exactly one of `feature_fn` or `layer`"),
    ("mahalanobis", "feature_fn", 3, TypeError, r"`feature_fn` must be callable or None"),
    ("mahalanobis", "model", None, ValueError, r"`layer='1'` needs `model`"),
]


@pytest.mark.parametrize(("name", "setting", "value", "error", "message"), BAD_SETTINGS)
def test_settings_are_validated_on_assignment_as_at_construction(
    name, setting, value, error, message
):
    detector = DETECTORS[name](mlp())
    if name == "mahalanobis" and setting not in ("layer", "model", "feature_fn"):
        with pytest.raises(error, match=message):  # construction
            MahalanobisDetector(mlp(), layer="1", **{setting: value})
    elif name != "mahalanobis" and setting != "model":
        with pytest.raises(error, match=message):
            type(detector)(mlp(), **{setting: value})
    detector.calibrate(torch.randn(10, 3, 2, 2, dtype=torch.float64))
    before = getattr(detector, setting)
    with pytest.raises(error, match=message):
        setattr(detector, setting, value)
    assert getattr(detector, setting) is before  # unchanged, and nothing dropped
    assert detector.threshold_ is not None


def test_settings_are_public_and_in_the_repr():
    from gq_loss._settings import settings_of

    odin = ODINDetector(mlp(), input_std=torch.tensor([0.5, 0.25, 2.0]), clamp=(0.0, [1, 2, 3]))
    assert odin.input_std == (0.5, 0.25, 2.0)  # immutable: no in-place change bypasses a check
    assert odin.clamp == ((0.0,), (1.0, 2.0, 3.0))
    text = repr(odin)
    for fragment in (
        "ODINDetector(model=Sequential, temperature=1000.0, epsilon=0.001,",
        "input_std=(0.5, 0.25, 2.0)",
        "sign_of_zero=0",
        "clamp=((0.0,), (1.0, 2.0, 3.0))",
        "output=None",
        "ood_label=-1",
        "threshold_=None",
    ):
        assert fragment in text
    for name, make in ALL_DETECTORS.items():
        detector = make(mlp())
        text = repr(detector)
        for setting in settings_of(type(detector)):
            assert f"{setting}=" in text, (name, setting)
            getattr(detector, setting)  # public
    # a detector built from its own settings scores the same
    copy = ODINDetector(odin.model, input_std=odin.input_std, clamp=odin.clamp)
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    assert torch.equal(copy.score(x), odin.score(x))


def test_fitted_state_ends_in_an_underscore():
    detector = DETECTORS["odin"](mlp())
    assert not hasattr(detector, "threshold") and not hasattr(detector, "tuning_results")
    assert detector.threshold_ is None and detector.tuning_results_ == []
    with pytest.raises(TypeError, match=r"`threshold_` must be a real number or None"):
        detector.threshold_ = "0.5"  # type: ignore[assignment]
    maha = DETECTORS["mahalanobis"](mlp())
    assert {"means_", "covariance_", "precision_", "class_counts_"} <= set(vars(maha))


# --------------------------------------------------------------------------- streaming data


# --------------------------------------------------------------------------- Mahalanobis


def test_float64_work_follows_the_one_device_rule(monkeypatch):
    """MPS has no float64: every score (Mahalanobis included) asks `lacks_float64` where its
    float64 work may run; with no MPS here, the check is made to answer "no float64"."""
    import gq_loss._runtime as detection

    asked: list[str] = []

    def lacks_float64(device: torch.device) -> bool:
        asked.append(device.type)
        return True  # as on MPS: the float64 work runs on the CPU

    x = LABELLED[0]
    monkeypatch.setattr(detection, "lacks_float64", lacks_float64)
    for name, make in DETECTORS.items():
        asked.clear()
        model = mlp()
        torch.manual_seed(1)
        detector = make(model)  # Mahalanobis: fits here
        scores = detector.score(x)
        assert asked and set(asked) == {"cpu"}, name
        assert scores.device.type == "cpu" and scores.dtype == torch.float64
        if name == "mahalanobis":
            assert detector.means_.device.type == "cpu"
            assert detector.precision_.dtype == torch.float64
        monkeypatch.undo()
        torch.manual_seed(1)
        torch.testing.assert_close(make(model).score(x), scores, rtol=1e-12, atol=1e-12)
        monkeypatch.setattr(detection, "lacks_float64", lacks_float64)


class Wrapped(nn.Module):
    """``net`` whose output is repacked by ``pack`` (a dict, a tuple, a ModelOutput-like)."""

    def __init__(self, net: nn.Module, pack) -> None:
        super().__init__()
        self.net = net
        self.pack = pack

    def forward(self, x: Tensor):
        return self.pack(self.net(x))


class ModelOutput:
    """Like Hugging Face's ``ModelOutput``: the logits as an attribute."""

    def __init__(self, logits: Tensor, hidden: Tensor) -> None:
        self.logits, self.hidden = logits, hidden


OUTPUTS = {
    "dict": (lambda z: {"hidden": z.sum(1), "scores": z}, "scores"),
    "dict-logits": (lambda z: {"hidden": z.sum(1), "logits": z}, None),  # read unnamed
    "tuple": (lambda z: (z.sum(1), z), 1),
    "model-output": (lambda z: ModelOutput(z, z.sum(1)), None),  # read unnamed
    "attribute": (lambda z: ModelOutput(z.sum(1, keepdim=True), z), "hidden"),
    "callable": (lambda z: [[z]], lambda out: out[0][0]),
}


@pytest.mark.parametrize("kind", list(OUTPUTS))
@pytest.mark.parametrize("name", ["odin", "msp", "energy"])
def test_output_names_the_logits_and_keeps_the_module(kind, name):
    torch.manual_seed(0)
    pack, output = OUTPUTS[kind]
    plain = conv_bn()
    model = Wrapped(plain, pack).train()  # train mode: the detector must switch it to eval
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 3, 2, 2)  # float32 into a float64 module: placed by the one rule
    make = DETECTORS[name]
    detector = make(model)
    detector.output = output
    assert f"output={output!r}" in repr(detector)
    expected = make(plain).score(x.double())
    assert torch.equal(detector.score(x), expected)
    assert detector.calibrate(x, tpr=0.5).predict(x).shape == (6,)
    if name == "odin":
        kwargs = {"temperature": 10.0, "epsilon": 0.01}
        assert torch.equal(odin_score(model, x, output=output, **kwargs), expected)
        torch.testing.assert_close(
            odin_perturb(model, inputs=x, output=output, **kwargs),
            odin_perturb(plain, x.double(), **kwargs),
        )
    # no side effects: modes, BatchNorm statistics, .grad
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_output_errors_point_to_the_argument():
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    model = Wrapped(mlp(), lambda z: (z, z))
    with pytest.raises(
        TypeError, match=r"name the logits with the `output` argument, e\.g\. `output=0`"
    ):
        odin_score(model, x)
    with pytest.raises(ValueError, match=r"`output`=5 is an index into a tuple or list"):
        MSPDetector(model, output=5).score(x)
    with pytest.raises(TypeError, match=r"`output` must be None, a key"):
        odin_perturb(model, x, output=2.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- one vocabulary


def test_one_vocabulary():
    model, x = mlp(), torch.randn(8, 3, 2, 2, dtype=torch.float64)
    assert torch.equal(odin_score(model, inputs=x), odin_score(model, x))
    with pytest.raises(TypeError):
        odin_score(model, x=x)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="positional"):
        msp_score(model(x), 2.0)  # type: ignore[misc]
    with pytest.raises(TypeError, match="positional"):
        energy_score(model(x), 2.0)  # type: ignore[misc]
    for make in ALL_DETECTORS.values():
        with pytest.raises(TypeError, match="positional"):
            make(model).calibrate(x, 0.9)  # type: ignore[misc]
        assert make(model).fit(id_train_data=LABELLED).calibrate(x, tpr=0.9).threshold_ is not None


# --------------------------------------------------------------------------- torch.export


def test_an_exported_module_is_scored_as_it_was_exported():
    """``ExportedProgram.module()`` refuses ``eval()`` ("Calling eval() is not supported yet"):
    its mode was fixed at export. Exported in eval mode, every detector scores it as the eager
    model in eval mode, also inside a wrapper, and the flags around it come back; exported in
    train mode (batch statistics, dropout) it is refused with the way out."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Tanh(),
        nn.Linear(16, 5),
    )  # fmt: skip
    x = torch.randn(8, 3, 2, 2)
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(model.eval(), (x,), dynamic_shapes=({0: batch},)).module()
    model.train()
    wrapper = nn.Sequential(exported, nn.Identity())  # train mode, as built
    labelled = (x, torch.arange(8) % 2)
    makers = {
        "odin": lambda m: ODINDetector(m, temperature=10.0, epsilon=0.01),
        "msp": MSPDetector,
        "energy": EnergyDetector,
        "mahalanobis": lambda m: MahalanobisDetector(m, feature_fn=m, ridge=1e-3).fit(labelled),
    }
    with eval_of(model):
        want = {name: make(model).score(x) for name, make in makers.items()}
        want_odin = odin_score(model, x, temperature=10.0, epsilon=0.01)
    for target in (exported, wrapper):
        for name, make in makers.items():
            torch.testing.assert_close(make(target).score(x), want[name], rtol=1e-6, atol=1e-9)
        detector = MSPDetector(target, batch_size=3).calibrate(x, tpr=0.75)
        assert int((detector.predict(x) != -1).sum()) >= 6
        torch.testing.assert_close(odin_score(target, x, temperature=10.0, epsilon=0.01), want_odin)
    assert wrapper.training and all(m.training for m in wrapper.modules())
    with pytest.raises(RuntimeError, match=r"'1' did not run.*torch.export module runs its graph"):
        MahalanobisDetector(exported, layer="1").fit(labelled)

    trained = torch.export.export(model.train(), (x,)).module()
    for target, where in ((trained, "`model`"), (nn.Sequential(trained), "a submodule of `model`")):
        for make in makers.values():
            with pytest.raises(
                ValueError,
                match=rf"{where} is a torch.export module exported in train mode \(its graph "
                r"runs aten::batch_norm with training=True\).*torch.export.export\(model.eval\(\)",
            ):
                make(target).score(x)


class eval_of:
    """``model`` in eval mode for the ``with`` block, its mode restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.mode = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.mode)


# --------------------------------------------------------------------------- dict batches
