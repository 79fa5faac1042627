"""Fold eval-mode BatchNorm into the preceding convolution (a frozen backbone's cheaper twin).

In eval mode ``BatchNorm2d`` is an affine map per channel, so ``bn(conv(x))`` equals one convolution
with scaled weights and a bias. The folded copy computes the same function (to float rounding),
runs one op instead of two per layer in both the forward and the backward pass, and saves about
half the activations for the backward pass. The reverse attack (Mao et al., ICCV 2021) and the
attacks only need input gradients through a frozen classifier, so they can use it.

Only ``Conv2d -> BatchNorm2d`` pairs are folded: children named ``conv<k>`` / ``bn<k>`` of one
module (post-activation blocks, whose forward is ``bn<k>(conv<k>(x))``) and consecutive entries of
an ``nn.Sequential``. A model whose forward uses such a pair differently (pre-activation blocks
apply ``bn`` before ``conv``) is caught by a numerical check against the original, and then the
original model is returned unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(bn, nn.BatchNorm2d)
        and bn.num_features == conv.out_channels
        and bn.track_running_stats
    )


def fold_batchnorm(
    model: nn.Module, atol: float = 1e-4, image_size: int = 32
) -> tuple[nn.Module, int]:
    """A frozen, eval-mode copy of ``model`` with its Conv2d -> BatchNorm2d pairs folded.

    Args:
        model: a classifier with ``features(x)`` taking images in [0, 1], (N, 3, H, W).
        atol: largest allowed difference of ``features`` between the folded copy and the original
            on random images (absolute and relative); beyond it the fold is refused.
        image_size: side of the random check images.

    Returns:
        ``(module, pairs)``: the folded copy and the number of folded pairs, or ``(model, 0)``
        (the original, untouched) when nothing was foldable or the check failed. The copy's
        parameters do not require grad; its memory format follows the original's weights.
    """
    was_training = model.training
    model.eval()
    folded = copy.deepcopy(model).eval()
    pairs = 0
    for mod in folded.modules():
        children = dict(mod.named_children())
        for name, conv in children.items():
            if name.startswith("conv"):
                bn_name = "bn" + name[len("conv") :]
                bn = children.get(bn_name)
                if bn is not None and _foldable(conv, bn):
                    setattr(mod, name, fuse_conv_bn_eval(conv, bn))
                    setattr(mod, bn_name, nn.Identity())
                    pairs += 1
        if isinstance(mod, nn.Sequential):
            for i in range(len(mod) - 1):
                if _foldable(mod[i], mod[i + 1]):
                    mod[i] = fuse_conv_bn_eval(mod[i], mod[i + 1])
                    mod[i + 1] = nn.Identity()
                    pairs += 1
    model.train(was_training)
    if pairs == 0:
        return model, 0
    for p in folded.parameters():
        p.requires_grad_(False)
    p0 = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, image_size, image_size, generator=g).to(p0.device, p0.dtype)
    with torch.no_grad():
        model.eval()
        ref, got = model.features(x), folded.features(x)
        model.train(was_training)
    if not torch.allclose(got, ref, atol=atol, rtol=atol):
        return model, 0
    return folded, pairs
