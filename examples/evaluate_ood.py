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
import os
import time
from collections.abc import Callable
from typing import Any

import plots
import torch
from data import (
    CIFAR_NUM_CLASSES,
    NOISE_KINDS,
    convert_images,
    images_to_tensor,
    load_cifar,
    load_image_folder,
    load_labelled_folder,
    load_npz,
    noise_images,
    pil_to_tensor,
)
from evaluation import (
    ScoredSet,
    method_tables,
    metric_rows,
    score_methods,
    write_results,
)
from models import ALL_MODEL_NAMES, build_model
from torch import Tensor, nn
from train_utils import HelpFormatter, default_device, require_torchvision

from gq_loss import MahalanobisDetector

SPEC_KINDS = ("npz", "folder", "torchvision", "noise")
NOISE_NAMES = {"uniform": "uniform noise", "gaussian": "Gaussian noise"}
#: ODIN ε of the paper per ID dataset, [0, 1] pixel units; anything else gets DEFAULT_EPSILON.
PAPER_EPSILON = {"cifar10": 0.001, "cifar100": 0.006, "imagenet30": 0.001}
DEFAULT_EPSILON = 0.001


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
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
        help="Mahalanobis features = the INPUT of this submodule",
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
    p.add_argument("--out-dir", default="outputs/evaluate_ood", help="output folder")
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
    torchvision = require_torchvision(
        f"--ood torchvision:{name}", "pass the set as --ood npz:PATH or --ood folder:PATH"
    )
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
        n = min(args.noise_count, args.limit or args.noise_count)
        seed = args.seed + NOISE_KINDS.index(value)
        return NOISE_NAMES[value], noise_images(value, n, shape, seed=seed)
    name = os.path.splitext(os.path.basename(os.path.normpath(value)))[0]
    if kind == "npz":
        x = images_to_tensor(load_npz(value)[0][: args.limit])
    elif kind == "folder":
        x = load_image_folder(value, shape, args.limit)
    else:
        x = load_torchvision(value, args.data_dir, shape, args.limit)
    return name, convert_images(x, shape)


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


def choose_epsilon(args: argparse.Namespace, dataset: str) -> tuple[float, str]:
    """ODIN ε and the reason for it (explicit, the paper's value for the dataset, or default)."""
    if args.epsilon is not None:
        return args.epsilon, "--epsilon"
    if dataset in PAPER_EPSILON:
        return PAPER_EPSILON[dataset], f"the paper's value for {dataset}"
    return DEFAULT_EPSILON, f"default; the paper gives no value for {dataset!r}"


def fit_mahalanobis(
    model: nn.Module, ckpt: dict[str, Any], id_spec: str, args: argparse.Namespace
) -> tuple[MahalanobisDetector | None, str]:
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
    maha = MahalanobisDetector(
        model,
        feature_fn=penultimate(model, args.feature_layer),
        num_classes=int(ckpt["num_classes"]),
    )
    maha.fit(list(zip(x.split(args.batch_size), y.split(args.batch_size), strict=True)))
    note = (
        f"Mahalanobis: features = input of `{args.feature_layer}`, tied covariance fitted on "
        f"{len(x)} training images ({fit_spec})"
    )
    return maha, note


def main(argv: list[str] | None = None) -> list[dict]:
    start = time.perf_counter()
    args = parse_args(argv)
    device = default_device(args.device)
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

    extra = {"Mahalanobis": maha.score} if maha is not None else None
    results = {
        name: score_methods(
            model,
            x,
            temperature=args.temperature,
            epsilon=epsilon,
            batch_size=args.batch_size,
            device=device,
            extra=extra,
            grad_norms=True,
            show_progress=not args.no_progress,
            desc=f"score {name}",
        )
        for name, x in sets.items()
    }
    accuracy = float((results[id_name].logits.argmax(1) == y_id).double().mean())
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
    ood = {k: r.scores for k, r in results.items() if k != id_name}
    rows = [r | {"id_accuracy": accuracy} for r in metric_rows(results[id_name].scores, ood)]
    text = header + "\n" + method_tables(rows)
    write_results(args.out_dir, rows, text)
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
    results: dict[str, ScoredSet], ckpt: dict, args: argparse.Namespace, eps: float
) -> list[str]:
    label = f"{ckpt['arch']} ({ckpt.get('dataset', '?')})"
    odin = {k: r.scores["ODIN"].numpy() for k, r in results.items()}
    norms = {label: {k: r.grad_norms.numpy() for k, r in results.items()}}  # type: ignore[union-attr]
    gaps = {label: {k: plots.logit_gap(r.logits.numpy()) for k, r in results.items()}}
    out = args.out_dir
    return [
        plots.score_histograms(
            {label: odin},
            os.path.join(out, "odin_scores.png"),
            method="ODIN",
            xlabel=plots.ODIN_XLABEL.format(t=args.temperature, e=eps),
            caption="What it shows: ODIN's score as detector.score(x) returns it, for the "
            "in-distribution test set (black) and each OOD set; the further right the black "
            "curve lies of the others, the better the detector (the AUROC table has the numbers).",
        ),
        plots.gradient_norm_density(
            norms,
            os.path.join(out, "fig1_gradient_norms.png"),
            temperature=args.temperature,
            caption=plots.GRADIENT_CAPTION + " " + plots.premise_caption(norms, "gradient norm"),
        ),
        plots.logit_gap_density(
            gaps,
            os.path.join(out, "fig2_logit_gap.png"),
            caption=plots.GAP_CAPTION + " " + plots.premise_caption(gaps, "logit gap"),
        ),
    ]


if __name__ == "__main__":
    main()
