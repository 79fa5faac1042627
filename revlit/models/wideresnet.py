"""Wide residual networks (Zagoruyko & Komodakis, BMVC 2016) in the pre-activation form used by
TRADES (Zhang et al. 2019) and RST (Carmon et al. 2019) for adversarial robustness on CIFAR-10.

WRN-d-k: a 3x3 stem with 16 channels, three stages of (d-4)/6 pre-activation basic blocks with
16k, 32k, 64k channels (strides 1, 2, 2), a final BN-ReLU, global average pooling and a linear
layer. WRN-28-10 has 36.5 M parameters and a 640-dimensional penultimate vector; its input
gradient runs at about 8-14 img/s on this 2-core CPU, so the WRNs are for GPU users.

Module names differ from TRADES's (``stem``, ``stages.<s>.<i>``, ``shortcut``, ``bn_out``):
:mod:`revlit.models.rst` maps the TRADES/RST key layout onto them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from revlit.models.base import CIFAR10_MEAN, CIFAR10_STD, Classifier
from revlit.models.registry import register, register_class


class WideBlock(nn.Module):
    """Pre-activation wide basic block (BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 + shortcut).

    As in the TRADES/RST WideResNet: when the channel count changes, the 1x1 shortcut
    convolution reads the *pre-activated* input ``relu(bn1(x))``; otherwise the shortcut is the
    raw input ``x``. (In a WRN the stride only changes together with the channel count.)

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: stride of the first convolution and of the shortcut.
        drop_rate: dropout probability between the two convolutions (0 in TRADES/RST).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        if c_in == c_out and stride != 1:
            raise ValueError("WideBlock: a strided block must also change the channel count")
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut: nn.Module | None = None
        if c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(act)
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + skip


@register_class
class WideResNet(Classifier):
    """WRN-depth-widen_factor for 32x32 images (pre-activation, TRADES/RST variant).

    Args:
        depth: 6n+4 (10, 16, 22, 28, 34, ...); n blocks per stage.
        widen_factor: k; the stages have 16k, 32k, 64k channels.
        num_classes: number of output classes.
        drop_rate: dropout inside the blocks (0.0 as in TRADES/RST).
        mean, std: normalisation applied inside the model; ``None`` = identity (raw [0,1]
            input, as the RST checkpoint of Carmon et al. expects).

    Input: images in [0, 1], shape (N, 3, 32, 32). Output: logits (N, num_classes).
    ``feature_dim`` = 64·widen_factor (640 for WRN-28-10): the vector after the final BN-ReLU
    and global average pooling.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        drop_rate: float = 0.0,
        mean: Sequence[float] | None = CIFAR10_MEAN,
        std: Sequence[float] | None = CIFAR10_STD,
    ) -> None:
        super().__init__(mean, std)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must be 6n+4 (10, 16, 22, 28, 34, ...), got {depth}"
            )
        if widen_factor < 1 or num_classes < 1:
            raise ValueError(
                f"WideResNet needs widen_factor >= 1 and num_classes >= 1, got {widen_factor}, {num_classes}"
            )
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"WideResNet drop_rate must be in [0, 1), got {drop_rate}")
        self.config = {
            "depth": depth,
            "widen_factor": widen_factor,
            "num_classes": num_classes,
            "drop_rate": drop_rate,
            "mean": list(mean) if mean is not None else None,
            "std": list(std) if std is not None else None,
        }
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        stages: list[nn.Module] = []
        c_in = 16
        for s, c_out in enumerate(widths):
            blocks = []
            for i in range(n):
                stride = 2 if s > 0 and i == 0 else 1
                blocks.append(WideBlock(c_in, c_out, stride, drop_rate))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn_out = nn.BatchNorm2d(c_in)
        self.feature_dim = c_in
        self.num_classes = num_classes
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        out = F.relu(self.bn_out(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


@register("wrn28_10")
def wrn28_10(**kwargs) -> WideResNet:
    """WRN-28-10 (36.5 M parameters; the architecture of TRADES's and RST's CIFAR-10 models)."""
    return WideResNet(depth=28, widen_factor=10, **kwargs)


@register("wrn34_10")
def wrn34_10(**kwargs) -> WideResNet:
    """WRN-34-10 (46.2 M parameters; the architecture of Madry-style PGD-AT baselines and TRADES)."""
    return WideResNet(depth=34, widen_factor=10, **kwargs)
