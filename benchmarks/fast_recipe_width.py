"""Does a wider or longer fast recipe (examples/fast_cifar.py) reach 93 % on the data pack's CIFAR-10?

Trains the recipe on the whole JPEG training split (``cifar10_train_full``, 50,000 images) at the
given block widths and epochs, and reports the accuracy of one forward pass on each of the
10,000 test images (``cifar10_test_full``, no test-time augmentation), with the run's wall and
CPU time. A checkpoint after every epoch (``--checkpoint``) lets a stopped run resume. Measured
in docs/examples.md ("A strong CIFAR-10 network in minutes").

    python benchmarks/fast_recipe_width.py --data-dir ../shared/data --widths 96 384 384
    python benchmarks/fast_recipe_width.py --data-dir ../shared/data --epochs 20   # 64/256/256
"""

from __future__ import annotations

import argparse
import json
import time

import _examples_path  # noqa: F401  (puts examples/ on sys.path)
import fast_cifar
import torch
from data import load_cifar


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--widths", type=int, nargs=3, default=[64, 256, 256])
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="a file written after every epoch")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x_train, y_train = load_cifar("cifar10", args.data_dir, "train_full").tensors
    x_test, y_test = load_cifar("cifar10", args.data_dir, "test_full").tensors
    recipe = fast_cifar.FastRecipe(epochs=args.epochs, widths=tuple(args.widths))
    cpu = time.process_time()
    model, record = fast_cifar.train(
        x_train, y_train, recipe, seed=args.seed, checkpoint=args.checkpoint
    )
    result = {
        "widths": args.widths,
        "epochs": args.epochs,
        "seed": args.seed,
        "threads": args.threads,
        "parameters": sum(q.numel() for q in model.parameters()),
        "accuracy": fast_cifar.accuracy(model, x_test, y_test),
        "train_seconds": record["train_seconds"],
        "cpu_seconds": round(sum(e["cpu_seconds"] for e in record["epochs"]), 1),
        "cpu_seconds_this_process": round(time.process_time() - cpu, 1),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
