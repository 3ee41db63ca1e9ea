"""GQ's training step in float32 and under CPU bf16 autocast, as ratios to the CE step.

Every row is a full training step (forward, loss, backward; no optimiser step) on the same model
and batch, in float32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``; all rows of both
precisions are timed side by side in one process, in interleaved rounds (each round starts with
another row), medians. One thread.

    python benchmarks/bench_amp.py                      # the table in docs/benchmarks.md
    python benchmarks/bench_amp.py --profile loop       # where one bf16 loop step spends its time
    python benchmarks/bench_amp.py --compiled           # a torch.compile'd step against eager
    python benchmarks/bench_amp.py --contiguous --rows ce loop   # the same net, not channels_last
    python benchmarks/bench_amp.py --sum-check          # BatchNorm's double-backward reduction
    python benchmarks/bench_amp.py --breakdown --batch 32   # convolutions against the other ops

Rows: ``ce``; exact GQ by ``auto``, ``loop``, ``batched``, ``jacrev``; ``sampled_k1``
(``estimator="sampled", num_sampled=1``); ``loop_gq_fp32``: the bf16 step with GQ's own passes in
float32 (``autocast=False``; in the float32 column it is plain ``loop``).

Model ``wide_bn`` (default): ``examples/models.py``'s ``SmallCNN`` at widths 64/256/256 (3
conv-BatchNorm-ReLU-maxpool stages); ``--model NAME`` takes a network of ``examples/models.py``
(``fast_cnn``: the study's airbench-style net, BatchNorm and GELU). Train mode, channels_last
(``--contiguous``: not), 32x32 inputs, N = 10.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import _examples_path  # noqa: F401  (puts examples/ on sys.path)
import torch
import torch.nn.functional as F
from models import SmallCNN, build_model
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from gq_loss import gq_loss
from gq_loss.kernels import auto_choice

Step = Callable[[nn.Module, Tensor, Tensor], None]


def build(
    batch: int, classes: int, contiguous: bool = False, name: str = "wide_bn"
) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    fmt = torch.contiguous_format if contiguous else torch.channels_last
    net = (
        SmallCNN(classes, widths=(64, 256, 256))
        if name == "wide_bn"
        else build_model(name, classes)
    )
    model = net.train().to(memory_format=fmt)
    x = torch.rand(batch, 3, 32, 32).contiguous(memory_format=fmt)
    return model, x, torch.randint(0, classes, (batch,))


def make_steps() -> dict[str, Step]:
    def ce(model: nn.Module, x: Tensor, y: Tensor) -> None:
        F.cross_entropy(model(x), y).backward()

    def gq(**options: Any) -> Step:
        def step(model: nn.Module, x: Tensor, y: Tensor) -> None:
            value, logits = gq_loss(model, x, y, return_logits=True, **options)
            (F.cross_entropy(logits, y) + value).backward()

        return step

    return {
        "ce": ce,
        "auto": gq(),
        "loop": gq(method="loop"),
        "batched": gq(method="batched"),
        "jacrev": gq(method="jacrev"),
        "sampled_k1": gq(estimator="sampled", num_sampled=1),
        "loop_gq_fp32": gq(method="loop", autocast=False),
    }


def precision(bf16: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def once(step: Step, model: nn.Module, x: Tensor, y: Tensor, bf16: bool) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with precision(bf16):
        step(model, x, y)
    return time.perf_counter() - start


def interleaved_medians(
    steps: dict[str, Step],
    rows: list[tuple[str, bool]],
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    repeats: int,
    label: str = "",
) -> dict[tuple[str, bool], float]:
    """Median seconds of each ``(step name, bf16)`` row over ``repeats`` rounds after a warm-up
    round; each round starts with another row."""
    times: dict[tuple[str, bool], list[float]] = {r: [] for r in rows}
    for r in range(1 + repeats):
        k = r % len(rows)
        for name, bf16 in rows[k:] + rows[:k]:
            seconds = once(steps[name], model, x, y, bf16)
            if r:
                times[name, bf16].append(seconds)
        print(f"# {label}round {r} done", file=sys.stderr, flush=True)
    return {row: statistics.median(v) for row, v in times.items()}


def table(args: argparse.Namespace) -> None:
    model, x, y = build(args.batch, args.classes, args.contiguous, args.model)
    steps = make_steps()
    rows = [(k, bf16) for bf16 in (False, True) for k in steps if k in args.rows]
    times: dict[tuple[str, bool], list[float]] = {r: [] for r in rows}
    errors: dict[tuple[str, bool], str] = {}
    chose: dict[bool, str] = {}
    for r in range(1 + args.repeats):  # round 0 is the warm-up (and auto's probe)
        for key in rows[r % len(rows) :] + rows[: r % len(rows)]:
            if key in errors:
                continue
            try:
                seconds = once(steps[key[0]], model, x, y, key[1])
            except RuntimeError as err:
                errors[key] = f"error: {err}"[:120]
                continue
            if key[0] == "auto":
                choice = auto_choice(model)
                chose[key[1]] = choice.method if choice is not None else "?"
            if r:
                times[key].append(seconds)
        print(f"# round {r} done", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(
        f"{args.model} ({'contiguous' if args.contiguous else 'channels_last'}, "
        f"train mode), batch {args.batch}, "
        f"N = {args.classes}, 1 thread, {args.repeats} rounds, torch {torch.__version__}\n"
    )
    print("| step | float32 ms | x CE | bf16 autocast ms | x CE | bf16 / float32 ratio to CE |")
    print("|---|---|---|---|---|---|")
    for k in steps:
        if k not in args.rows:
            continue
        cells = []
        for bf16 in (False, True):
            if (k, bf16) in med:
                ms, ce = med[k, bf16], med.get(("ce", bf16), float("nan"))
                cells.append((f"{1e3 * ms:.0f}", f"{ms / ce:.1f}x"))
            else:
                cells.append((errors.get((k, bf16), "n/a"), ""))
        ratio = ""
        if all((k, b) in med and ("ce", b) in med for b in (False, True)):
            ratio = f"{(med[k, True] / med['ce', True]) / (med[k, False] / med['ce', False]):.2f}"
        name = (
            f"{k} (auto chose {chose.get(False, '?')} / {chose.get(True, '?')})"
            if k == "auto"
            else k
        )
        print(
            f"| {name} | {cells[0][0]} | {cells[0][1]} | {cells[1][0]} | {cells[1][1]} | {ratio} |"
        )


def profile(args: argparse.Namespace) -> None:
    """The ops of one bf16 (and one float32) step of `args.profile`, by self CPU time."""
    model, x, y = build(args.batch, args.classes, args.contiguous, args.model)
    step = make_steps()[args.profile]
    for bf16 in (False, True):
        once(step, model, x, y, bf16)  # warm-up
        for _ in range(2):  # the first profiled step of a process runs 2x slower: not shown
            with torch.profiler.profile(record_shapes=True) as prof:
                once(step, model, x, y, bf16)
        print(f"\n## {args.profile}, {'bf16 autocast' if bf16 else 'float32'}\n")
        print(
            prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40
            )
        )


class _OpTimer(TorchDispatchMode):
    """Seconds per kind of aten op: convolutions (forward and backward), ops with operands of
    two floating dtypes (float32 and bf16), and the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = {"conv": 0.0, "mixed": 0.0, "other": 0.0}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        seconds = time.perf_counter() - start
        dtypes = {a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point()}
        name = func.__name__
        kind = "conv" if name.startswith("convolution") else "mixed" if len(dtypes) > 1 else "other"
        self.seconds[kind] += seconds
        return out


def breakdown(args: argparse.Namespace) -> None:
    """Where the bf16 time goes: CE and loop steps split into convolutions and the other ops, on
    the net as it is, with BatchNorm in eval mode, and with its normalisation layers removed."""
    steps = make_steps()
    layout = "contiguous" if args.contiguous else "channels_last"
    print(f"{args.model}, {layout}, batch {args.batch}, N = {args.classes}, 1 thread; "
          f"ms of one step (medians of {args.repeats}), and of its aten ops by kind (one step)\n")  # fmt: skip
    print("| net | step | float32 ms | bf16 ms | convolutions f32 → bf16 | other ops f32 → bf16 "
          "| of which mixed-dtype (bf16) | loop ÷ CE f32 / bf16 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for variant in ("BatchNorm, train mode", "BatchNorm, eval mode", "no normalisation"):
        model, x, y = build(args.batch, args.classes, args.contiguous, args.model)
        if variant.startswith("no"):
            for name, module in list(model.named_modules()):
                if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                    model.set_submodule(name, nn.Identity())
        if "eval" in variant:
            model.eval()
        rows = [(k, bf16) for bf16 in (False, True) for k in ("ce", "loop")]
        med = interleaved_medians(steps, rows, model, x, y, args.repeats, f"{variant}: ")
        kinds = {}
        for key in rows:
            with _OpTimer() as timer:
                once(steps[key[0]], model, x, y, key[1])
            kinds[key] = timer.seconds
        ratio = [med["loop", b] / med["ce", b] for b in (False, True)]
        ratios = {
            "ce": "",
            "loop": f"{ratio[0]:.1f}x / {ratio[1]:.1f}x ({ratio[1] / ratio[0]:.2f})",
        }
        for step in ("ce", "loop"):
            f, b = kinds[step, False], kinds[step, True]
            other_f, other_b = f["other"] + f["mixed"], b["other"] + b["mixed"]
            print(f"| {variant} | {step} | {1e3 * med[step, False]:.0f} | {1e3 * med[step, True]:.0f} "
                  f"| {1e3 * f['conv']:.0f} → {1e3 * b['conv']:.0f} "
                  f"| {1e3 * other_f:.0f} → {1e3 * other_b:.0f} | {1e3 * b['mixed']:.0f} "
                  f"| {ratios[step]} |", flush=True)  # fmt: skip


def compiled(args: argparse.Namespace) -> None:
    """A compiled CE + GQ step (GQ is a graph break: it runs eagerly) against the eager step."""
    model, x, y = build(args.batch, args.classes, args.contiguous, args.model)
    steps = make_steps()
    step = steps[args.compiled_row]
    compiled_step = torch.compile(step)
    compiled_ce = torch.compile(steps["ce"])
    rows = {"ce eager": steps["ce"], "ce compiled": compiled_ce,
            f"{args.compiled_row} eager": step, f"{args.compiled_row} compiled": compiled_step}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in rows}
    start = time.perf_counter()
    for fn in rows.values():  # warm-up: compiles
        once(fn, model, x, y, False)
    print(f"# compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    order = list(rows)
    for r in range(args.repeats):
        for k in order[r % len(order) :] + order[: r % len(order)]:
            times[k].append(once(rows[k], model, x, y, False))
    print(f"compiled vs eager step, float32, batch {args.batch}, N = {args.classes}, 1 thread\n")
    print("| step | ms | x eager CE |")
    print("|---|---|---|")
    ce = statistics.median(times["ce eager"])
    for k, ts in times.items():
        print(f"| {k} | {1e3 * statistics.median(ts):.0f} | {statistics.median(ts) / ce:.2f}x |")


def sum_check(args: argparse.Namespace) -> None:
    """`t.sum(0, keepdim=True)`, the reduction that BatchNorm's train-mode double backward runs
    9 times per class and layer (`sum_exclude_dim1` in torch's FunctionsManual.cpp), on an
    activation of the net, by memory format and dtype."""
    print("| tensor | dtype | contiguous ms | channels_last ms |")
    print("|---|---|---|---|")
    for shape in ((args.batch, 64, 32, 32), (args.batch, 256, 16, 16)):
        for dtype in (torch.float32, torch.bfloat16):
            cells = []
            for fmt in (torch.contiguous_format, torch.channels_last):
                t = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
                t.sum(0, keepdim=True)
                start = time.perf_counter()
                for _ in range(20):
                    t.sum(0, keepdim=True)
                cells.append(f"{(time.perf_counter() - start) / 20 * 1e3:.2f}")
            print(f"| {tuple(shape)} | {str(dtype)[6:]} | {cells[0]} | {cells[1]} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--model", default="wide_bn", help="wide_bn, or a name of examples/models.py"
    )
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", nargs="+", default=list(make_steps()))
    parser.add_argument("--profile", choices=list(make_steps()))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--contiguous", action="store_true", help="not channels_last")
    parser.add_argument("--sum-check", action="store_true", help="time BatchNorm's reduction")
    parser.add_argument("--compiled-row", default="loop")
    parser.add_argument(
        "--breakdown", action="store_true", help="convolutions against the other ops, by precision"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.sum_check:
        sum_check(args)
    elif args.breakdown:
        breakdown(args)
    elif args.profile:
        profile(args)
    elif args.compiled:
        compiled(args)
    else:
        table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
