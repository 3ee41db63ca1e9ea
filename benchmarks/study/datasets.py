"""The study's images: CIFAR-10 (ID), the real-image OOD sets and ODIN's noise sets."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from data import load_cifar, noise_images, npz_dataset, photo_crops, synthetic_dataset
from torch import Tensor

NOISE_SETS = ("uniform", "gaussian")


@dataclass
class StudyData:
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    ood: dict[str, Tensor]  # real-image sets first, then NOISE_SETS

    @property
    def real_sets(self) -> list[str]:
        return [k for k in self.ood if k not in NOISE_SETS]


def load_data(args: argparse.Namespace) -> StudyData:
    n, side = args.ood_size, 32
    if args.smoke:  # generated data only: a run of this script must not need ../shared
        side = 32 if args.arch == "fast_cnn" else 16  # fast_cnn pools 32x32 down to 1x1
        train = synthetic_dataset(256, 10, image_size=side, seed=1).tensors
        test = synthetic_dataset(128, 10, image_size=side, seed=2).tensors
        ood = {"other patterns": synthetic_dataset(n, 7, image_size=side, seed=3).tensors[0]}
    else:
        train = load_cifar("cifar10", args.data_dir, "train_full").tensors
        test = load_cifar("cifar10", args.data_dir, "test_full").tensors
        ood = {}
        for name, file in (("MNIST", "mnist_test.npz"), ("textures", "textures.npz")):
            path = os.path.join(args.data_dir, file)
            ood[name] = npz_dataset(path, size=32, rgb=True).tensors[0][:n]
    ood["photos"] = photo_crops(n, side, seed=1234)
    for i, kind in enumerate(NOISE_SETS):
        ood[kind] = noise_images(kind, n, (3, side, side), seed=1235 + i)
    return StudyData(train, test, ood)
