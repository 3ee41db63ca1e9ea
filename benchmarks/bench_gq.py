"""Training-step cost of the Gradient Quotient, as ratios to a plain cross-entropy step.

Every row is a full training step on the same model and batch (forward, loss, backward; no
optimiser step), timed side by side in one process with interleaved repeats; the table gives
medians and the ratios to the CE step and to a plainly written per-class loop. ``--memory`` runs
each configuration in a fresh subprocess and reports the step's peak resident memory above the
process's memory before the step (CPU; on CUDA the allocator's peak).

    python benchmarks/bench_gq.py                         # small CNN and ResNet-18, N = 10 and 100
    python benchmarks/bench_gq.py --models small_cnn --classes 100 --memory --chunk-sizes 5 10 25
    python benchmarks/bench_gq.py --device cuda --amp     # bf16 autocast; adds peak CUDA memory
    python benchmarks/bench_gq.py --models hf_vit hf_bert --classes 10 --only loop  # HF models

``hf_<name>`` is a Hugging Face classifier of ``tests/test_zoo.py`` built from the same small
config there (random weights, nothing downloaded; needs ``transformers``): images ``(3, 32, 32)``,
text models on input embeddings ``(6 tokens, width 32)`` with an attention mask.

`benchmarks/gpu_check.py` reuses `measure()` for its kernel table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import _examples_path  # noqa: F401  (puts examples/ on sys.path)
import torch
import torch.nn.functional as F
from models import build_model

from gq_loss import gq_loss
from gq_loss.kernels import auto_choice

LAM = 1.0  # any non-zero weight: the cost does not depend on it
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, or the Hugging Face ``logits`` field."""
    return out if isinstance(out, torch.Tensor) else out["logits"]


class PatchViT(torch.nn.Module):
    """A ViT for 32x32 images on `nn.TransformerEncoder` (attention through SDPA): 4x4 patches,
    a class token, pre-norm layers, no dropout. ``vit_tiny``: width 16, 1 layer (CPU dry runs);
    ``vit_small``: width 192, 6 layers, 3 heads (DeiT-Tiny's shape on 64 patches)."""

    def __init__(self, num_classes: int, dim: int, depth: int, heads: int, patch: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = torch.nn.Parameter(0.02 * torch.randn(1, 1 + (32 // patch) ** 2, dim))
        layer = torch.nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens)[:, 0]))


VITS = {
    "vit_tiny": {"dim": 16, "depth": 1, "heads": 2},
    "vit_small": {"dim": 192, "depth": 6, "heads": 3},
}


def build_zoo_model(
    name: str, num_classes: int, batch: int
) -> tuple[torch.nn.Module, torch.Tensor]:
    """Hugging Face model ``name`` of tests/test_zoo.py with ``num_classes`` outputs, and a batch."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    try:
        import test_zoo
    except BaseException as err:  # pytest.importorskip raises a Skipped (not an Exception)
        raise SystemExit(f"hf_{name} needs transformers (pip install -e '.[hf]'): {err}") from None
    if name not in test_zoo.ALL:
        raise SystemExit(
            f"unknown zoo model hf_{name}; choose from {['hf_' + k for k in test_zoo.ALL]}"
        )
    test_zoo.CLASSES = num_classes  # read by build() when it makes the config
    model, inputs = test_zoo.build(name)
    if isinstance(model, test_zoo.Embedded):  # a mask row for each sample, some padded
        mask = torch.ones(batch, test_zoo.TEXT[0], dtype=torch.long)
        mask[1::2, -2:] = 0
        model = test_zoo.Embedded(model.model, mask)
    return model, inputs(batch)


def naive_loop_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Eq. 7 as a user would write it: one autograd.grad(create_graph=True) per class."""
    x = x.detach().requires_grad_(True)
    logits = logits_of(model(x))
    probs = logits.softmax(dim=1)
    norms = torch.stack(
        [
            torch.autograd.grad(probs[:, j].sum(), x, create_graph=True)[0].abs().flatten(1).sum(1)
            for j in range(probs.shape[1])
        ],
        dim=1,
    )
    num = norms.gather(1, y[:, None]).squeeze(1)
    gq = (num / (norms.sum(1) - num + 1e-12)).mean()
    (F.cross_entropy(logits, y) + LAM * gq).backward()


def make_steps(chunk_sizes: list[int], num_classes: int) -> dict[str, Callable[..., None]]:
    def ce(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        F.cross_entropy(logits_of(model(x)), y).backward()

    def gq(**options: object) -> Callable[..., None]:
        def step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
            value, logits = gq_loss(model, x, y, return_logits=True, **options)  # type: ignore[arg-type]
            (F.cross_entropy(logits, y) + LAM * value).backward()

        return step

    steps: dict[str, Callable[..., None]] = {
        "ce": ce,
        "naive_loop": naive_loop_step,
        "auto": gq(),
        "loop": gq(method="loop"),
        "batched": gq(method="batched"),
        "jacrev": gq(method="jacrev"),
    }
    for c in chunk_sizes:
        if c < num_classes:
            steps[f"recompute_c{c}"] = gq(method="recompute", chunk_size=c)
    steps["reference"] = gq(formulation="reference")
    if num_classes > 11:
        steps["sampled_k10"] = gq(estimator="sampled", num_sampled=10)
    return steps


def setup(name: str, num_classes: int, batch: int, device: str) -> tuple:
    if name.startswith("hf_"):
        model, x = build_zoo_model(name[3:], num_classes, batch)
        model, x = model.to(device).train(), x.to(device)
    else:
        torch.manual_seed(0)
        model = (
            PatchViT(num_classes, **VITS[name]) if name in VITS else build_model(name, num_classes)
        )
        model = model.to(device).train()
        x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    return model, x, y


def run_once(
    step: Callable[..., None],
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: bool = False,
) -> float:
    """Seconds of one step; ``amp``: under bf16 autocast on the batch's device."""
    model.zero_grad(set_to_none=True)
    autocast = (
        torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    )
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast:
        step(model, x, y)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(
    name: str,
    num_classes: int,
    batch: int,
    steps: dict[str, Callable[..., None]],
    *,
    device: str,
    repeats: int,
    amp: bool = False,
    deadline: float | None = None,
) -> list[dict]:
    """Median time of every step of ``steps`` (which must hold ``"ce"``) on one model and batch.

    Interleaved repeats, so drifts in machine load hit every row alike. Rows: ``ms``, ``x_ce``,
    ``x_naive``, ``chose`` (the ``auto`` row: the method it chose; its timing probe runs in the
    warm-up) and, on CUDA, ``peak_mib`` (the allocator's peak during the step, above the
    memory held before it). A step that runs out of memory gets ``status="oom"``, one that fails
    ``status="error: ..."``; steps not
    started before ``deadline`` (a ``time.perf_counter()`` value) get ``status="skipped: budget"``.
    """
    model, x, y = setup(name, num_classes, batch, device)
    cuda = x.is_cuda
    status = {k: "ok" for k in steps}
    peak: dict[str, float] = {}
    times: dict[str, list[float]] = {k: [] for k in steps}

    def attempt(k: str) -> None:
        if status[k] != "ok":
            return
        if deadline is not None and time.perf_counter() > deadline:
            status[k] = "skipped: budget"
            return
        if cuda:
            model.zero_grad(set_to_none=True)  # the previous step's .grad is not this step's
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        try:
            seconds = run_once(steps[k], model, x, y, amp)
        except torch.OutOfMemoryError:
            status[k] = "oom"
            model.zero_grad(set_to_none=True)
            return
        except RuntimeError as err:  # recorded in the table; the other rows still run
            status[k] = f"error: {err}"[:200]
            model.zero_grad(set_to_none=True)
            return
        if cuda:
            peak[k] = max(peak.get(k, 0.0), (torch.cuda.max_memory_allocated() - before) / 2**20)
        times[k].append(seconds)

    for k in steps:  # warm-up (also the memory peak)
        attempt(k)
        times[k].clear()
    order = list(steps)
    for r in range(repeats):  # each round starts with another row, so none is always first
        for k in order[r % len(order) :] + order[: r % len(order)]:
            attempt(k)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    choice = auto_choice(model)
    chose = choice.method if choice is not None and "auto" in steps else ""
    rows = []
    for k in steps:
        ms = med.get(k)
        rows.append(
            dict(model=name, N=num_classes, batch=batch, amp=amp, step=k,
                 status=status[k] if ms is None or status[k] != "ok" else "ok",
                 ms=float("nan") if ms is None else 1e3 * ms,
                 x_ce=float("nan") if ms is None or "ce" not in med else ms / med["ce"],
                 x_naive=ms / med["naive_loop"] if ms and "naive_loop" in med else float("nan"),
                 peak_mib=peak.get(k, float("nan")), chose=chose if k == "auto" else "",
                 samples=times[k])
        )  # fmt: skip
    return rows


def auto_against_fastest(rows: list[dict]) -> dict | None:
    """The ``auto`` row of one table against its fastest exact method (``loop``, ``batched``,
    ``jacrev``, ``recompute_c*``): ``chose``, ``fastest``, ``x_fastest`` (auto's median time
    over the fastest's) and ``x_fastest_paired`` (the median over the rounds of auto's time over
    the fastest's in the same round: load drifts cancel); ``None`` without those rows."""
    ok = {r["step"]: r for r in rows if r["status"] == "ok"}
    exact = [
        r for k, r in ok.items() if k in ("loop", "batched", "jacrev") or k.startswith("recompute")
    ]
    if "auto" not in ok or not exact:
        return None
    best = min(exact, key=lambda r: r["ms"])
    auto = ok["auto"]
    paired = [a / b for a, b in zip(auto["samples"], best["samples"], strict=False)]
    return {
        "chose": auto["chose"],
        "fastest": best["step"],
        "x_fastest": auto["ms"] / best["ms"],
        "x_fastest_paired": statistics.median(paired) if paired else float("nan"),
    }


def time_table(args: argparse.Namespace, name: str, num_classes: int, batch: int) -> list[dict]:
    steps = make_steps(args.chunk_sizes, num_classes)
    if args.only:
        steps = {k: v for k, v in steps.items() if k in args.only or k == "ce"}
    return measure(
        name, num_classes, batch, steps, device=args.device, repeats=args.repeats, amp=args.amp
    )


def memory_probe(
    name: str, num_classes: int, batch: int, step_name: str, chunks: list[int]
) -> None:
    """Runs one step in this (fresh) process; prints its peak memory above the pre-step level."""
    model, x, y = setup(name, num_classes, batch, "cpu")
    step = make_steps(chunks, num_classes)[step_name]
    run_once(make_steps([], num_classes)["ce"], model, x, y)
    model.zero_grad(set_to_none=True)
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    run_once(step, model, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_mib": max(peak - before, 0) / 2**20}))


def memory_table(args: argparse.Namespace, name: str, num_classes: int, batch: int) -> list[dict]:
    names = ["ce", "naive_loop", "loop", "auto", "jacrev"] + [
        f"recompute_c{c}" for c in args.chunk_sizes if c < num_classes
    ]
    if num_classes > 11:
        names.append("sampled_k10")
    rows = []
    for step_name in names:
        out = subprocess.run(
            [sys.executable, __file__, "--_probe", name, str(num_classes), str(batch), step_name,
             *map(str, args.chunk_sizes)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append(dict(model=name, N=num_classes, batch=batch, step=step_name,
                         peak_mib=json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]))  # fmt: skip
    return rows


def value_and_grad(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, params: list, **options: object
) -> tuple[float, torch.Tensor]:
    """GQ of the batch and its flattened parameter gradient."""
    value = gq_loss(model, x, y, **options)  # type: ignore[arg-type]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return float(value.detach()), torch.cat([g.flatten() for g in grads if g is not None])


def estimator_error(
    args: argparse.Namespace, name: str, num_classes: int, batch: int
) -> list[dict]:
    """Error of ``estimator="sampled"`` against exact Eq. 7 on one batch: relative error of the
    batch mean and cosine of the parameter gradients, over several draws, for the model at
    initialisation and with a peaked softmax (last layer scaled by 100)."""
    rows = []
    for state in ("init", "peaked"):
        model, x, y = setup(name, num_classes, batch, args.device)
        model.eval()  # per-sample definition; BatchNorm statistics untouched
        if state == "peaked":
            last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
            with torch.no_grad():
                last.weight.mul_(100.0)
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            max_prob = float(model(x).softmax(1).max(1).values.mean())

        exact, g_exact = value_and_grad(model, x, y, params)
        for k in args.num_sampled:
            errors, cosines = [], []
            for draw in range(args.draws):
                gen = torch.Generator(device=x.device).manual_seed(draw)
                value, g = value_and_grad(
                    model, x, y, params, estimator="sampled", num_sampled=k, generator=gen
                )
                errors.append(100 * abs(value - exact) / exact)
                cosines.append(float(F.cosine_similarity(g, g_exact, dim=0)))
            rows.append(dict(model=name, N=num_classes, state=state, max_prob=max_prob, K=k, exact_gq=exact,
                             mean_err_pct=statistics.mean(errors), max_err_pct=max(errors),
                             min_cosine=min(cosines), mean_cosine=statistics.mean(cosines)))  # fmt: skip
    return rows


def print_markdown(rows: list[dict], columns: list[str]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--classes", nargs="+", type=int, default=[10, 100])
    parser.add_argument("--batch-size", type=int, default=64, help="batch of the small CNN")
    parser.add_argument("--resnet-batch-size", type=int, default=16, help="batch of the ResNets")
    parser.add_argument("--hf-batch-size", type=int, default=16, help="batch of the hf_ models")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-sizes", nargs="+", type=int, default=[10, 25])
    parser.add_argument("--only", nargs="+", help="time only these rows (and ce)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="time the steps under bf16 autocast")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (CPU)")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument(
        "--estimator-error",
        action="store_true",
        help="measure the sampled estimator against exact GQ instead of timing",
    )
    parser.add_argument("--num-sampled", nargs="+", type=int, default=[10])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--_probe", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._probe:
        name, n, b, step_name, *chunks = args._probe
        memory_probe(name, int(n), int(b), step_name, [int(c) for c in chunks])
        return
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    for name in args.models:
        batch = args.batch_size if name.startswith("small") else args.resnet_batch_size
        batch = args.hf_batch_size if name.startswith("hf_") else batch
        for n in args.classes:
            if args.estimator_error:
                print(
                    f"\n### {name}, N={n}, batch {batch}: sampled estimator vs exact, {args.draws} draws"
                )
                print_markdown(estimator_error(args, name, n, batch),
                               ["state", "max_prob", "K", "exact_gq", "mean_err_pct", "max_err_pct",
                                "mean_cosine", "min_cosine"])  # fmt: skip
                continue
            if not args.no_timing:
                print(
                    f"\n### {name}, N={n}, batch {batch}: median of {args.repeats} interleaved steps"
                )
                columns = ["step", "ms", "x_ce", "x_naive"]
                columns += ["peak_mib", "status"] if args.device.startswith("cuda") else []
                rows = time_table(args, name, n, batch)
                if "status" not in columns and any(r["status"] != "ok" for r in rows):
                    columns.append("status")
                print_markdown(rows, columns)
                versus = auto_against_fastest(rows)
                if versus:
                    print(
                        f"\nauto chose {versus['chose']}; fastest exact: {versus['fastest']}; "
                        f"auto / fastest = {versus['x_fastest']:.2f}x (medians), "
                        f"{versus['x_fastest_paired']:.2f}x (median of per-round ratios)"
                    )
            if args.memory and args.device == "cpu":
                print(
                    f"\n### {name}, N={n}, batch {batch}: peak memory of one step above the pre-step RSS"
                )
                print_markdown(memory_table(args, name, n, batch), ["step", "peak_mib"])


if __name__ == "__main__":
    main()
