"""Data loading for the example scripts (numpy, torch and Pillow; torchvision optional).

Images are float32 ``(N, C, H, W)`` in ``[0, 1]`` with no normalisation, as in the paper's code.
Datasets are ``TensorDataset(images, labels)``; unlabelled (OOD) sets get label ``-1``.

Stable names used by the other scripts:

- :func:`load_npz` -- ``(x uint8, y int64 or None)`` from a ``.npz`` with ``x`` and optional ``y``
- :func:`images_to_tensor` -- uint8 ``(N, H, W[, C])`` array to float ``(N, C, H, W)`` in [0, 1]
- :func:`convert_images` -- resize and fix channels (e.g. MNIST as a CIFAR OOD set)
- :func:`pil_to_tensor`, :func:`load_image_folder`, :func:`load_labelled_folder` -- images
  read with Pillow from any folder tree, or from ``root/<class>/<image>``
- :func:`npz_dataset` -- a ``.npz`` file as a ``TensorDataset``
- :func:`load_cifar` -- CIFAR-10/100 split from ``<name>_<split>.npz`` or torchvision's files
- :func:`synthetic_dataset` -- tiny learnable random images for smoke runs
- :func:`augmentation_params`, :func:`crop_flip` -- the paper's random crop (pad 4) + flip,
  drawn per sample from ``(seed, epoch)`` so that it does not depend on processes or resumes
- :func:`noise_images`, :func:`photo_crops` -- the OOD sets every evaluation script builds:
  ODIN's uniform / Gaussian noise and random crops of scikit-learn's sample photos
- :class:`ImageFolderDataset` -- ``root/<class>/<image>`` tree read with Pillow, classes indexed
  in sorted folder order as ``torchvision.datasets.ImageFolder`` does
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset
from train_utils import torchvision_or_reason

CIFAR_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
SPLITS = ("train", "test", "train_full", "test_full")
NOISE_KINDS = ("uniform", "gaussian")
GREY_WEIGHTS = (0.299, 0.587, 0.114)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``x`` (uint8) and ``y`` (int64, or ``None`` when absent) from a ``.npz`` file.

    Args:
        path: File holding ``x`` of shape ``(N, H, W, C)`` or ``(N, H, W)`` and optionally
            ``y`` of shape ``(N,)``.

    Returns:
        ``(x, y)`` as numpy arrays; ``y`` is ``None`` for unlabelled sets.
    """
    with np.load(path, allow_pickle=False) as data:
        if "jpeg" in data.files and "offsets" in data.files:
            x = _decode_jpegs(data["jpeg"], data["offsets"])
        elif "x" in data.files:
            x = data["x"]
        else:
            raise ValueError(f"{path!r} must hold an array 'x' (or 'jpeg'), found {data.files}")
        y = data["y"].astype(np.int64) if "y" in data.files else None
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ValueError(
            f"'x' in {path!r} must be uint8 (N, H, W[, C]), got {x.dtype} {tuple(x.shape)}"
        )
    if y is not None and y.shape != (x.shape[0],):
        raise ValueError(f"'y' in {path!r} must have shape ({x.shape[0]},), got {y.shape}")
    return x, y


def _decode_jpegs(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Images stored as concatenated JPEG bytes (``buf``) cut at ``offsets`` -> uint8 NHWC."""
    import io

    from PIL import Image

    return np.stack(
        [
            np.asarray(Image.open(io.BytesIO(buf[a:b].tobytes())).convert("RGB"))
            for a, b in itertools.pairwise(offsets)
        ]
    )


def images_to_tensor(x: np.ndarray) -> torch.Tensor:
    """Convert uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` to float32 ``(N, C, H, W)`` / 255.

    Example:
        >>> images_to_tensor(np.full((2, 4, 4, 3), 255, np.uint8)).shape
        torch.Size([2, 3, 4, 4])
    """
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.float().div_(255.0).contiguous()


def convert_images(images: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Float ``(n, c, h, w)`` images in [0, 1] to ``shape = (C, H, W)``: RGBA loses alpha, grey
    is repeated to 3 channels or colour averaged to grey (ITU-R 601 weights), and the size is
    changed with antialiased bilinear resampling (e.g. MNIST as a CIFAR OOD set).

    Example:
        >>> convert_images(torch.rand(2, 1, 28, 28), (3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """
    c, h, w = shape
    if images.shape[1] == 4:
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


def npz_dataset(path: str, *, size: int | None = None, rgb: bool = False) -> TensorDataset:
    """Load a ``.npz`` file as ``TensorDataset(images (N, C, H, W) float32, labels (N,) int64)``.

    Args:
        path: See :func:`load_npz`.
        size: If given, resize to ``size`` x ``size``.
        rgb: If true, repeat single-channel images to 3 channels.

    Returns:
        The dataset; labels are ``-1`` when the file has no ``y``.
    """
    x, y = load_npz(path)
    images = images_to_tensor(x)
    if size is not None or rgb:
        side = size if size is not None else images.shape[-1]
        channels = 3 if rgb else images.shape[1]
        images = convert_images(images, (channels, side, side))
    labels = torch.full((len(images),), -1) if y is None else torch.from_numpy(y)
    return TensorDataset(images, labels)


def load_cifar(name: str, data_dir: str, split: str) -> TensorDataset:
    """Load a CIFAR split as ``TensorDataset(images (N, 3, 32, 32), labels (N,))``.

    Looks for ``<data_dir>/<name>_<split>.npz`` first (``x`` uint8 NHWC, ``y`` int64), then for
    torchvision's extracted files in ``data_dir``. Never downloads.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: Folder with the ``.npz`` files or torchvision's CIFAR folder.
        split: ``"train"`` / ``"test"`` (the data pack's 10k / 2k subsets, or the whole split
            when read from torchvision's files) or ``"train_full"`` / ``"test_full"`` (the whole
            50k / 10k splits, stored as JPEG bytes). The subsets lie inside the full splits:
            never train on one and test on the other.

    Raises:
        ValueError: Unknown ``name`` or ``split``.
        FileNotFoundError: Neither source is available.
    """
    if name not in CIFAR_NUM_CLASSES:
        raise ValueError(f"`name` must be one of {tuple(CIFAR_NUM_CLASSES)}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    path = os.path.join(data_dir, f"{name}_{split}.npz")
    if os.path.isfile(path):
        return npz_dataset(path)
    hint = (
        f"put {name}_{split}.npz (arrays x: uint8 (N, 32, 32, 3), y: int64 (N,)) in "
        f"{data_dir!r}, or install torchvision and extract the official {name} archive there"
    )
    torchvision, why = torchvision_or_reason()
    if torchvision is None:
        raise FileNotFoundError(f"{path!r} not found and torchvision {why}: {hint}")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(data_dir, train=split.startswith("train"), download=False)
    except RuntimeError as err:
        raise FileNotFoundError(f"no {name} data in {data_dir!r}: {hint}") from err
    labels = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
    return TensorDataset(images_to_tensor(ds.data), labels)


def synthetic_dataset(
    num_samples: int, num_classes: int, *, image_size: int = 32, seed: int = 0
) -> TensorDataset:
    """Noisy copies of one coarse random colour pattern per class: learnable in a few steps.

    The class patterns depend only on ``num_classes`` and ``image_size``, so train and test sets
    drawn with different seeds agree.

    Example:
        >>> ds = synthetic_dataset(8, 4)
        >>> ds.tensors[0].shape, ds.tensors[1].tolist()
        (torch.Size([8, 3, 32, 32]), [0, 1, 2, 3, 0, 1, 2, 3])
    """
    coarse = torch.rand(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(num_classes))
    patterns = F.interpolate(coarse, size=(image_size, image_size), mode="nearest")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % num_classes
    noise = torch.rand(num_samples, 3, image_size, image_size, generator=gen)
    return TensorDataset(0.5 * noise + 0.5 * patterns[labels], labels)


def augmentation_params(
    num_samples: int, seed: int, epoch: int, padding: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop offsets ``(N, 2)`` in ``[0, 2 * padding]`` and flip flags ``(N,)`` for one epoch.

    A pure function of ``(seed, epoch)``: every process and every resumed run draws the same
    augmentation for a given sample.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    offsets = torch.randint(0, 2 * padding + 1, (num_samples, 2), generator=gen)
    flips = torch.rand(num_samples, generator=gen) < 0.5
    return offsets, flips


def crop_flip(
    x: torch.Tensor,
    offsets: torch.Tensor,
    flips: torch.Tensor,
    padding: int = 4,
    padding_mode: str = "constant",
) -> torch.Tensor:
    """Pad ``(B, C, H, W)`` images by ``padding`` (zeros, or ``padding_mode="reflect"``), crop at
    ``offsets (B, 2)`` and flip horizontally where ``flips (B,)`` is true
    (RandomCrop(padding, padding_mode) + RandomHorizontalFlip).

    Example:
        >>> x = torch.rand(2, 3, 8, 8)
        >>> torch.equal(crop_flip(x, torch.tensor([[4, 4], [4, 4]]), torch.tensor([0, 1]) > 0)[1],
        ...             x[1].flip(-1))
        True
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding), mode=padding_mode)
    offsets = offsets.to(x.device)
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flips.to(x.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def noise_images(kind: str, n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """ODIN's synthetic OOD sets: ``"uniform"`` U[0, 1] or ``"gaussian"`` N(0.5, 1) clipped to
    [0, 1], as ``(n, *shape)`` float32 drawn from ``seed``.

    Example:
        >>> noise_images("gaussian", 2, (3, 4, 4), seed=0).shape
        torch.Size([2, 3, 4, 4])
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"`kind` must be one of {NOISE_KINDS}, got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand((n, *shape), generator=gen)
    return (0.5 + torch.randn((n, *shape), generator=gen)).clamp_(0.0, 1.0)


def photo_crops(
    n: int, size: int, seed: int, *, grey: bool = False, min_side: int | None = None
) -> torch.Tensor:
    """``n`` random square crops of scikit-learn's two sample photos, area-downsampled to
    ``size`` x ``size``: ``(n, 3, size, size)`` (or ``(n, 1, size, size)`` with ``grey``) in
    [0, 1]. Crop sides are drawn from ``[min_side, 3 * min_side]`` (default ``min_side = size``).

    Raises:
        ImportError: scikit-learn (which ships the photos) is not installed.
    """
    from sklearn.datasets import load_sample_images

    photos = [
        torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
        for im in load_sample_images().images
    ]
    if grey:
        photos = [im.mean(0, keepdim=True) for im in photos]
    lo = min_side or size
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for k in range(n):
        im = photos[k % len(photos)]
        side = int(torch.randint(lo, 3 * lo + 1, (1,), generator=gen))
        i = int(torch.randint(0, im.shape[1] - side + 1, (1,), generator=gen))
        j = int(torch.randint(0, im.shape[2] - side + 1, (1,), generator=gen))
        crop = im[None, :, i : i + side, j : j + side]
        crops.append(F.interpolate(crop, size=(size, size), mode="area")[0])
    return torch.stack(crops) if crops else torch.empty(0, photos[0].shape[0], size, size)


class WithIndex(Dataset):
    """Wrap a dataset so that item ``i`` is ``(*dataset[i], i)`` (for per-sample augmentation)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple:
        return (*self.dataset[index], index)


def pil_to_tensor(
    image: Any, size: tuple[int, int] | None = None, channels: int = 3
) -> torch.Tensor:
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


def load_image_folder(
    root: str, shape: tuple[int, ...] | None = None, limit: int | None = None
) -> torch.Tensor:
    """The first ``limit`` images below ``root`` (sorted paths) as ``(n, C, H, W)``, converted
    to ``shape = (C, H, W)`` if given, else RGB at their own (common) size."""
    from PIL import Image

    size = None if shape is None else (shape[1], shape[2])
    tensors = []
    for path in image_files(root)[:limit]:
        with Image.open(path) as img:
            tensors.append(pil_to_tensor(img, size, 3 if shape is None else shape[0]))
    if shape is None and len({t.shape for t in tensors}) > 1:
        raise ValueError(f"images in {root!r} differ in size; an ID folder needs one size")
    return torch.stack(tensors)


def load_labelled_folder(root: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``root/<class>/<image>`` as ``(images (n, 3, H, W), labels (n,))``, classes in sorted
    order (:class:`ImageFolderDataset`); all images must share one size."""
    ds = ImageFolderDataset(root, transform=pil_to_tensor)
    items = [ds[i] for i in range(len(ds))]
    if len({x.shape for x, _ in items}) > 1:
        raise ValueError(f"images in {root!r} differ in size; an ID folder needs one size")
    x = torch.stack([x for x, _ in items])
    y = torch.tensor([label for _, label in items], dtype=torch.long)
    return x[:limit], y[:limit]


class ImageFolderDataset(Dataset):
    """``root/<class>/<file>`` images read with Pillow as RGB, ``(transform(image), class)``.

    Classes are the sorted sub-folder names, indexed 0, 1, ... like
    ``torchvision.datasets.ImageFolder``; files are sorted within each class.

    Args:
        root: Folder with one sub-folder per class.
        transform: Maps a ``PIL.Image`` to a ``(C, H, W)`` tensor.

    Attributes:
        classes: Sorted class names. ``class_to_idx``: name -> index.
        samples: ``(path, class index)`` pairs.
    """

    def __init__(self, root: str, transform: Callable[[object], torch.Tensor]) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"`root` must be an image folder, {root!r} does not exist")
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"no class sub-folders in {root!r}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [
            (os.path.join(root, c, f), self.class_to_idx[c])
            for c in self.classes
            for f in sorted(os.listdir(os.path.join(root, c)))
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
        if not self.samples:
            raise FileNotFoundError(f"no images with extensions {IMAGE_EXTENSIONS} under {root!r}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as img:
            image = img.convert("RGB")
        return self.transform(image), label
