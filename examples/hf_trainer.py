"""GQ inside a Hugging Face `Trainer`, and GQ and ODIN for a text classifier on its embeddings.

    pip install -e ".[hf]"                     # transformers and accelerate
    python examples/hf_trainer.py --smoke      # a tiny BERT from a config, random tokens, CPU

`GQTrainer` adds `lam * GQ` to the cross-entropy in `compute_loss`, from one forward pass of the
model (`return_logits=True`). Image classifiers (a `pixel_values` batch) are differentiated with
respect to their pixels, text classifiers (an `input_ids` batch) with respect to their input
embeddings, through `FromEmbeddings`. `docs/models.md` explains the recipe;
`tests/test_recipes.py` runs it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from train_utils import HelpFormatter

from gq_loss import GQLoss, ODINDetector

try:
    from transformers import Trainer
except Exception as err:  # absent, or failing to import: --help still works, main() says why
    TRANSFORMERS_MISSING: str | None = f"{type(err).__name__}: {err}"
    Trainer = object  # type: ignore[misc,assignment]  # GQTrainer is then unusable, and says so
else:
    TRANSFORMERS_MISSING = None


# --8<-- [start:trainer]
class FromEmbeddings(nn.Module):
    """A text classifier as a function of its input embeddings ``(B, L, D)``.

    Set `input_ids` and `attention_mask` (``(B, L)``, the batch's) before each call: a module,
    unlike a lambda, keeps GQ's `method="recompute"`, the detectors' eval mode and the input
    placement. The model is called with the token ids, as without the wrapper, and the output of
    its input-embedding layer is replaced by the embeddings given (they are what GQ and ODIN
    differentiate and perturb). So the model finds its padding from the ids as it does
    normally: a decoder-only classifier (Llama, Mistral, GPT-2, ...) pools its last non-pad
    token, which it cannot find from `inputs_embeds` (it would pool the last position, a pad
    token under right padding).
    """

    def __init__(self, model: nn.Module, embedding_layer: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        inner = getattr(model, "module", model)  # DistributedDataParallel's wrapped model
        self.embedding_layer = embedding_layer or inner.get_input_embeddings()
        self.input_ids: Tensor | None = None
        self.attention_mask: Tensor | None = None

    def forward(self, embeddings: Tensor) -> Any:
        if self.input_ids is None:
            raise ValueError(
                "FromEmbeddings needs the batch's `input_ids` (set text.input_ids before the call): "
                "the model finds its padding from them"
            )

        def swap(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            if output.shape != embeddings.shape:
                raise ValueError(
                    f"the embeddings {tuple(embeddings.shape)} do not match the input_ids' "
                    f"embeddings {tuple(output.shape)}; set the batch's input_ids"
                )
            return embeddings

        handle = self.embedding_layer.register_forward_hook(swap)
        try:
            return self.model(input_ids=self.input_ids, attention_mask=self.attention_mask)
        finally:
            handle.remove()


class GQTrainer(Trainer):
    """A `Trainer` whose loss is ``cross_entropy + lam * GQ`` (both means over the batch)."""

    # Per-batch means: the Trainer divides them by the gradient-accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, lam: float = 1.0, criterion: GQLoss | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.lam = lam
        # For two classes pass GQLoss(operand="logits"): the softmax quotient is then constant.
        self.criterion = criterion or GQLoss()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,  # a token count: unused by batch means
    ) -> Tensor | tuple[Tensor, Any]:
        labels = inputs["labels"]
        if "pixel_values" in inputs:
            # positional: the first argument of Hugging Face image classifiers
            gq, logits = self.criterion(model, inputs["pixel_values"], labels, return_logits=True)
        else:
            embed = self.accelerator.unwrap_model(model).get_input_embeddings()
            text = FromEmbeddings(model, embed)
            text.input_ids = inputs["input_ids"]
            text.attention_mask = inputs.get("attention_mask")
            # The embeddings keep their graph: CE and GQ both reach the embedding table.
            gq, logits = self.criterion(
                text, embed(inputs["input_ids"]), labels, return_logits=True
            )
        loss = F.cross_entropy(logits, labels) + self.lam * gq
        return (loss, {"logits": logits}) if return_outputs else loss


# --8<-- [end:trainer]


# --8<-- [start:odin]
def odin_on_text(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    *,
    epsilon: float,
    temperature: float = 1000.0,
) -> Tensor:
    """ODIN scores of tokenised batches, the step taken on the input embeddings."""
    text = FromEmbeddings(model)
    detector = ODINDetector(text, temperature=temperature, epsilon=epsilon)
    embed = model.get_input_embeddings()
    scores = []
    for batch in batches:
        text.input_ids, text.attention_mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():  # the embeddings are a fixed input here
            embeddings = embed(batch["input_ids"])
        scores.append(detector.score(embeddings))
    return torch.cat(scores)


def embedding_scale(model: nn.Module) -> float:
    """Root mean square of one coordinate of the word embeddings: the unit of ``epsilon``."""
    weight = model.get_input_embeddings().weight
    return float(weight.detach().pow(2).mean().sqrt())


# --8<-- [end:odin]


# --------------------------------------------------------------------------- smoke run


def tiny_bert(num_labels: int = 3) -> nn.Module:
    """A one-layer BERT classifier from a config: random weights, nothing downloaded."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def random_tokens(n: int, length: int = 8, num_labels: int = 3) -> list[dict[str, Tensor]]:
    """Examples of random tokens, some padded, as a `Dataset` would give them."""
    rows = []
    for i in range(n):
        ids = torch.randint(5, 40, (length,))
        mask = torch.ones(length, dtype=torch.long)
        mask[length - i % 3 :] = 0
        ids[mask == 0] = 0
        rows.append(
            {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(i % num_labels)}
        )
    return rows


def training_args(out_dir: str, steps: int) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        seed=0, data_seed=0,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny BERT, random tokens, CPU")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lam", type=float, default=1.0, help="GQ weight (the study's scale)")
    args = parser.parse_args(argv)
    if TRANSFORMERS_MISSING is not None:
        parser.error(
            "this example needs transformers and accelerate: pip install -e '.[hf]' "
            f"(transformers did not import: {TRANSFORMERS_MISSING})"
        )
    if not args.smoke:
        parser.error("only --smoke is built in: plug GQTrainer into your own training script")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = tiny_bert()
    data = random_tokens(16)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = GQTrainer(
            model=model, args=training_args(out_dir, args.steps), train_dataset=data, lam=args.lam
        )
        trainer.train()
    print("losses:", [round(r["loss"], 4) for r in trainer.state.log_history if "loss" in r])
    batches = [trainer.data_collator(data[i : i + 4]) for i in range(0, 8, 4)]
    epsilon = 0.005 * embedding_scale(model)  # a starting point, not a validated value
    print("ODIN scores:", odin_on_text(model, batches, epsilon=epsilon).tolist())


if __name__ == "__main__":
    main()
