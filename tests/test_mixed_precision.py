"""GQ under autocast: every method and the sampled estimator on a BatchNorm CNN, a Hugging Face
ViT and a Hugging Face BERT on embeddings (tiny configs, random weights, nothing downloaded),
against a float64 brute force of the same weights; and `autocast=False`, which keeps GQ's own
passes in float32 inside an autocast region."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _oracles import F64, brute_gq
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gq_loss import GQLoss, gq_loss

os.environ["HF_HUB_OFFLINE"] = "1"

CLASSES = 4
HALF = [torch.bfloat16, torch.float16]


class Embedded(nn.Module):
    """A text classifier as a function of its input embeddings (no mask: every token counts)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeds: Tensor) -> Tensor:
        return self.model(inputs_embeds=embeds).logits


class HFLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).logits


def bn_cnn() -> tuple[nn.Module, Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, CLASSES),
    )  # fmt: skip
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval(), torch.rand(6, 3, 8, 8)


def hf_vit() -> tuple[nn.Module, Tensor]:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=CLASSES,
    )  # fmt: skip
    return HFLogits(transformers.ViTForImageClassification(config)).eval(), torch.randn(
        6, 3, 16, 16
    )


def hf_bert() -> tuple[nn.Module, Tensor]:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=8, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=CLASSES,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config)
    return Embedded(model).eval(), torch.randn(6, 5, 16)


MODELS: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
    "bn_cnn": bn_cnn,
    "hf_vit": hf_vit,
    "hf_bert": hf_bert,
}
METHODS = ["loop", "batched", "jacrev", "recompute", "auto"]


def flat_grad(model: nn.Module, value: Tensor) -> Tensor:
    params = [q for q in model.parameters() if q.requires_grad]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(q) if g is None else g).double().flatten()
            for q, g in zip(params, grads, strict=True)
        ]
    )


def cosine(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def reference(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """GQ (mean) and its parameter gradient from the float64 brute force, same weights."""
    wide = copy.deepcopy(model).to(F64)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
        value = brute_gq(wide, x.to(F64), y).mean()
        return value.detach(), flat_grad(wide, value)


@pytest.fixture(scope="module", params=list(MODELS))
def case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, Tensor, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    model, x = MODELS[request.param]()
    y = torch.arange(x.shape[0]) % CLASSES
    return (request.param, model, x, y, *reference(model, x, y))


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_under_cpu_autocast(
    case: tuple[str, nn.Module, Tensor, Tensor, Tensor, Tensor], method: str, dtype: torch.dtype
) -> None:
    name, model, x, y, want, want_grad = case
    with torch.autocast("cpu", dtype=dtype):
        gq, logits = gq_loss(model, x, y, method=method, return_logits=True)
        assert logits.dtype == dtype  # autocast is active in GQ's forward pass
        loss = F.cross_entropy(logits, y) + gq
    got = flat_grad(model, gq)
    assert torch.isfinite(loss) and bool(torch.isfinite(got).all())
    # The value is a first-order quantity: within a few % of float64. The gradient is
    # second-order, and bf16's 8-bit mantissa shows in it (docs/benchmarks.md, "Precision"): it
    # must still point the way of float64's.
    torch.testing.assert_close(gq.double(), want, rtol=5e-2, atol=0)
    assert cosine(got, want_grad) > 0.8, (name, method, cosine(got, want_grad))


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_the_sampled_estimator_runs_under_cpu_autocast(
    case: tuple[str, nn.Module, Tensor, Tensor, Tensor, Tensor], dtype: torch.dtype
) -> None:
    # On logits the classes are drawn uniformly, independently of the logits' values: the same
    # generator seed draws the same classes in bf16 as in float64.
    name, model, x, y, _, _ = case
    wide = copy.deepcopy(model).to(F64)
    options = {"estimator": "sampled", "num_sampled": 2, "operand": "logits"}
    want = gq_loss(wide, x.to(F64), y, generator=torch.Generator().manual_seed(3), **options)
    want_grad = flat_grad(wide, want)
    for method in METHODS:
        with torch.autocast("cpu", dtype=dtype):
            got = gq_loss(
                model, x, y, method=method, generator=torch.Generator().manual_seed(3), **options
            )
        grad = flat_grad(model, got)
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=0)
        assert bool(torch.isfinite(grad).all()) and cosine(grad, want_grad) > 0.8, (name, method)


def test_jacrev_runs_under_autocast_with_train_mode_batchnorm() -> None:
    # Train-mode BatchNorm couples the samples: compared with the batch-sum float64 definition.
    torch.manual_seed(1)
    model, x = bn_cnn()
    model.train()
    y = torch.arange(6) % CLASSES
    wide = copy.deepcopy(model).to(F64)
    want = gq_loss(wide, x.to(F64), y, method="loop")
    want_grad = flat_grad(wide, want)
    for dtype in HALF:
        for method in ("jacrev", "batched"):
            with torch.autocast("cpu", dtype=dtype):
                got = gq_loss(model, x, y, method=method)
            torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=0)
            assert cosine(flat_grad(model, got), want_grad) > 0.8, (dtype, method)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_autocast_false_keeps_gq_in_float32_inside_autocast(
    case: tuple[str, nn.Module, Tensor, Tensor, Tensor, Tensor], dtype: torch.dtype
) -> None:
    name, model, x, y, _, want_grad = case
    plain = gq_loss(model, x, y, method="loop")
    plain_grad = flat_grad(model, plain)
    for method in METHODS:
        with torch.autocast("cpu", dtype=dtype):
            ce_logits = model(x)
            gq, logits = GQLoss(method=method, autocast=False)(model, x, y, return_logits=True)
        assert ce_logits.dtype == dtype  # the rest of the step stays under autocast
        assert logits.dtype == torch.float32
        got = flat_grad(model, gq)
        # GQ's passes ran in float32: the float32 numbers, not the bf16 ones
        torch.testing.assert_close(gq, plain, rtol=1e-4, atol=0)
        torch.testing.assert_close(got, plain_grad, rtol=1e-3, atol=1e-6)
        assert cosine(got, want_grad) > 0.999, (name, method)
