"""Evaluate the OOD detection of a trained classifier: ODIN, MSP, energy and Mahalanobis.

Writes the paper's Tables 1-2 layout (one block per method, one row per OOD set plus their mean;
AUROC, FPR at 95% TPR, AUPR-In, AUPR-Out, in %) and ID accuracy to ``results.md`` and
``results.csv`` in ``--out-dir``, and the demo's figures (ODIN score histograms, the paper's Fig. 1
and Fig. 2).

Examples::

    python examples/evaluate_ood.py runs/r18/model_final.pt --id cifar10 --data-dir data \\
        --ood npz:data/mnist_test.npz npz:data/textures.npz noise:uniform noise:gaussian
    python examples/evaluate_ood.py ckpt.pt --id cifar100 --data-dir data \\
        --ood folder:data/LSUN_resize torchvision:SVHN --limit 1000

Inputs:

* checkpoint: a ``torch.load`` dict as written by ``train_cifar.py`` (``model`` state dict,
  ``arch``, ``num_classes``, ``dataset``); loaded with ``weights_only=True``.
* ``--id``: ``cifar10`` / ``cifar100`` (``<data-dir>/<name>_test.npz`` or torchvision's files,
  via ``data.load_cifar``), or ``npz:PATH`` / ``folder:PATH`` (class sub-folders) with labels.
* ``--ood`` specs: ``npz:PATH`` (``x`` uint8 NHWC or NHW), ``folder:PATH`` (every image below
  it, read with Pillow), ``torchvision:NAME`` (a ``torchvision.datasets`` class with its files in
  ``--data-dir``; never downloads), ``noise:uniform`` (U[0, 1]) and ``noise:gaussian``
  (N(0.5, 1) clipped to [0, 1]), the synthetic sets of ODIN (Liang et al., 2018) used in the
  paper's Table 3 (ODIN used 10,000 images each; ``--noise-count``, default 1000). Every OOD
  image is converted to the ID images' shape: resized (bilinear, antialiased), grey repeated to
  3 channels or colour averaged to grey with ITU-R 601 weights.

Settings: the paper's by default, ODIN T = 1000 and ε = 0.001 (CIFAR-10, ImageNet-30) or 0.006
(CIFAR-100), in [0, 1] pixel units (the models see un-normalised [0, 1] images). Mahalanobis uses
the input of the classifier head (``--feature-layer``, default ``fc``: the penultimate
features), a tied covariance fitted on the ID training split (``--fit-data``, ``--fit-limit``),
without the input preprocessing or layer ensemble of Lee et al. (2018).
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import plots  # examples/plots.py: this script's folder is on sys.path when it runs
import torch
import torch.nn.functional as F
from data import CIFAR_NUM_CLASSES, IMAGE_EXTENSIONS, images_to_tensor, load_cifar, load_npz
from models import ALL_MODEL_NAMES, build_model
from torch import Tensor, nn

from gq_loss import MahalanobisScore, ODINDetector, class_gradient_norms
from gq_loss.metrics import ood_metrics
from gq_loss.scores import energy_score, msp_score

METHODS = ("ODIN", "MSP", "energy", "Mahalanobis")
METRICS = (("auroc", "AUROC"), ("fpr95", "FPR95"), ("aupr_in", "AUPR-In"), ("aupr_out", "AUPR-Out"))
SPEC_KINDS = ("npz", "folder", "torchvision", "noise")
NOISE_KINDS = {"uniform": "uniform noise", "gaussian": "Gaussian noise"}
#: ODIN ε of the paper per ID dataset, [0, 1] pixel units; anything else gets DEFAULT_EPSILON.
PAPER_EPSILON = {"cifar10": 0.001, "cifar100": 0.006, "imagenet30": 0.001}
DEFAULT_EPSILON = 0.001
GREY_WEIGHTS = (0.299, 0.587, 0.114)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint written by train_cifar.py")
    p.add_argument(
        "--id",
        default=None,
        help="cifar10 | cifar100 | npz:PATH | folder:PATH (default: the checkpoint's dataset)",
    )
    p.add_argument(
        "--ood",
        nargs="+",
        required=True,
        metavar="SPEC",
        help="npz:PATH folder:PATH torchvision:NAME noise:uniform noise:gaussian",
    )
    p.add_argument("--data-dir", default="data", help="folder of the CIFAR/torchvision files")
    p.add_argument(
        "--fit-data",
        default="train",
        help="Mahalanobis fit data: 'train' (the ID training split), npz:PATH, "
        "folder:PATH, or 'none' to skip Mahalanobis",
    )
    p.add_argument("--fit-limit", type=int, default=10000, help="max fit images (random subset)")
    p.add_argument(
        "--feature-layer",
        default="fc",
        help="Mahalanobis features = the INPUT of this submodule (default: %(default)s)",
    )
    p.add_argument("--limit", type=int, default=None, help="max images per ID/OOD test set")
    p.add_argument("--noise-count", type=int, default=1000, help="images per noise set")
    p.add_argument("--temperature", type=float, default=1000.0, help="ODIN T")
    p.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="ODIN step in [0, 1] pixel units (default: the paper's for the dataset)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="cpu | cuda | ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise sets and fit subset")
    p.add_argument("--out-dir", default="outputs/evaluate_ood", help="default: %(default)s")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("fit_limit", "noise_count", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.temperature <= 0 or (args.epsilon is not None and args.epsilon < 0):
        p.error("--temperature must be > 0 and --epsilon >= 0")
    try:
        for spec in args.ood:
            parse_spec(spec, SPEC_KINDS)
    except ValueError as err:
        p.error(str(err))
    return args


def parse_spec(spec: str, kinds: tuple[str, ...]) -> tuple[str, str]:
    """``"kind:value"`` -> ``(kind, value)``; raises ValueError naming the allowed kinds."""
    kind, sep, value = spec.partition(":")
    if not sep or kind not in kinds or not value:
        raise ValueError(f"dataset spec must be one of {[k + ':...' for k in kinds]}, got {spec!r}")
    if kind == "noise" and value not in NOISE_KINDS:
        raise ValueError(f"noise spec must be one of {list(NOISE_KINDS)}, got {value!r}")
    return kind, value


# --------------------------------------------------------------------------- data


def convert(images: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Float ``(n, c, h, w)`` images in [0, 1] to ``shape = (C, H, W)``: resize, fix channels."""
    c, h, w = shape
    if images.shape[1] == 4:  # RGBA: drop alpha
        images = images[:, :3]
    if images.shape[1] == 3 and c == 1:
        weights = images.new_tensor(GREY_WEIGHTS).view(1, 3, 1, 1)
        images = (images * weights).sum(1, keepdim=True)
    elif images.shape[1] == 1 and c == 3:
        images = images.repeat(1, 3, 1, 1)
    elif images.shape[1] != c:
        raise ValueError(f"cannot convert {images.shape[1]}-channel images to {c} channels")
    if images.shape[-2:] != (h, w):
        images = F.interpolate(
            images, size=(h, w), mode="bilinear", align_corners=False, antialias=True
        ).clamp_(0.0, 1.0)
    return images.contiguous()


def pil_to_tensor(image: Any, size: tuple[int, int] | None, channels: int) -> Tensor:
    """A PIL image as float ``(C, H, W)`` in [0, 1]; resized to ``size = (H, W)`` if given."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return images_to_tensor(np.array(image)[None])[0]  # a writable copy


def image_files(root: str) -> list[str]:
    """Every image file below ``root``, sorted (any folder layout)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    files = sorted(
        os.path.join(d, f)
        for d, _, names in os.walk(root)
        for f in names
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise FileNotFoundError(f"no images with extensions {IMAGE_EXTENSIONS} under {root!r}")
    return files


def load_folder(root: str, shape: tuple[int, ...] | None, limit: int | None) -> Tensor:
    from PIL import Image

    size = None if shape is None else (shape[1], shape[2])
    tensors = []
    for path in image_files(root)[:limit]:
        with Image.open(path) as img:
            tensors.append(pil_to_tensor(img, size, 3 if shape is None else shape[0]))
    if shape is None and len({t.shape for t in tensors}) > 1:
        raise ValueError(f"images in {root!r} differ in size; an ID folder needs one size")
    return torch.stack(tensors)


def load_labelled_folder(root: str, limit: int | None) -> tuple[Tensor, Tensor]:
    """``root/<class>/<image>`` (classes in sorted order) as images and labels."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class sub-folders in {root!r}")
    xs, ys = [], []
    for label, name in enumerate(classes):
        x = load_folder(os.path.join(root, name), None, None)
        xs.append(x)
        ys.append(torch.full((len(x),), label, dtype=torch.long))
    x, y = torch.cat(xs), torch.cat(ys)
    return x[:limit], y[:limit]


def load_id(spec: str, data_dir: str, split: str, limit: int | None) -> tuple[Tensor, Tensor]:
    """ID images ``(n, C, H, W)`` and labels for ``cifar10``/``cifar100``/``npz:``/``folder:``."""
    if spec in CIFAR_NUM_CLASSES:
        x, y = load_cifar(spec, data_dir, split).tensors
    else:
        kind, value = parse_spec(spec, ("npz", "folder"))
        if kind == "folder":
            return load_labelled_folder(value, limit)
        raw, labels = load_npz(value)
        if labels is None:
            raise ValueError(f"the ID set {value!r} needs labels ('y')")
        x, y = images_to_tensor(raw), torch.from_numpy(labels)
    return x[:limit], y[:limit]


def load_torchvision(name: str, data_dir: str, shape: tuple[int, ...], limit: int | None) -> Tensor:
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(
            f"torchvision:{name} needs torchvision (pip install torchvision)"
        ) from err
    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise ValueError(f"torchvision.datasets has no dataset {name!r}")
    try:
        ds = cls(root=data_dir, split="test", download=False)
    except TypeError:  # datasets with a `train` flag instead of `split`
        ds = cls(root=data_dir, train=False, download=False)
    n = len(ds) if limit is None else min(limit, len(ds))
    return torch.stack([pil_to_tensor(ds[i][0], shape[1:], shape[0]) for i in range(n)])


def load_ood(spec: str, args: argparse.Namespace, shape: tuple[int, ...]) -> tuple[str, Tensor]:
    """``(display name, images (n, *shape))`` for one ``--ood`` spec."""
    kind, value = parse_spec(spec, SPEC_KINDS)
    if kind == "noise":
        gen = torch.Generator().manual_seed(args.seed + (0 if value == "uniform" else 1))
        size = (min(args.noise_count, args.limit or args.noise_count), *shape)
        if value == "uniform":
            x = torch.rand(size, generator=gen)
        else:
            x = (0.5 + torch.randn(size, generator=gen)).clamp_(0.0, 1.0)
        return NOISE_KINDS[value], x
    name = os.path.splitext(os.path.basename(os.path.normpath(value)))[0]
    if kind == "npz":
        x = images_to_tensor(load_npz(value)[0][: args.limit])
    elif kind == "folder":
        x = load_folder(value, shape, args.limit)
    else:
        x = load_torchvision(value, args.data_dir, shape, args.limit)
    return name, convert(x, shape)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- model


def load_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint dict of ``train_cifar.py``, checked for the keys this script needs."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("model", "arch", "num_classes") if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks {missing}: is it from train_cifar.py?")
    if ckpt["arch"] not in ALL_MODEL_NAMES:
        raise ValueError(f"checkpoint arch must be one of {ALL_MODEL_NAMES}, got {ckpt['arch']!r}")
    return ckpt


def build_from_checkpoint(
    ckpt: dict[str, Any], in_channels: int, device: torch.device
) -> nn.Module:
    model = build_model(ckpt["arch"], int(ckpt["num_classes"]), in_channels=in_channels)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def penultimate(model: nn.Module, layer: str) -> Callable[[Tensor], Tensor]:
    """Feature function: the input of submodule ``layer`` during ``model(x)`` (hook removed)."""
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"--feature-layer {layer!r} is not a submodule of the model")
    head = modules[layer]

    def features(x: Tensor) -> Tensor:
        captured: list[Tensor] = []
        handle = head.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
        try:
            model(x)
        finally:
            handle.remove()
        return captured[-1]

    return features


def batches(x: Tensor, size: int, desc: str, enabled: bool) -> Iterator[Tensor]:
    chunks = x.split(size)
    if enabled:
        try:
            from tqdm import tqdm

            yield from tqdm(chunks, desc=desc, unit="batch", leave=False)
            return
        except ImportError:
            pass
    yield from chunks


@dataclass
class SetResult:
    """Scores and figure quantities of one dataset."""

    scores: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (n,)
    grad_norms: list[np.ndarray] = field(default_factory=list)
    logit_gaps: list[np.ndarray] = field(default_factory=list)
    preds: list[np.ndarray] = field(default_factory=list)


def score_set(
    x: Tensor,
    name: str,
    model: nn.Module,
    odin: ODINDetector,
    maha: MahalanobisScore | None,
    args: argparse.Namespace,
    device: torch.device,
) -> SetResult:
    out = SetResult()
    parts: dict[str, list[np.ndarray]] = {m: [] for m in METHODS if m != "Mahalanobis" or maha}
    for xb in batches(x, args.batch_size, f"score {name}", not args.no_progress):
        xb = xb.to(device)
        with torch.no_grad():
            logits = model(xb)
        pred = logits.argmax(1)
        parts["ODIN"].append(odin.score(xb).cpu().numpy())
        parts["MSP"].append(msp_score(logits).cpu().numpy())
        parts["energy"].append(energy_score(logits).cpu().numpy())
        if maha is not None:
            parts["Mahalanobis"].append(maha.score(xb).cpu().numpy())
        norms = class_gradient_norms(  # paper Fig. 1: only the predicted class's column
            model, xb, operand="log_softmax", temperature=args.temperature, classes=pred[:, None]
        )
        out.grad_norms.append(norms[:, 0].detach().cpu().numpy())
        out.logit_gaps.append(plots.logit_gap(logits.cpu().numpy()))
        out.preds.append(pred.cpu().numpy())
    out.scores = {m: np.concatenate(v) for m, v in parts.items()}
    return out


# --------------------------------------------------------------------------- tables


def metric_rows(results: dict[str, SetResult], id_name: str, accuracy: float) -> list[dict]:
    rows = []
    ood_names = [k for k in results if k != id_name]
    for method in results[id_name].scores:
        s_id = results[id_name].scores[method]
        per_set = []
        for name in ood_names:
            m = ood_metrics(s_id, results[name].scores[method])
            per_set.append(
                {
                    "method": method,
                    "ood_set": name,
                    **m,
                    "n_id": len(s_id),
                    "n_ood": len(results[name].scores[method]),
                }
            )
        keys = [k for k, _ in METRICS] + ["detection_error"]
        mean = {k: float(np.mean([r[k] for r in per_set])) for k in keys}
        n_ood = sum(r["n_ood"] for r in per_set)
        mean_row = {"method": method, "ood_set": "mean", **mean, "n_id": len(s_id), "n_ood": n_ood}
        rows += [*per_set, mean_row]
    for r in rows:
        r["id_accuracy"] = accuracy
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header]
    for method in dict.fromkeys(r["method"] for r in rows):
        lines += ["", f"## {method}", "", "| OOD set | " + " | ".join(t for _, t in METRICS) + " |"]
        lines.append("|---|" + "---:|" * len(METRICS))
        for r in (r for r in rows if r["method"] == method):
            name = "**mean**" if r["ood_set"] == "mean" else f"{r['ood_set']} (n={r['n_ood']})"
            lines.append(
                f"| {name} | " + " | ".join(f"{100 * r[k]:.2f}" for k, _ in METRICS) + " |"
            )
    return "\n".join(lines) + "\n"


def choose_epsilon(args: argparse.Namespace, dataset: str) -> tuple[float, str]:
    """ODIN ε and the reason for it (explicit, the paper's value for the dataset, or default)."""
    if args.epsilon is not None:
        return args.epsilon, "--epsilon"
    if dataset in PAPER_EPSILON:
        return PAPER_EPSILON[dataset], f"the paper's value for {dataset}"
    return DEFAULT_EPSILON, f"default; the paper gives no value for {dataset!r}"


def fit_mahalanobis(
    model: nn.Module, ckpt: dict[str, Any], id_spec: str, args: argparse.Namespace
) -> tuple[MahalanobisScore | None, str]:
    """Fit on ``--fit-data`` (a random subset of ``--fit-limit`` images); ``(score, note)``."""
    if args.fit_data == "none":
        return None, "Mahalanobis skipped (--fit-data none)"
    if args.fit_data == "train" and id_spec not in CIFAR_NUM_CLASSES:
        raise SystemExit(
            f"--fit-data train needs a CIFAR ID set, got --id {id_spec!r}: pass the ID training "
            "images as --fit-data npz:PATH or folder:PATH, or --fit-data none"
        )
    fit_spec = id_spec if args.fit_data == "train" else args.fit_data
    x, y = load_id(fit_spec, args.data_dir, "train", None)
    if len(x) > args.fit_limit:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
        x, y = x[keep[: args.fit_limit]], y[keep[: args.fit_limit]]
    maha = MahalanobisScore(
        model,
        feature_fn=penultimate(model, args.feature_layer),
        num_classes=int(ckpt["num_classes"]),
    )
    maha.fit(list(zip(x.split(args.batch_size), y.split(args.batch_size))))
    note = (
        f"Mahalanobis: features = input of `{args.feature_layer}`, tied covariance fitted on "
        f"{len(x)} training images ({fit_spec})"
    )
    return maha, note


def write_tables(rows: list[dict], text: str, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> list[dict]:
    start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = load_checkpoint(args.checkpoint)
    id_spec = args.id or ckpt.get("dataset")
    if id_spec is None:
        raise SystemExit("--id is required: the checkpoint names no dataset")
    x_id, y_id = load_id(id_spec, args.data_dir, "test", args.limit)
    shape = tuple(x_id.shape[1:])
    model = build_from_checkpoint(ckpt, shape[0], device)
    epsilon, why = choose_epsilon(
        args, id_spec if id_spec in CIFAR_NUM_CLASSES else str(ckpt.get("dataset"))
    )
    id_name = f"{os.path.basename(id_spec.partition(':')[2] or id_spec)} test (ID)"
    sets = {id_name: x_id}
    for spec in args.ood:
        name, x = load_ood(spec, args, shape)
        while name in sets:  # two specs with the same file name
            name += "'"
        sets[name] = x
    maha, fit_note = fit_mahalanobis(model, ckpt, id_spec, args)

    odin = ODINDetector(model, temperature=args.temperature, epsilon=epsilon)
    results = {k: score_set(x, k, model, odin, maha, args, device) for k, x in sets.items()}
    accuracy = float((np.concatenate(results[id_name].preds) == y_id.numpy()).mean())
    n_noise = min(args.noise_count, args.limit or args.noise_count)
    header = "\n".join(
        [
            f"# OOD evaluation of {os.path.basename(args.checkpoint)}",
            "",
            f"- Model: {ckpt['arch']}, {ckpt['num_classes']} classes, "
            f"trained on {ckpt.get('dataset')}.",
            f"- ID test set: {id_spec} ({len(x_id)} images), accuracy {100 * accuracy:.2f}%.",
            f"- ODIN: T = {args.temperature:g}, ε = {epsilon:g} in [0, 1] pixel units ({why}).",
            f"- {fit_note}.",
            f"- Noise sets: {n_noise} images each (ODIN used 10,000), seed {args.seed}.",
            "- Metrics in %, ID = positive class (FPR95: share of OOD accepted at 95% ID accepted).",
        ]
    )
    rows = metric_rows(results, id_name, accuracy)
    text = markdown(rows, header)
    write_tables(rows, text, args.out_dir)
    print("\n" + text)
    if not args.no_figures:
        if plots.matplotlib_available():
            for path in figures(results, ckpt, args, epsilon):
                print(f"figure: {path}")
        else:
            print("matplotlib is not installed: figures skipped (`pip install matplotlib`)")
    print(f"results: {os.path.join(args.out_dir, 'results.md')}, results.csv")
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return rows


def figures(
    results: dict[str, SetResult], ckpt: dict, args: argparse.Namespace, eps: float
) -> list[str]:
    label = f"{ckpt['arch']} ({ckpt.get('dataset', '?')})"
    n = int(ckpt["num_classes"])
    odin = {
        k: plots.odin_display(r.scores["ODIN"], n, args.temperature) for k, r in results.items()
    }
    out = args.out_dir
    return [
        plots.score_histograms(
            {label: odin},
            os.path.join(out, "odin_scores.png"),
            method="ODIN",
            xlabel=plots.ODIN_XLABEL.format(t=args.temperature, e=eps),
        ),
        plots.gradient_norm_density(
            {label: {k: np.concatenate(r.grad_norms) for k, r in results.items()}},
            os.path.join(out, "fig1_gradient_norms.png"),
            temperature=args.temperature,
        ),
        plots.logit_gap_density(
            {label: {k: np.concatenate(r.logit_gaps) for k, r in results.items()}},
            os.path.join(out, "fig2_logit_gap.png"),
        ),
    ]


if __name__ == "__main__":
    main()
