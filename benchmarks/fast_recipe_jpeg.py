"""What the data pack's JPEG copy of CIFAR-10 costs the fast recipe (examples/fast_cifar.py).

The whole CIFAR-10 in ``../shared/data`` is JPEG at quality 75 (mean error 5.8 grey levels); only
4,000 training and 1,000 test images exist losslessly. This trains the recipe on 4,000 lossless
training images and on 4,000 JPEG ones (the first of ``cifar10_train_full``), 10 epochs at batch
256, and reports each model's accuracy on the lossless test images (``cifar10_test_png1k``) and
on 2,000 JPEG test images (the last of ``cifar10_test_full``: the same split, mostly other
images). Measured in docs/examples.md ("A strong CIFAR-10 network in minutes").

    python benchmarks/fast_recipe_jpeg.py --data-dir ../shared/data            # ~7 CPU-min
    python benchmarks/fast_recipe_jpeg.py --data-dir ../shared/data --float32  # + float32 twin
"""

from __future__ import annotations

import argparse
import os

import _examples_path  # noqa: F401  (puts examples/ on sys.path)
import fast_cifar
import torch
from data import load_cifar, npz_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--float32", action="store_true", help="also train the JPEG arm in float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lossless_train = npz_dataset(os.path.join(args.data_dir, "cifar10_train_png4k.npz")).tensors
    lossless_test = npz_dataset(os.path.join(args.data_dir, "cifar10_test_png1k.npz")).tensors
    x, y = load_cifar("cifar10", args.data_dir, "train_full").tensors
    jpeg_train = (x[:4000], y[:4000])
    x, y = load_cifar("cifar10", args.data_dir, "test_full").tensors
    jpeg_test = (x[-2000:], y[-2000:])
    arms = [("lossless", lossless_train, True), ("jpeg", jpeg_train, True)]
    if args.float32:
        arms.append(("jpeg", jpeg_train, False))
    recipe = fast_cifar.FastRecipe(epochs=10, batch_size=256)
    print("| train images | precision | lossless test acc | JPEG test acc | seconds |")
    print("|---|---|---|---|---|")
    for name, data, bf16 in arms:
        model, record = fast_cifar.train(*data, recipe, seed=args.seed, bf16=bf16, log=None)
        a = fast_cifar.accuracy(model, *lossless_test, bf16=False)
        b = fast_cifar.accuracy(model, *jpeg_test, bf16=False)
        precision = "bf16" if bf16 else "float32"
        print(f"| {name} | {precision} | {100 * a:.1f} | {100 * b:.1f} | {record['train_seconds']} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
