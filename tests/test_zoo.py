"""A model zoo nobody here wrote: Hugging Face classifiers, built offline from tiny configs.

Random weights, no download (`HF_HUB_OFFLINE=1`). For each model: one cross-entropy + GQ training
step gives a finite loss and finite parameter gradients; GQ equals the same weights with eager
attention (and `recompute` equals `loop`); ODIN scores, calibrates and predicts on the module
itself, the logits read from the Hugging Face `logits` field without being named.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _optional import import_or_skip
from torch import Tensor, nn

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = import_or_skip("transformers", probe="transformers.modeling_utils")

from gq_loss import MahalanobisDetector, ODINDetector, gq_loss, odin_score  # noqa: E402

CLASSES = 3
IMAGE = (3, 32, 32)
TEXT = (6, 32)  # (tokens, embedding width)
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
VIT = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    **NO_DROPOUT,
}
BERT = {
    "vocab_size": 40,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 16,
    **NO_DROPOUT,
}

# name -> (model class, config class, config)
IMAGE_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "vit": ("ViTForImageClassification", "ViTConfig", VIT),
    "deit": ("DeiTForImageClassification", "DeiTConfig", VIT),
    "dinov2": (
        "Dinov2ForImageClassification",
        "Dinov2Config",
        {k: v for k, v in VIT.items() if k != "intermediate_size"} | {"mlp_ratio": 2},
    ),
    "swin": (
        "SwinForImageClassification",
        "SwinConfig",
        {
            "image_size": 32,
            "patch_size": 4,
            "embed_dim": 16,
            "depths": [1, 1],
            "num_heads": [2, 2],
            "window_size": 4,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "drop_path_rate": 0.0,
        },
    ),
    "convnext": (
        "ConvNextForImageClassification",
        "ConvNextConfig",
        {"num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 1], "drop_path_rate": 0.0},
    ),
    "resnet": (
        "ResNetForImageClassification",
        "ResNetConfig",
        {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "layer_type": "basic"},
    ),
    "mobilevit": (
        "MobileViTForImageClassification",
        "MobileViTConfig",
        {
            "image_size": 32,
            "patch_size": 2,
            "hidden_sizes": [16, 16, 16],
            "neck_hidden_sizes": [8, 8, 16, 16, 16, 16, 32],
            "num_attention_heads": 2,
            "mlp_ratio": 1.0,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "classifier_dropout_prob": 0.0,
        },
    ),
    "efficientnet": (
        "EfficientNetForImageClassification",
        "EfficientNetConfig",
        {
            "image_size": 32,
            "width_coefficient": 0.1,
            "depth_coefficient": 0.1,
            "hidden_dim": 128,
            "dropout_rate": 0.0,
            "drop_connect_rate": 0.0,
        },
    ),
}
TEXT_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert": ("BertForSequenceClassification", "BertConfig", BERT),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", BERT | {"pad_token_id": 1}),
    "distilbert": (
        "DistilBertForSequenceClassification",
        "DistilBertConfig",
        {
            "vocab_size": 40,
            "dim": 32,
            "n_layers": 1,
            "n_heads": 2,
            "hidden_dim": 64,
            "max_position_embeddings": 16,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "seq_classif_dropout": 0.0,
        },
    ),
}


class Embedded(nn.Module):
    """A text classifier as a function of its input embeddings, with a fixed attention mask.

    The mask is a buffer, so the module keeps its device placement, mode handling and
    `method="recompute"`; a batch of B uses the mask's first B rows.
    """

    def __init__(self, model: nn.Module, mask: Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mask", mask)

    def forward(self, embeds: Tensor) -> Any:
        return self.model(inputs_embeds=embeds, attention_mask=self.mask[: embeds.shape[0]])


def build(name: str) -> tuple[nn.Module, Callable[[int], Tensor]]:
    """The module (default attention backend) and a maker of input batches."""
    table = IMAGE_MODELS if name in IMAGE_MODELS else TEXT_MODELS
    model_name, config_name, settings = table[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(num_labels=CLASSES, **settings)
    model = getattr(transformers, model_name)(config)
    if name in IMAGE_MODELS:
        return model, lambda batch: torch.randn(batch, *IMAGE)
    mask = torch.ones(4, TEXT[0], dtype=torch.long)
    mask[1, -2:] = 0  # padded sequences
    mask[3, -4:] = 0
    return Embedded(model, mask), lambda batch: torch.randn(batch, *TEXT)


def with_eager_attention(model: nn.Module) -> nn.Module:
    """A copy with the same weights whose attention is written out in eager PyTorch ops."""
    inner = model.model if isinstance(model, Embedded) else model
    # A fresh model built for eager attention (older transformers choose the attention class
    # when the model is built), given the same weights.
    eager_inner = type(inner)._from_config(copy.deepcopy(inner.config), attn_implementation="eager")
    eager_inner.load_state_dict(inner.state_dict())
    assert eager_inner.config._attn_implementation == "eager"
    if isinstance(model, Embedded):
        return Embedded(eager_inner, model.mask).train(model.training)
    return eager_inner.train(model.training)


def attention_backend(model: nn.Module) -> str | None:
    inner = model.model if isinstance(model, Embedded) else model
    return getattr(inner.config, "_attn_implementation", None)


ALL = [*IMAGE_MODELS, *TEXT_MODELS]


@pytest.mark.parametrize("name", ALL)
def test_zoo_model_trains_with_gq_and_scores_with_odin(name: str) -> None:
    model, inputs = build(name)
    x, y = inputs(4), torch.tensor([0, 1, 2, 1])

    # One training step: CE + GQ from one forward pass, finite loss and gradients.
    model.train()
    gq, logits = gq_loss(model, x, y, return_logits=True)
    loss = F.cross_entropy(logits, y) + gq
    loss.backward()
    assert torch.isfinite(loss) and 0 <= float(gq.detach()) <= 1
    grads = [q.grad for q in model.parameters() if q.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()

    # GQ equals the eager-attention copy, and recompute equals loop (eval mode).
    model.eval()
    want = gq_loss(model, x, y)
    params = [q for q in model.parameters() if q.requires_grad]
    want_grads = torch.autograd.grad(want, params, allow_unused=True, materialize_grads=True)
    others = {"recompute": gq_loss(model, x, y, method="recompute", chunk_size=2)}
    if attention_backend(model) not in (None, "eager"):
        eager = with_eager_attention(model)
        others["eager attention"] = gq_loss(eager, x, y)
        eager_params = [q for q in eager.parameters() if q.requires_grad]
    for label, got in others.items():
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=label)
        ps = eager_params if label == "eager attention" else params
        got_grads = torch.autograd.grad(got, ps, allow_unused=True, materialize_grads=True)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-6, msg=label)

    # ODIN on the module itself: score, calibrate, predict; the mode is restored.
    model.train()
    detector = ODINDetector(model)
    scores = detector.score(x)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    # Reference: the logits named by hand, through a plain callable on the model in eval mode.
    model.eval()
    with torch.no_grad():
        classes = model(x).logits.argmax(1)
    reference = odin_score(lambda t: model(t).logits, x)
    model.train()
    torch.testing.assert_close(scores, reference, rtol=1e-12, atol=0)
    detector.calibrate([inputs(4), inputs(2)])
    predicted = detector.predict(x)
    accepted = scores >= detector.threshold_
    assert torch.equal(predicted, torch.where(accepted, classes, torch.full_like(classes, -1)))
    assert model.training
    torch.testing.assert_close(detector.score(x), scores)  # eval mode inside: no batch noise


@pytest.mark.parametrize(("method", "chunk"), [("loop", None), ("batched", None), ("recompute", 2)])
def test_hf_gradient_checkpointing_on_sdpa_equals_no_checkpointing(
    method: str, chunk: int | None
) -> None:
    # HF's activation_checkpointing_enable() (formerly gradient_checkpointing_enable()) is
    # torch.utils.checkpoint(use_reentrant=False) around each layer; ViT's default attention is
    # SDPA, whose recomputation in backward() must run on the math backend of GQ's forward
    # (float32: the fused CPU kernel is the default otherwise).
    model, inputs = build("vit")
    plain = copy.deepcopy(model).train()
    model.activation_checkpointing_enable()
    model.train()
    assert model.is_activation_checkpointing and attention_backend(model) == "sdpa"
    x, y = inputs(4), torch.tensor([0, 1, 2, 1])
    results = []
    for m in (model, plain):
        gq, logits = gq_loss(m, x, y, method=method, chunk_size=chunk, return_logits=True)
        (F.cross_entropy(logits, y) + gq).backward()
        results.append((gq.detach(), [q.grad for q in m.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    for got, want in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match=r"method='jacrev' could not run .*checkpoint"):
        gq_loss(model, x, y, method="jacrev")


def test_hf_wav2vec2_train_mode_needs_freeze_feature_encoder() -> None:
    # Wav2Vec2's feature encoder sets requires_grad on a view of its input in train mode, which
    # PyTorch refuses once the input requires grad (GQ's does): gq-loss says what to call.
    config = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, num_labels=CLASSES, classifier_proj_size=8,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, feat_extract_norm="group",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForSequenceClassification(config).train()
    x, y = torch.randn(4, 200), torch.tensor([0, 1, 2, 1])
    for method in ("loop", "batched", "recompute", "jacrev"):
        with pytest.raises(
            RuntimeError, match=r"gq_loss: .*model\.freeze_feature_encoder\(\)"
        ) as info:
            gq_loss(model, x, y, method=method)
        assert "only change requires_grad flags of leaf variables" in str(info.value.__cause__)
    # With the encoder frozen every method trains, and equals eval mode (no dropout, no masking;
    # eval mode skips the requires_grad line).
    model.freeze_feature_encoder()
    params = [q for q in model.parameters() if q.requires_grad]
    want = gq_loss(model.eval(), x, y)
    want_grads = torch.autograd.grad(want, params)
    model.train()
    for method in ("loop", "batched", "recompute", "jacrev"):
        got = gq_loss(model, x, y, method=method)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=method)
        for g, w in zip(torch.autograd.grad(got, params), want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7, msg=method)


def test_mahalanobis_reads_hugging_face_layers_as_the_docstring_says() -> None:
    """The outputs of transformers 5.x layers that `MahalanobisDetector`'s docstring states: an
    encoder layer returns a tensor (it used to say "a tuple: use output=0"), a base model a
    ``ModelOutput`` whose field ``output=`` names, the BERT pooler ``(B, D)``."""
    vit, make = build("vit")
    bert, make_text = build("bert")
    x, y = make(8), torch.arange(8) % CLASSES
    e = make_text(4)
    tokens = (IMAGE[1] // VIT["patch_size"]) ** 2 + 1  # patches and the class token
    # an encoder layer and the final LayerNorm: a tensor (B, L, D), flattened; a class token
    for layer in ("vit.layers.0", "vit.layernorm"):
        feats = MahalanobisDetector(vit, layer=layer).features(x)
        assert feats.shape == (8, tokens * VIT["hidden_size"])
    with pytest.raises(ValueError, match=r"`output`=0 is an index.*output is a tensor of shape"):
        MahalanobisDetector(vit, layer="vit.layers.0", output=0).features(x)  # the old advice
    cls_token = MahalanobisDetector(vit, layer="vit.layernorm", output=lambda h: h[:, 0])
    with torch.no_grad():
        want = vit.eval()(pixel_values=x, output_hidden_states=True)
    norm = dict(vit.named_modules())["vit.layernorm"]
    torch.testing.assert_close(
        cls_token.features(x), norm(want.hidden_states[-1])[:, 0].double(), rtol=0, atol=0
    )
    # a base model: a ModelOutput, refused unnamed, read by its field
    with pytest.raises(TypeError, match=r"`layer` 'vit' must produce a Tensor, got "):
        MahalanobisDetector(vit, layer="vit").features(x)
    named = MahalanobisDetector(vit, layer="vit", output="last_hidden_state").fit((x, y))
    assert named.means_.shape == (CLASSES, tokens * VIT["hidden_size"])
    layer = "model.bert.encoder.layer.0"
    assert MahalanobisDetector(bert, layer=layer).features(e).shape == (4, 6 * BERT["hidden_size"])
    assert MahalanobisDetector(bert, layer="model.bert.pooler").features(e).shape == (4, 32)
