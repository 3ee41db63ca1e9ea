"""Precision of GQ (and of CE) under autocast and in half-precision weights, against float64.

For each model (eval mode, fixed random weights), the reference is a float64 brute force on a
float64 copy of the same weights: one sample and one class at a time, plain autograd, no code of
the package. Each setting computes the mean GQ of one batch and its parameter gradient, and the
table gives the value's relative error, the gradient's relative error
``||g - g64|| / ||g64||`` and its cosine to ``g64``:

- ``fp32``: float32 weights, no autocast (the baseline);
- ``bf16 autocast`` / ``fp16 autocast``: float32 weights under CPU ``torch.autocast``;
- ``bf16 autocast, autocast=False``: the same step, GQ's own passes with ``autocast=False``;
- ``bf16 weights`` / ``fp16 weights``: ``model.to(torch.bfloat16)`` / ``model.half()``.

    python benchmarks/bench_precision.py                      # the table in docs/benchmarks.md
    python benchmarks/bench_precision.py --models bn_cnn --batch 4   # quick

Models: ``bn_cnn`` (``examples/models.py`` ``small_cnn``: 3 conv-BatchNorm-ReLU stages of
32/64/128 channels, 32x32 images), ``hf_vit`` and ``hf_bert`` (the Hugging Face ViT and BERT of
``tests/test_zoo.py``, random weights from their tiny configs, BERT on input embeddings). N = 10.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import _examples_path  # noqa: F401  (puts examples/ on sys.path)
import torch
import torch.nn.functional as F
from bench_gq import build_zoo_model, logits_of
from models import build_model
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gq_loss import gq_loss

CLASSES = 10
METHODS = ("loop", "batched", "jacrev", "recompute")
#: (label, operand, p)
OPERANDS = (
    ("softmax, L1", "softmax", 1),
    ("softmax, L2", "softmax", 2),
    ("log_softmax, L1", "log_softmax", 1),
    ("logits, L1", "logits", 1),
)
SETTINGS = (
    "fp32",
    "bf16 autocast",
    "fp16 autocast",
    "bf16 autocast, autocast=False",
    "bf16 weights",
    "fp16 weights",
)


class Logits(nn.Module):
    """The logits tensor of a model whose output holds them (Hugging Face `logits`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.model(x))


def build(name: str, batch: int) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    if name == "bn_cnn":
        model: nn.Module = build_model("small_cnn", CLASSES)
        x = torch.rand(batch, 3, 32, 32)
        # One training-mode pass gives the BatchNorm layers non-trivial statistics.
        with torch.no_grad():
            model.train()(torch.rand(64, 3, 32, 32))
    else:
        inner, x = build_zoo_model(name.removeprefix("hf_"), CLASSES, batch)
        model = Logits(inner)
    return model.eval(), x


def brute(model: nn.Module, x: Tensor, y: Tensor, operand: str, p: float) -> Tensor:
    """Mean GQ, Eq. 7, one sample and one class at a time (keeps the graph)."""
    values = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach().requires_grad_(True)
        z = model(xi)[0]
        scores = {"softmax": z.softmax(0), "log_softmax": z.log_softmax(0), "logits": z}[operand]
        norms = []
        for j in range(z.shape[0]):
            (g,) = torch.autograd.grad(scores[j], xi, create_graph=True)
            norms.append(g.abs().sum() if p == 1 else g.pow(2).sum().sqrt())
        target = norms[int(y[i])]
        values.append(target / (sum(norms) - target + 1e-12))
    return torch.stack(values).mean()


def flat_grad(model: nn.Module, value: Tensor) -> Tensor:
    params = [q for q in model.parameters() if q.requires_grad]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(q) if g is None else g).double().flatten()
            for q, g in zip(params, grads, strict=True)
        ]
    )


def errors(value: Tensor, grad: Tensor, ref: tuple[Tensor, Tensor]) -> dict[str, float]:
    ref_value, ref_grad = ref
    return {
        "value": abs(float(value) - float(ref_value)) / abs(float(ref_value)),
        "grad": float((grad - ref_grad).norm() / ref_grad.norm()),
        "cos": float(grad @ ref_grad / (grad.norm() * ref_grad.norm())),
    }


def run_setting(
    setting: str, model: nn.Module, x: Tensor, loss: Callable[[nn.Module, Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """`loss(model, x)` and its parameter gradient in `setting`."""
    if setting.endswith("weights"):
        dtype = torch.bfloat16 if setting.startswith("bf16") else torch.float16
        model = copy.deepcopy(model).to(dtype)
        value = loss(model, x.to(dtype))  # gq_loss casts the inputs itself; CE's forward not
    elif "autocast" in setting:
        dtype = torch.bfloat16 if setting.startswith("bf16") else torch.float16
        with torch.autocast("cpu", dtype=dtype):
            value = loss(model, x)
    else:
        value = loss(model, x)
    return value.detach().double(), flat_grad(model, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["bn_cnn", "hf_vit", "hf_bert"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    by_method: list[tuple[str, str, str, dict[str, float]]] = []
    by_operand: list[tuple[str, str, str, dict[str, float]]] = []
    ce_rows: list[tuple[str, str, dict[str, float]]] = []
    for name in args.models:
        model, x = build(name, args.batch)
        y = torch.arange(x.shape[0]) % CLASSES
        wide = copy.deepcopy(model).to(torch.float64)
        x64 = x.to(torch.float64)
        with sdpa_kernel(SDPBackend.MATH):
            ce_value = F.cross_entropy(wide(x64), y)
            ce_ref = (ce_value.detach(), flat_grad(wide, ce_value))
            refs = {}
            for label, operand, p in OPERANDS:
                value = brute(wide, x64, y, operand, p)
                refs[label] = (value.detach(), flat_grad(wide, value))
        for setting in SETTINGS:
            if "autocast=False" not in setting:
                got = run_setting(setting, model, x, lambda m, t, y=y: F.cross_entropy(m(t), y))
                ce_rows.append((name, setting, errors(*got, ce_ref)))
            off = {"autocast": False} if "autocast=False" in setting else {}
            for method in METHODS:
                options = {"method": method, **off}
                got = run_setting(
                    setting, model, x, lambda m, t, y=y, o=options: gq_loss(m, t, y, **o)
                )
                by_method.append((name, setting, method, errors(*got, refs["softmax, L1"])))
            for label, operand, p in OPERANDS[1:]:
                options = {"method": "loop", "operand": operand, "p": p, **off}
                got = run_setting(
                    setting, model, x, lambda m, t, y=y, o=options: gq_loss(m, t, y, **o)
                )
                by_operand.append((name, setting, label, errors(*got, refs[label])))
        print(f"# {name} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    def pct(v: float) -> str:
        return f"{100 * v:.2g} %" if v >= 1e-3 else f"{100 * v:.1e} %"

    def table(title: str, rows: list[Any], key: str) -> None:
        print(f"\n{title}\n")
        print(f"| model | setting | {key} | GQ value error | GQ gradient error | cosine |")
        print("|---|---|---|---|---|---|")
        for name, setting, what, e in rows:
            print(
                f"| {name} | {setting} | {what} | {pct(e['value'])} | {pct(e['grad'])} | "
                f"{e['cos']:.4f} |"
            )

    print(f"batch {args.batch}, N = {CLASSES}, eval mode, torch {torch.__version__}")
    print("\nCE (for comparison)\n")
    print("| model | setting | CE value error | CE gradient error | cosine |")
    print("|---|---|---|---|---|")
    for name, setting, e in ce_rows:
        print(f"| {name} | {setting} | {pct(e['value'])} | {pct(e['grad'])} | {e['cos']:.4f} |")
    table("GQ by method (softmax, L1: the default)", by_method, "method")
    table("GQ by operand (method loop)", by_operand, "operand")
    broken = sorted(
        {(n, s) for n, s, _, e in by_method + by_operand if not math.isfinite(e["grad"])}
    )
    if broken:
        print(f"\nNon-finite GQ gradients (NaN or inf) in: {broken}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
