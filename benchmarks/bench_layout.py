"""Exact GQ on channels_last CNNs on the CPU: GQ's passes in the default layout (what gq-loss
does) against passes in channels_last (what it did before), side by side.

On the CPU, gq-loss runs the convolutions of its own passes on contiguous copies of channels_last
operands, so the passes and their double backward run in the default layout
(`gq_loss._torch_internals._ContiguousConvolutions`). This script measures what that changes,
on models in channels_last (weights and inputs), train mode, N = 10, one thread:

- time: a full training step (forward, CE + GQ by ``method="loop"``, backward), float32 and
  under CPU bf16 autocast, the two layouts and the CE step interleaved in rounds (each round
  starts with another row; medians after a warm-up round);
- precision: the float32 parameter gradient of GQ (``--precision-batch`` images) against the
  same model's float64 gradient, ``||g - g64|| / ||g64||``.

The old behaviour is obtained by patching ``gq_loss._torch_internals.channels_last_on_cpu`` to
return False.

    python benchmarks/bench_layout.py                         # the table in docs/benchmarks.md
    python benchmarks/bench_layout.py --models wide_bn --batch 8 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from bench_amp import build, interleaved_medians
from torch import Tensor, nn

from gq_loss import _torch_internals
from gq_loss import gq_loss as gq


@contextlib.contextmanager
def passes(layout: str) -> Iterator[None]:
    """``"default"``: gq-loss as it is; ``"channels_last"``: its passes left in channels_last."""
    saved = _torch_internals.channels_last_on_cpu
    if layout == "channels_last":
        _torch_internals.channels_last_on_cpu = lambda model, x: False
    try:
        yield
    finally:
        _torch_internals.channels_last_on_cpu = saved


def ce_step(model: nn.Module, x: Tensor, y: Tensor) -> None:
    F.cross_entropy(model(x), y).backward()


def gq_step(layout: str) -> Callable[[nn.Module, Tensor, Tensor], None]:
    def step(model: nn.Module, x: Tensor, y: Tensor) -> None:
        with passes(layout):
            value, logits = gq(model, x, y, return_logits=True, method="loop")
        (F.cross_entropy(logits, y) + value).backward()

    return step


def gradient_error(name: str, batch: int, layout: str) -> float:
    model, x, y = build(batch, 10, name=name)
    ref = copy.deepcopy(model).double()

    def grad(m: nn.Module, inputs: Tensor) -> Tensor:
        m.zero_grad(set_to_none=True)
        gq(m, inputs, y, method="loop").backward()
        return torch.cat([q.grad.double().flatten() for q in m.parameters() if q.grad is not None])

    want = grad(ref, x.double())
    with passes(layout):
        got = grad(model, x)
    return ((got - want).norm() / want.norm()).item()


def table(args: argparse.Namespace, name: str) -> None:
    model, x, y = build(args.batch, 10, name=name)
    steps = {
        "ce": ce_step,
        "default": gq_step("default"),
        "channels_last": gq_step("channels_last"),
    }
    rows = [(k, bf16) for bf16 in (False, True) for k in steps]
    med = interleaved_medians(steps, rows, model, x, y, args.repeats, f"{name}: ")
    errors = {
        lay: gradient_error(name, args.precision_batch, lay) for lay in ("default", "channels_last")
    }
    for lay, label in (
        ("channels_last", "channels_last (before)"),
        ("default", "default layout (now)"),
    ):
        cells = [
            f"{1e3 * med[lay, b]:.0f} ms, {med[lay, b] / med['ce', b]:.1f}x" for b in (False, True)
        ]
        print(f"| {name} | {label} | {cells[0]} | {cells[1]} | {errors[lay]:.1e} |", flush=True)
    speedup = [med["channels_last", b] / med["default", b] for b in (False, True)]
    print(f"| {name} | speed-up | {speedup[0]:.2f}x (CE {1e3 * med['ce', False]:.0f} ms) | "
          f"{speedup[1]:.2f}x (CE {1e3 * med['ce', True]:.0f} ms) | |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=["wide_bn", "fast_cnn", "resnet18", "small_cnn_gn"]
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, batch {args.batch}, 1 thread, {args.repeats} rounds; "
          f"gradient error at batch {args.precision_batch}\n")  # fmt: skip
    print("| model | GQ's passes | float32 step, x CE | bf16 autocast step, x CE | "
          "float32 GQ gradient error vs float64 |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name in args.models:
        table(args, name)


if __name__ == "__main__":
    main()
