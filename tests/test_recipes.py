"""The recipes of docs/models.md, run: GQ in a Hugging Face `Trainer`, GQ and ODIN on embeddings.

The code under test is `examples/hf_trainer.py`, the file the docs include. Tiny models built
from configs (random weights, nothing downloaded), a few steps on CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _optional import import_or_skip

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = import_or_skip("transformers", probe="transformers.modeling_utils")
import_or_skip("accelerate")

import hf_trainer  # noqa: E402  (examples/, put on the path by conftest.py)
from hf_trainer import FromEmbeddings, GQTrainer  # noqa: E402

from gq_loss import gq_loss  # noqa: E402

LAM = 0.5


def make_trainer(tmp_path: object, lam: float, steps: int = 3) -> GQTrainer:
    torch.manual_seed(0)
    model = hf_trainer.tiny_bert()
    args = hf_trainer.training_args(str(tmp_path), steps)
    return GQTrainer(model=model, args=args, train_dataset=hf_trainer.random_tokens(12), lam=lam)


def test_trainer_loss_is_ce_plus_lam_gq_on_the_embeddings(tmp_path: object) -> None:
    trainer = make_trainer(tmp_path, LAM)
    model = trainer.model
    rows = hf_trainer.random_tokens(4)
    batch = trainer.data_collator(rows)
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(4))
    # evaluate() reports the same loss (GQ's value under no_grad; no dropout in this model)
    assert trainer.evaluate(rows)["eval_loss"] == pytest.approx(loss.item(), rel=1e-5)
    ce = model(**batch).loss  # the model's own cross-entropy
    text = FromEmbeddings(model)
    text.attention_mask = batch["attention_mask"]
    embeddings = model.get_input_embeddings()(batch["input_ids"])
    gq = gq_loss(text, embeddings, batch["labels"])
    assert torch.isfinite(gq) and gq > 0.01
    torch.testing.assert_close(loss, ce + LAM * gq)
    # Both terms reach the embedding table through the embeddings.
    (table,) = torch.autograd.grad(loss, model.get_input_embeddings().weight)
    (ce_only,) = torch.autograd.grad(ce, model.get_input_embeddings().weight)
    assert not torch.allclose(table, ce_only)


def test_trainer_trains_with_gq(tmp_path: object) -> None:
    runs = {}
    for lam in (0.0, LAM):
        trainer = make_trainer(tmp_path / f"lam{lam}", lam)  # type: ignore[operator]
        before = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
        trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
        after = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
        for name in ("classifier.weight", "bert.embeddings.word_embeddings.weight"):
            assert not torch.equal(before[name], after[name]), name
        runs[lam] = losses, after
    # Same initial weights and data order: the first logged loss is higher by lam * GQ, with
    # GQ in (0, 1] ...
    gap = runs[LAM][0][0] - runs[0.0][0][0]
    assert 0.01 < gap <= LAM
    # ... and GQ changed the updates of most parameters.
    moved = [not torch.allclose(runs[LAM][1][k], p) for k, p in runs[0.0][1].items()]
    assert sum(moved) > len(moved) // 2


def test_odin_on_text_applies_each_batch_mask() -> None:
    torch.manual_seed(0)
    model = hf_trainer.tiny_bert().eval()
    rows = hf_trainer.random_tokens(6)
    collate = transformers.default_data_collator
    batches = [collate(rows[:3]), collate(rows[3:])]
    epsilon = 0.005 * hf_trainer.embedding_scale(model)
    scores = hf_trainer.odin_on_text(model, batches, epsilon=epsilon)
    assert scores.shape == (6,) and scores.dtype == torch.float64
    assert torch.isfinite(scores).all()
    # Masked tokens change nothing: the mask of each batch reached the model.
    for batch in batches:
        batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7)
    same = hf_trainer.odin_on_text(model, batches, epsilon=epsilon)
    torch.testing.assert_close(same, scores, rtol=0, atol=1e-12)  # scores are ~1/N at T = 1000
    # Without the mask the padded rows score differently (the check above can fail).
    for batch in batches:
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    unmasked = hf_trainer.odin_on_text(model, batches, epsilon=epsilon)
    padded = torch.tensor([bool((r["attention_mask"] == 0).any()) for r in rows])
    assert ((unmasked - scores)[padded].abs() > 1e-9).all()
    torch.testing.assert_close(unmasked[~padded], scores[~padded], rtol=0, atol=1e-12)


def test_trainer_on_an_image_classifier_takes_pixels(tmp_path: object) -> None:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config)  # SDPA attention by default
    trainer = GQTrainer(model=model, args=hf_trainer.training_args(str(tmp_path), 1), lam=LAM)
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 0])}
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    logits = model(batch["pixel_values"]).logits
    torch.testing.assert_close(outputs["logits"], logits)
    gq = gq_loss(model, batch["pixel_values"], batch["labels"])
    assert torch.isfinite(gq) and gq > 0.01
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["labels"]) + LAM * gq)
    loss.backward()
    assert model.vit.embeddings.patch_embeddings.projection.weight.grad is not None


def test_smoke_run(capsys: pytest.CaptureFixture[str]) -> None:
    hf_trainer.main(["--smoke", "--steps", "2"])
    out = capsys.readouterr().out
    assert "losses:" in out and "ODIN scores:" in out
