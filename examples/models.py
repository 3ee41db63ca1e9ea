"""Classifiers used by the example scripts (torch only; torchvision only for ``tv_*``).

CIFAR models (32x32 input), the architectures of the paper plus two small CPU models:

=================  ==========================================================================
``small_cnn``      3 conv layers with BatchNorm, 94 k parameters; for CPU runs
``small_cnn_gn``   the same with GroupNorm: per-sample statistics, so a batch split across
                   processes (DDP) gives exactly the whole-batch result
``small_cnn_wide`` ``small_cnn`` at double width (64, 128, 256 channels), 370 k parameters
``tiny_cnn``       ``small_cnn`` at half width (16, 32, 64 channels), 24 k parameters; the
                   model of the CPU reproduction study (``benchmarks/reproduce.py``)
``resnet18``       CIFAR ResNet-18: 3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2]
``resnet34``       CIFAR ResNet-34: BasicBlocks [3, 4, 6, 3]
``madry_resnet``   "Madry's ResNet" of the paper: pre-activation WideResNet-34, widen factor 1
``fast_cnn``       the airbench-style network of ``fast_cifar.py`` (64/256/256 channels, 2.0 M
                   parameters, 89.6 % on the data pack's JPEG CIFAR-10 with its own recipe,
                   ``train_cifar.py --recipe fast``); 3-channel input only, and its whitening
                   layer is set from data by ``fast_cifar.init_whitening`` before training
=================  ==========================================================================

ImageNet-size models (for ``finetune_imagenet30.py``):

====================  =======================================================================
``tv_resnet18``       ``torchvision.models.resnet18`` (needs torchvision)
``tv_resnet101``      ``torchvision.models.resnet101`` (needs torchvision)
``local_resnet18``    a ResNet-18 with torchvision's layout and parameter names, written here so
                      that tests run without torchvision; a torchvision ResNet-18 state dict loads
                      into it
====================  =======================================================================

Example:
    >>> model = build_model("small_cnn", num_classes=10)
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from train_utils import require_torchvision

MODEL_NAMES = (
    "small_cnn",
    "small_cnn_gn",
    "small_cnn_wide",
    "tiny_cnn",
    "resnet18",
    "resnet34",
    "madry_resnet",
    "fast_cnn",
)
IMAGENET_MODEL_NAMES = ("tv_resnet18", "tv_resnet101", "local_resnet18")
ALL_MODEL_NAMES = MODEL_NAMES + IMAGENET_MODEL_NAMES


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class SmallCNN(nn.Module):
    """Three conv-norm-ReLU-maxpool stages (32, 64, 128 channels), global average pool, linear.

    Args:
        num_classes: Number of outputs N.
        in_channels: Input channels C of ``(B, C, H, W)`` images.
        norm: ``"batch"`` (BatchNorm2d) or ``"group"`` (GroupNorm with 8 groups).
        widths: Channels of the three stages.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        norm: str = "batch",
        widths: tuple[int, ...] = (32, 64, 128),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in widths:
            norm_layer = nn.BatchNorm2d(c_out) if norm == "batch" else nn.GroupNorm(8, c_out)
            layers += [_conv3x3(c_in, c_out), norm_layer, nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` images to ``(B, N)`` logits."""
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class BasicBlock(nn.Module):
    """Post-activation residual block (two 3x3 convs), torchvision's parameter names."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(out + skip)


class ResNet(nn.Module):
    """ResNet with BasicBlocks; ``stem="cifar"`` (3x3 conv, no pool) or ``"imagenet"`` (7x7/2 + pool).

    Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1``..``layer4``, ``fc``).

    Args:
        blocks: Number of BasicBlocks in each of the four stages.
        num_classes: Number of outputs N.
        stem: Input stem, see above.
        in_channels: Input channels C.
    """

    def __init__(
        self,
        blocks: tuple[int, int, int, int],
        num_classes: int,
        stem: str = "cifar",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if stem == "cifar":
            self.conv1 = _conv3x3(in_channels, 64)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        c_in = 64
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
            layer = [BasicBlock(c_in, width, 1 if i == 0 else 2)]
            layer += [BasicBlock(width, width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layer))
            c_in = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)
        if stem == "imagenet":  # torchvision's initialisation
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` images to ``(B, N)`` logits."""
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class PreActBlock(nn.Module):
    """Pre-activation wide-ResNet block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a skip.

    When the width or stride changes, the shortcut is a 1x1 conv applied to the *activated*
    input (BN-ReLU shared with the main path); otherwise it is the raw input.
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.shortcut: nn.Module | None = None
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """Pre-activation WideResNet-``depth``-``widen`` for 32x32 input.

    Stages of ``(depth - 4) / 6`` blocks with widths ``16k, 32k, 64k`` after a 16-channel 3x3
    stem; final BN-ReLU, global average pool, linear. ``WideResNet(34, 1)`` is the paper's
    "Madry's ResNet" (about 0.46 M parameters).

    Args:
        depth: Total depth, ``depth - 4`` divisible by 6.
        widen: Width multiplier k.
        num_classes: Number of outputs N.
        in_channels: Input channels C.
    """

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"`depth` must satisfy (depth - 4) % 6 == 0, got {depth!r}")
        n = (depth - 4) // 6
        self.conv1 = _conv3x3(in_channels, 16)
        stages = []
        c_in = 16
        for i, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            layer = [PreActBlock(c_in, width, 1 if i == 0 else 2)]
            layer += [PreActBlock(width, width, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layer))
            c_in = width
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():  # He init over fan-out, zero linear bias (as the authors' code)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, H, W)`` images to ``(B, N)`` logits."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _torchvision_resnet(name: str, num_classes: int) -> nn.Module:
    torchvision = require_torchvision(
        f"model {name!r}", "use 'local_resnet18' (--arch local_resnet18) to run without it"
    )
    ctor = torchvision.models.resnet18 if name == "tv_resnet18" else torchvision.models.resnet101
    return ctor(weights=None, num_classes=num_classes)


def build_model(name: str, num_classes: int, *, in_channels: int = 3) -> nn.Module:
    """Build a randomly initialised classifier by name.

    Args:
        name: One of ``ALL_MODEL_NAMES`` (see the module docstring).
        num_classes: Number of outputs N (>= 1).
        in_channels: Input channels C of ``(B, C, H, W)`` images (not for ``tv_*``).

    Returns:
        A module mapping ``(B, C, H, W)`` float images to ``(B, N)`` logits.

    Raises:
        ValueError: Unknown ``name`` or ``num_classes`` < 1.
        ImportError: ``tv_*`` model without torchvision.

    Example:
        >>> build_model("madry_resnet", 100)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 100])
    """
    if name not in ALL_MODEL_NAMES:
        raise ValueError(f"`name` must be one of {ALL_MODEL_NAMES}, got {name!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive int, got {num_classes!r}")
    if name == "tiny_cnn":
        return SmallCNN(num_classes, in_channels, "batch", widths=(16, 32, 64))
    if name == "small_cnn_wide":
        return SmallCNN(num_classes, in_channels, "batch", widths=(64, 128, 256))
    if name in ("small_cnn", "small_cnn_gn"):
        norm = "batch" if name == "small_cnn" else "group"
        return SmallCNN(num_classes, in_channels, norm)
    if name == "resnet18":
        return ResNet((2, 2, 2, 2), num_classes, "cifar", in_channels)
    if name == "resnet34":
        return ResNet((3, 4, 6, 3), num_classes, "cifar", in_channels)
    if name == "madry_resnet":
        return WideResNet(34, 1, num_classes, in_channels)
    if name == "fast_cnn":
        if in_channels != 3:
            raise ValueError(f"fast_cnn takes 3-channel images, got in_channels={in_channels}")
        from fast_cifar import FastNet

        return FastNet(num_classes)
    if name == "local_resnet18":
        return ResNet((2, 2, 2, 2), num_classes, "imagenet", in_channels)
    return _torchvision_resnet(name, num_classes)
