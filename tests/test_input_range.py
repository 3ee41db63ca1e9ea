"""Inputs far outside the documented range (float images in 0-255): ODIN and GQ warn, once per
model, unless `input_std=` says the scale is meant; integer images get the fix in the error."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import gq_loss
from gq_loss import GQLoss, InputRangeWarning, ODINDetector, odin_perturb, odin_score
from gq_loss import gq_loss as gq_fn


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


def _model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Tanh(), nn.Linear(3, 3))


X = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 0])

CALLS: dict[str, Callable[[nn.Module, Tensor], object]] = {
    "odin_score": lambda m, x: odin_score(m, x),
    "odin_perturb": lambda m, x: odin_perturb(m, x),
    "ODINDetector.score": lambda m, x: ODINDetector(m).score(x),
    "gq_loss": lambda m, x: gq_fn(m, x, Y),
    "GQLoss": lambda m, x: GQLoss()(m, x, Y),
}


def _range_warnings(call: Callable[[], object]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, InputRangeWarning)]


@pytest.mark.parametrize("name", CALLS)
def test_float_images_in_0_255_warn_once_per_model(name: str) -> None:
    model = _model()
    (message,) = _range_warnings(lambda: CALLS[name](model, X * 255))
    assert "images in 0-255? Pass x / 255" in message and "InputRangeWarning" in message
    assert ("ODIN" if "odin" in name.lower() else "GQ") in message.split(" ")[0]
    # once per model: a training loop pays one check, on its first step
    assert _range_warnings(lambda: CALLS[name](model, X * 255)) == []


@pytest.mark.parametrize("name", CALLS)
def test_unit_and_normalised_inputs_do_not_warn(name: str) -> None:
    assert _range_warnings(lambda: CALLS[name](_model(), X)) == []
    normalised = (X - 0.45) / 0.2  # ImageNet-like statistics: about [-2.3, 2.8]
    assert _range_warnings(lambda: CALLS[name](_model(), normalised)) == []


def test_input_std_says_the_scale_is_meant_and_the_suggested_value_is_right() -> None:
    model = _model()
    pixels = X * 255
    assert _range_warnings(lambda: odin_score(model, pixels, input_std=1 / 255)) == []
    assert _range_warnings(lambda: ODINDetector(model, input_std=1 / 255).score(pixels)) == []
    # The warning's advice: input_std=1/255 on 0-255 pixels is epsilon in [0, 1] pixel units,
    # i.e. the same scores as the model that divides by 255 itself, fed [0, 1] pixels.
    on_255 = nn.Sequential(Scale(1 / 255), model)
    got = odin_score(on_255, pixels, epsilon=0.01, input_std=1 / 255)
    expected = odin_score(model, X, epsilon=0.01)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_opt_out_with_the_documented_filter() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=gq_loss.InputRangeWarning)
        odin_score(_model(), X * 255)
        GQLoss()(_model(), X * 255, Y)


@pytest.mark.parametrize("name", CALLS)
def test_uint8_images_are_refused_with_the_division_by_255(name: str) -> None:
    with pytest.raises(TypeError, match=r"uint8.*; for images in 0-255 pass x\.float\(\) / 255"):
        CALLS[name](_model(), (X * 255).to(torch.uint8))
