"""One-shot GPU check: verify and time every GQ path on one GPU, in at most 8 minutes.

    python benchmarks/gpu_check.py --out-dir gpu_report            # on a machine with a GPU
    python benchmarks/gpu_check.py --dry-run --out-dir /tmp/gpu    # the same pipeline, tiny, CPU

Writes ``DIR/report.md`` (tables) and ``DIR/report.json`` (every number), and prints progress.
Stages, each with its own time allowance (a stage, or a row of the kernel table, that would start
after its allowance is spent is recorded as ``skipped: budget``; a subprocess that runs over its
allowance is stopped and recorded as ``stopped: budget``):

1. ``pytest -m cuda``: the CUDA tests, including device parity of every method (``jacrev``
   included) against the CPU float64 oracle.
2. Kernel table: a small ViT first (``bench_gq.PatchViT`` ``vit_small``: `nn.TransformerEncoder`,
   attention through SDPA, whose fused CUDA kernels have no double backward: GQ's passes run
   the math backend), batch 128, N = 10, within its own allowance; then CIFAR ResNet-18
   (``examples/models.py``), batch 128, N = 10 and 100; float32 and bf16 autocast: time as a
   multiple of the CE step and peak CUDA memory for ``loop``, ``batched``, ``jacrev``,
   ``recompute`` (chunk 10), ``sampled`` (K = 10, N > 11 only) and the authors' ``reference``
   formulation (timing code: ``bench_gq.measure``).
3. ODIN scoring throughput against its floor (``benchmarks/bench_odin.py``).
4. A few hundred steps of ``examples/train_cifar.py --amp`` (ResNet-18 on CIFAR-10 from
   ``--data-dir`` when there, else ``--smoke``'s small CNN on generated data): loss and GQ must
   stay finite, and the GQ of the trained model under bf16 autocast must agree with float32
   within ``--bf16-rtol``.

5. AMP training steps: every method (``loop``, ``batched``, ``jacrev``, ``recompute``, ``auto``)
   and the sampled estimator (K = 1), one CE + GQ step each on the ViT and the CNN, under bf16
   autocast and under fp16 autocast with ``torch.amp.GradScaler``: GQ and the unscaled
   gradients must be finite and the GQ value within ``--bf16-rtol`` of float32 (the dry run
   does the same under CPU autocast, where fp16 runs too).

The report ends with the fastest exact method per setting and what ``method="auto"`` chose
there (its one-time timing probe runs on the GPU in the warm-up of its row), with its time over
the fastest's.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]  # this checkout's gq_loss, installed or not
import bench_gq  # noqa: E402  (puts examples/ on the path too)
from models import build_model  # noqa: E402

from gq_loss import gq_loss  # noqa: E402

KERNEL_ROWS = (
    "ce", "auto", "loop", "batched", "jacrev", "recompute_c10", "sampled_k10", "reference",
)  # fmt: skip
EXACT = ("loop", "batched", "jacrev", "recompute_c10")

# (seconds allowed per stage) on a GPU and in the dry run; the sum stays under the 8-minute cap.
# "vit" is the attention model's share, spent inside the kernel stage before the ResNet rows.
BUDGET = {"pytest": 90, "vit": 45, "kernels": 160, "odin": 40, "train": 100, "amp": 30}
DRY_BUDGET = {"pytest": 20, "vit": 15, "kernels": 35, "odin": 25, "train": 30, "amp": 20}
#: The steps of the AMP stage: every method and the sampled estimator.
AMP_STEPS: dict[str, dict[str, Any]] = {
    "loop": {"method": "loop"},
    "batched": {"method": "batched"},
    "jacrev": {"method": "jacrev"},
    "recompute_c5": {"method": "recompute", "chunk_size": 5},
    "auto": {},
    "sampled_k1": {"estimator": "sampled", "num_sampled": 1},
}


class Check:
    """Collects results and progress; writes the report at the end (and after each stage)."""

    def __init__(self, out_dir: str, dry_run: bool) -> None:
        self.out_dir = out_dir
        self.dry_run = dry_run
        self.start = time.perf_counter()
        self.results: dict[str, Any] = {
            "dry_run": dry_run,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "stages": {},
        }
        os.makedirs(out_dir, exist_ok=True)

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", flush=True)

    def record(self, stage: str, result: dict[str, Any]) -> None:
        result["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.results["stages"][stage] = result
        with open(os.path.join(self.out_dir, "report.json"), "w") as f:
            json.dump(self.results, f, indent=2, default=str)


def run_subprocess(cmd: list[str], allowance: float, threads: int | None = None) -> dict:
    """Runs ``cmd`` from the repository root; stops it when ``allowance`` seconds are spent."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    if threads is not None:  # tiny CPU work: one thread avoids oversubscription on a shared CPU
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=allowance, env=env
        )
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        out = done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        status = "stopped: budget"
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    return {
        "command": " ".join(cmd),
        "status": status,
        "seconds": round(time.perf_counter() - started, 1),
        "output_tail": out[-3000:],
    }


# --------------------------------------------------------------------------- stage 1


def stage_pytest(check: Check, allowance: float) -> None:
    xml = os.path.join(os.path.abspath(check.out_dir), "pytest_cuda.xml")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]  # fmt: skip
    if check.dry_run:  # no CUDA here: only the selection and the report are exercised
        cmd += ["tests/test_loss.py", "tests/test_kernels.py"]
    check.log("stage 1: " + " ".join(cmd[1:]))
    result = run_subprocess(cmd, allowance, 1 if check.dry_run else None)
    if os.path.isfile(xml):
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        result["counts"] = counts
        result["summary"] = (
            f"{counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']} "
            f"passed, {counts['failures']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped"
        )
    check.log(f"stage 1: {result['status']}: {result.get('summary')}")
    check.record("pytest_cuda", result)


# --------------------------------------------------------------------------- stage 2


def kernel_rows(
    check: Check, model: str, classes: list[int], batch: int, deadline: float, repeats: int
) -> list[dict]:
    """The kernel table's rows of one model: every N, float32 and bf16 autocast."""
    device = "cpu" if check.dry_run else "cuda"
    rows: list[dict] = []
    for n in classes:
        for amp in (False, True):
            steps = {k: v for k, v in bench_gq.make_steps([10], n).items() if k in KERNEL_ROWS}
            label = f"{model}, N={n}, batch {batch}, {'bf16' if amp else 'fp32'}"
            if time.perf_counter() > deadline:
                rows += [dict(model=model, N=n, batch=batch, amp=amp, step=k,
                              status="skipped: budget") for k in steps]  # fmt: skip
                check.log(f"stage 2: {label}: skipped: budget")
                continue
            check.log(f"stage 2: {label}")
            try:
                table = bench_gq.measure(
                    model, n, batch, steps, device=device,
                    repeats=repeats, amp=amp, deadline=deadline,
                )  # fmt: skip
            except Exception as err:  # recorded, and the next setting still runs
                table = [dict(model=model, N=n, batch=batch, amp=amp, step="*",
                              status=f"error: {type(err).__name__}: {err}"[:300])]  # fmt: skip
            for row in table:
                check.log(
                    f"  {row['step']:<14} {row.get('x_ce', math.nan):8.2f} x CE "
                    f"{row.get('peak_mib', math.nan):10.0f} MiB  {row['status']}"
                )
            rows += table
    return rows


def stage_kernels(
    check: Check, allowance: float, vit_allowance: float, args: argparse.Namespace
) -> None:
    start = time.perf_counter()
    # The attention model first, within its own share: its rows are the point of the first run.
    rows = kernel_rows(check, args.vit_model, [args.classes[0]], args.batch_size,
                       start + vit_allowance, args.repeats)  # fmt: skip
    deadline = start + vit_allowance + allowance
    rows += kernel_rows(check, args.model, args.classes, args.batch_size, deadline, args.repeats)
    fastest = {}
    for model in (args.vit_model, args.model):
        for amp in (False, True):
            for n in args.classes:
                exact = [
                    r for r in rows
                    if r["model"] == model and r["N"] == n and r["amp"] == amp
                    and r["step"] in EXACT and r["status"] == "ok"
                ]  # fmt: skip
                if exact:
                    best = min(exact, key=lambda r: r["ms"])
                    loop = next((r for r in exact if r["step"] == "loop"), None)
                    auto = next(
                        (r for r in rows if r["model"] == model and r["N"] == n
                         and r["amp"] == amp and r["step"] == "auto" and r["status"] == "ok"),
                        None,
                    )  # fmt: skip
                    fastest[f"{model} N={n} {'bf16' if amp else 'fp32'}"] = {
                        "method": best["step"],
                        "x_loop": best["ms"] / loop["ms"] if loop else math.nan,
                        "auto": auto["chose"] if auto else None,
                        "auto_x_fastest": auto["ms"] / best["ms"] if auto else math.nan,
                    }
    check.record("kernels", {"rows": rows, "fastest_exact": fastest})


# --------------------------------------------------------------------------- stage 3


def stage_odin(check: Check, allowance: float) -> None:
    if check.dry_run:
        extra = ["--device", "cpu", "--batch-size", "2", "--repeats", "1", "--warmup", "0"]
    else:
        extra = ["--device", "cuda", "--batch-size", "128", "--repeats", "20", "--warmup", "3"]
    cmd = [sys.executable, os.path.join("benchmarks", "bench_odin.py"), *extra]
    check.log("stage 3: " + " ".join(cmd[1:]))
    result = run_subprocess(cmd, allowance, 1 if check.dry_run else None)
    match = re.search(r"ratio ODINDetector / floor: ([0-9.]+)x", result["output_tail"])
    result["ratio_to_floor"] = float(match.group(1)) if match else None
    check.log(f"stage 3: {result['status']}, ratio to floor {result['ratio_to_floor']}")
    check.record("odin", result)


# --------------------------------------------------------------------------- stage 4


def finite_log(path: str) -> tuple[bool, list[dict]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    ok = bool(rows) and all(
        math.isfinite(float(r[k])) for r in rows for k in ("train_loss", "train_gq") if r[k] != ""
    )
    return ok, rows


def bf16_agreement(
    checkpoint: str, data_dir: str | None, device: str, batch: int
) -> dict[str, float]:
    """GQ of the trained model on one batch, float32 against bf16 autocast (relative gap)."""
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    model = build_model(state["arch"], state["num_classes"]).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    torch.manual_seed(0)
    if data_dir is not None:
        from data import load_cifar

        images, labels = load_cifar("cifar10", data_dir, "test").tensors
        x, y = images[:batch].to(device), labels[:batch].to(device)
    else:
        x = torch.rand(batch, 3, 32, 32, device=device)
        y = torch.randint(0, state["num_classes"], (batch,), device=device)
    with torch.no_grad():
        fp32 = float(gq_loss(model, x, y))
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = float(gq_loss(model, x, y))
    return {"gq_fp32": fp32, "gq_bf16": bf16, "rel_gap": abs(bf16 - fp32) / abs(fp32)}


def stage_train(check: Check, allowance: float, args: argparse.Namespace) -> None:
    out = os.path.join(os.path.abspath(check.out_dir), "train")
    # --data-dir (relative to the repository root), else a shared/ folder inside the checkout.
    candidates = [os.path.join(ROOT, args.data_dir), os.path.join(ROOT, "shared", "data")]
    found = [d for d in candidates if os.path.isfile(os.path.join(d, "cifar10_train.npz"))]
    data_dir = os.path.abspath(found[0] if found else candidates[0])
    have_data = bool(found)
    # The whole CIFAR-10 (50k/10k, JPEG bytes) when the data pack has it, else its subsets.
    full = (
        have_data
        and not check.dry_run
        and os.path.isfile(os.path.join(data_dir, "cifar10_train_full.npz"))
    )
    cmd = [sys.executable, os.path.join("examples", "train_cifar.py"), "--amp",
           "--lam", str(args.train_lam), "--out-dir", out, "--no-progress", "--seed", "0"]  # fmt: skip
    if check.dry_run:
        cmd += ["--smoke", "--device", "cpu", "--arch", "tiny_cnn", "--batch-size", "16",
                "--limit-train", "32", "--limit-test", "16", "--max-steps", "3",
                "--epochs", "2", "--num-workers", "0"]  # fmt: skip
        have_data = False
    elif have_data:
        cmd += ["--data-dir", data_dir, "--arch", "resnet18", "--batch-size", "64",
                "--epochs", "2", "--max-steps", str(args.train_steps)]  # fmt: skip
        cmd += ["--full-split"] if full else []
    else:  # generated data: train_cifar's --smoke (its small CNN), same step count
        cmd += ["--smoke", "--batch-size", "64", "--epochs", "2",
                "--limit-train", str(64 * args.train_steps // 2),
                "--max-steps", str(args.train_steps)]  # fmt: skip
    check.log("stage 4: " + " ".join(cmd[1:]))
    started = time.perf_counter()
    result = run_subprocess(cmd, allowance, 1 if check.dry_run else None)
    result["data"] = data_dir if have_data else "generated"
    result["split"] = "full (50k/10k)" if full else ("subset" if have_data else "generated")
    log_path = os.path.join(out, "log.csv")
    if os.path.isfile(log_path):
        result["finite"], result["epochs"] = finite_log(log_path)
    final = os.path.join(out, "model_final.pt")
    left = allowance - (time.perf_counter() - started)
    if os.path.isfile(final) and left > 5:
        device = "cpu" if check.dry_run else "cuda"
        batch = 8 if check.dry_run else 128
        gap = bf16_agreement(final, data_dir if have_data else None, device, batch)
        gap["rtol"] = args.bf16_rtol
        gap["agrees"] = gap["rel_gap"] <= args.bf16_rtol
        result["bf16_vs_fp32"] = gap
    elif os.path.isfile(final):
        result["bf16_vs_fp32"] = "skipped: budget"
    check.log(
        f"stage 4: {result['status']}, finite={result.get('finite')}, "
        f"bf16 vs fp32: {result.get('bf16_vs_fp32')}"
    )
    check.record("train_amp", result)


# --------------------------------------------------------------------------- stage 5


def amp_step(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None,
    options: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """One CE + GQ step under autocast `dtype` (`None`: float32). fp16 runs with a GradScaler,
    as AMP training does: a step whose scaled gradients overflow is skipped and the scale
    halved, up to 16 times from 2**10 (GradScaler's default start, 2**16, is halved to such
    values in a run's first steps); `finite` says the last step's loss and unscaled gradients
    were finite. The parameters stay put (lr 0)."""
    device = x.device.type
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10) if dtype == torch.float16 else None
    attempt = 0
    while attempt < (16 if scaler is not None else 1):
        attempt += 1
        opt.zero_grad(set_to_none=True)
        generator = torch.Generator(device).manual_seed(0) if "estimator" in options else None
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            gq, logits = gq_loss(model, x, y, return_logits=True, generator=generator, **options)
            loss = torch.nn.functional.cross_entropy(logits, y) + gq
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        grads = [q.grad for q in model.parameters() if q.grad is not None]
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
        if finite:
            break
    result = {"gq": float(gq.detach()), "finite": finite and bool(grads), "attempts": attempt}
    if scaler is not None:
        result["scale"] = scale
    return result


def stage_amp(check: Check, allowance: float, args: argparse.Namespace) -> None:
    deadline = time.perf_counter() + allowance
    device = "cpu" if check.dry_run else "cuda"
    batch = 4 if check.dry_run else 32
    rows: list[dict] = []
    for name in (args.vit_model, args.model):
        model, x, y = bench_gq.setup(name, 10, batch, device)
        for step, options in AMP_STEPS.items():
            if time.perf_counter() > deadline:
                rows.append(dict(model=name, step=step, status="skipped: budget"))
                continue
            try:
                fp32 = amp_step(model, x, y, None, options)["gq"]
                for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
                    got = amp_step(model, x, y, dtype, options)
                    gap = abs(got["gq"] - fp32) / abs(fp32)
                    ok = got["finite"] and gap <= args.bf16_rtol
                    rows.append(dict(model=name, step=step, dtype=label, gq_fp32=fp32,
                                     rel_gap=gap, **got, status="ok" if ok else "failed"))  # fmt: skip
            except Exception as err:  # recorded; the next step still runs
                rows.append(dict(model=name, step=step,
                                 status=f"error: {type(err).__name__}: {err}"[:300]))  # fmt: skip
            check.log(f"stage 5: {name} {step}: {[r['status'] for r in rows[-2:]]}")
    bad = [r for r in rows if r["status"] not in ("ok", "skipped: budget")]
    check.record("amp", {"status": "failed" if bad else "ok", "rows": rows})


# --------------------------------------------------------------------------- report


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def write_report(check: Check, args: argparse.Namespace) -> str:
    res = check.results
    stages = res["stages"]
    lines = [
        "# GPU check" + (" (dry run: tiny, CPU)" if check.dry_run else ""),
        "",
        f"Device: {res['device']}; torch {res['torch']}; total {res.get('total_s')} s.",
        f"Command: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`",
        "",
        "## 1. CUDA tests (`pytest -m cuda`)",
        "",
    ]
    st = stages.get("pytest_cuda", {})
    lines += [f"{st.get('status', 'not run')}: {st.get('summary', '')} ({st.get('seconds')} s)"]
    lines += [
        "",
        f"## 2. Kernel table ({args.vit_model}, {args.model}; batch {args.batch_size})",
        "",
    ]
    lines += [
        "Time of one training step (CE + GQ, forward and backward) as a multiple of the CE "
        "step, medians of interleaved repeats; peak memory above the pre-step level.",
        "",
        "| model | N | dtype | step | x CE | ms | peak MiB | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    kernels = stages.get("kernels", {})
    for r in kernels.get("rows", []):
        lines.append(
            f"| {r['model']} | {r['N']} | {'bf16' if r['amp'] else 'fp32'} | {r['step']} | "
            f"{fmt(r.get('x_ce', math.nan))} | {fmt(r.get('ms', math.nan))} | "
            f"{fmt(r.get('peak_mib', math.nan))} | {r['status']} |"
        )
    lines += ["", "Fastest exact method per setting, and what `auto` chose:", ""]
    for key, best in kernels.get("fastest_exact", {}).items():
        lines.append(
            f"- {key}: `{best['method']}` ({fmt(best['x_loop'])} x loop); `auto` chose "
            f"`{best.get('auto')}`, {fmt(best.get('auto_x_fastest', math.nan))} x the fastest"
        )
    slow = [
        key
        for key, best in kernels.get("fastest_exact", {}).items()
        if not best.get("auto_x_fastest", math.nan) <= 1.1
    ]
    lines += [
        "",
        'Verdict for `method="auto"` on CUDA: '
        + (
            f"more than 1.1x the fastest exact method (or not measured) in {slow}."
            if slow
            else "within 1.1x of the fastest exact method in every setting."
        ),
    ]
    od = stages.get("odin", {})
    lines += ["", "## 3. ODIN scoring throughput (`benchmarks/bench_odin.py`)", ""]
    lines += [f"{od.get('status', 'not run')}; ratio to floor: {od.get('ratio_to_floor')}", ""]
    lines += ["```", od.get("output_tail", "").strip()[-1500:], "```", ""]
    tr = stages.get("train_amp", {})
    lines += ["## 4. `examples/train_cifar.py --amp`", ""]
    lines += [
        f"{tr.get('status', 'not run')} on {tr.get('data')} data, split "
        f"{tr.get('split')} ({tr.get('seconds')} s); "
        f"loss and GQ finite: {tr.get('finite')}",
        "",
        f"GQ of the trained model, float32 vs bf16 autocast (rtol {args.bf16_rtol}): "
        f"{tr.get('bf16_vs_fp32')}",
        "",
    ]
    amp = stages.get("amp", {})
    lines += ["## 5. AMP training steps (bf16; fp16 with GradScaler)", ""]
    lines += [f"{amp.get('status', 'not run')}", ""]
    lines += ["fp16: the GradScaler's scale of the step that was finite (after skipped ones).", ""]
    lines += ["| model | step | dtype | GQ | GQ fp32 | rel. gap | finite | scale | status |"]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for r in amp.get("rows", []):
        lines.append(
            f"| {r['model']} | {r['step']} | {r.get('dtype', '')} | {fmt(r.get('gq', math.nan))} "
            f"| {fmt(r.get('gq_fp32', math.nan))} | {r.get('rel_gap', math.nan):.2e} | "
            f"{r.get('finite', '')} | {r.get('scale', '')} | {r['status']} |"
        )
    lines += [""]
    path = os.path.join(check.out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny, on CPU (< 2 minutes)")
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data"),
                        help="CIFAR-10 .npz folder, relative to the repository root")  # fmt: skip
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument(
        "--train-lam", type=float, default=1.0, help="GQ weight of the training run"
    )
    parser.add_argument("--bf16-rtol", type=float, default=0.05,
                        help="allowed relative gap of the bf16 GQ value to float32")  # fmt: skip
    parser.add_argument(
        "--stages", nargs="+", default=["pytest", "kernels", "odin", "train", "amp"]
    )
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every stage's time allowance (slow or shared machines)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.dry_run:
        torch.set_num_threads(1)
        args.model, args.batch_size, args.classes, args.repeats = "tiny_cnn", 4, [12], 1
        args.vit_model = "vit_tiny"
        budget = DRY_BUDGET
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --dry-run to check the pipeline on CPU")
        args.model, args.batch_size, args.classes, args.repeats = "resnet18", 128, [10, 100], 3
        args.vit_model = "vit_small"
        budget = BUDGET
    budget = {k: v * args.budget_scale for k, v in budget.items()}
    check = Check(args.out_dir, args.dry_run)
    check.log(f"gpu_check on {check.results['device']}, budget {sum(budget.values())} s")
    stages = {
        "pytest": lambda: stage_pytest(check, budget["pytest"]),
        "kernels": lambda: stage_kernels(check, budget["kernels"], budget["vit"], args),
        "odin": lambda: stage_odin(check, budget["odin"]),
        "train": lambda: stage_train(check, budget["train"], args),
        "amp": lambda: stage_amp(check, budget["amp"], args),
    }
    for name in args.stages:
        try:
            stages[name]()
        except Exception as err:  # one broken stage must not cost the others' numbers
            check.log(f"stage {name}: error {type(err).__name__}: {err}")
            check.record(name, {"status": f"error: {type(err).__name__}: {err}"})
    check.results["total_s"] = round(time.perf_counter() - check.start, 1)
    check.record("done", {})
    path = write_report(check, args)
    check.log(f"wrote {path} and report.json")
    failed = [
        name for name, st in check.results["stages"].items()
        if str(st.get("status", "ok")).startswith(("failed", "error"))
    ]  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
