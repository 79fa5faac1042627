"""Pre-activation ResNets (He, Zhang, Ren & Sun, "Identity Mappings in Deep Residual Networks",
ECCV 2016), in the CIFAR form used by the adversarial-training literature (Wong et al. 2020;
Rice et al. 2020): a 3x3 stem, four stages of pre-activation basic blocks (64, 128, 256, 512
channels at width 64), a final BN-ReLU, global average pooling and a linear layer.

PreActResNet-18 has 11.2 M parameters: it is meant for GPU users.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from revlit.models.base import CIFAR10_MEAN, CIFAR10_STD, Classifier
from revlit.models.registry import register, register_class

# Basic-block counts per stage for the two depths of He et al.'s basic-block family.
_STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``x + conv(relu(bn(conv(relu(bn(x))))))``.

    When the shape changes, the shortcut is a 1x1 convolution (no BN) applied to the
    pre-activated input ``relu(bn1(x))``, as in He et al. (2016b).

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: stride of the first convolution (and of the shortcut).
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


@register_class
class PreActResNet(Classifier):
    """Pre-activation ResNet-18/34 for 32x32 images.

    Args:
        depth: 18 (blocks 2-2-2-2) or 34 (blocks 3-4-6-3).
        width: channels of the first stage; stages have width·(1, 2, 4, 8) channels.
        num_classes: number of output classes.
        mean, std: normalisation applied inside the model (``None`` = identity).

    Input: images in [0, 1], shape (N, 3, 32, 32). Output: logits (N, num_classes).
    ``feature_dim`` = 8·width (512 for PreActResNet-18): the vector after the final BN-ReLU and
    global average pooling.
    """

    def __init__(
        self,
        depth: int = 18,
        width: int = 64,
        num_classes: int = 10,
        mean: Sequence[float] | None = CIFAR10_MEAN,
        std: Sequence[float] | None = CIFAR10_STD,
    ) -> None:
        super().__init__(mean, std)
        if depth not in _STAGE_BLOCKS:
            raise ValueError(
                f"PreActResNet depth must be one of {sorted(_STAGE_BLOCKS)}, got {depth}"
            )
        if width < 1 or num_classes < 1:
            raise ValueError(
                f"PreActResNet needs width >= 1 and num_classes >= 1, got {width}, {num_classes}"
            )
        self.config = {
            "depth": depth,
            "width": width,
            "num_classes": num_classes,
            "mean": list(mean) if mean is not None else None,
            "std": list(std) if std is not None else None,
        }
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        c_in = width
        for stage, n_blocks in enumerate(_STAGE_BLOCKS[depth]):
            c_out = width * 2**stage
            for i in range(n_blocks):
                blocks.append(PreActBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.feature_dim = c_in
        self.num_classes = num_classes
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(x))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


@register("preact18")
def preact18(**kwargs) -> PreActResNet:
    """PreActResNet-18 (He et al. 2016, identity mappings), 11.2 M parameters at width 64."""
    return PreActResNet(depth=18, **kwargs)
