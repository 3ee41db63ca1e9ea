"""The study's images: CIFAR-10 (ID), the real-image OOD sets and ODIN's noise sets."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
from data import load_cifar, noise_images, npz_dataset, photo_crops, synthetic_dataset
from torch import Tensor

NOISE_SETS = ("uniform", "gaussian")


@dataclass
class StudyData:
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    ood: dict[str, Tensor]  # real-image sets first, then NOISE_SETS
    # ODIN's (T, eps) are tuned on these (ID, OOD) images: the last test images, never scored
    # for detection, and their jigsaw-shuffled copies, an OOD set unlike every test OOD set
    validation: tuple[Tensor, Tensor] | None = None

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
    validation = None
    if args.tune_odin:
        if args.id_eval_size + n > len(test[0]):
            raise ValueError("--tune-odin needs --id-eval-size + --ood-size <= the test images")
        val_id = test[0][-n:]
        validation = (val_id, jigsaw(val_id, seed=1237))
    return StudyData(train, test, ood, validation)


def jigsaw(images: Tensor, seed: int, grid: int = 4) -> Tensor:
    """Each image cut into ``grid`` x ``grid`` tiles, shuffled (one permutation per image)."""
    n, c, h, w = images.shape
    th, tw = h // grid, w // grid
    tiles = (
        images.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, c, th, tw)
    )
    gen = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(grid * grid, generator=gen) for _ in range(n)])
    tiles = tiles[torch.arange(n)[:, None], order]
    tiles = tiles.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5)
    return tiles.reshape(n, c, h, w).contiguous()
