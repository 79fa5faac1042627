"""CIFAR ResNets of He et al. (CVPR 2016, §4.2): 6n+2 layers, three stages, width option.

ResNet-20 (n=3, 0.27 M parameters) is the CPU-friendly default of revlit (training times of the
shipped checkpoints: ``checkpoints/README.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from revlit.models.base import CIFAR10_MEAN, CIFAR10_STD, Classifier
from revlit.models.registry import register, register_class


class BasicBlock(nn.Module):
    """Post-activation basic block with a 1x1 projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@register_class
class CifarResNet(Classifier):
    """CIFAR ResNet-(6n+2) with a width multiplier.

    Args:
        depth: 20, 32, 44, 56, ... (must be 6n+2).
        width: channel multiplier; the stages have 16·width, 32·width, 64·width channels.
        num_classes: number of output classes.
        mean, std: normalisation applied inside the model (see :class:`Classifier`).

    Input: images in [0, 1], shape (N, 3, 32, 32). ``feature_dim`` = 64·width.
    """

    def __init__(
        self,
        depth: int = 20,
        width: int = 1,
        num_classes: int = 10,
        mean: Sequence[float] | None = CIFAR10_MEAN,
        std: Sequence[float] | None = CIFAR10_STD,
    ) -> None:
        super().__init__(mean, std)
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CifarResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}")
        if width < 1:
            raise ValueError(f"CifarResNet width must be >= 1, got {width}")
        self.config = {
            "depth": depth,
            "width": width,
            "num_classes": num_classes,
            "mean": list(mean) if mean is not None else None,
            "std": list(std) if std is not None else None,
        }
        n = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.feature_dim = widths[-1]
        self.num_classes = num_classes
        self.fc = nn.Linear(self.feature_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


@register("resnet20")
def resnet20(**kwargs) -> CifarResNet:
    """ResNet-20 (He et al. 2016), 0.27 M parameters at width 1."""
    return CifarResNet(depth=20, **kwargs)


@register("resnet32")
def resnet32(**kwargs) -> CifarResNet:
    """ResNet-32 (He et al. 2016)."""
    return CifarResNet(depth=32, **kwargs)


@register("resnet56")
def resnet56(**kwargs) -> CifarResNet:
    """ResNet-56 (He et al. 2016)."""
    return CifarResNet(depth=56, **kwargs)
