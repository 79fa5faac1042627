"""Linf adversaries used *inside* adversarial training (Madry et al. 2018; Wong et al. 2020).

These run in the model's current mode (train mode during training, as both papers do) and return
detached adversarial images; evaluation attacks live in :mod:`revlit.attacks.pgd`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from revlit.attacks.norms import linf_project


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (g,) = torch.autograd.grad(loss, x)
    return g


def fgsm_rs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 8 / 255,
    alpha: float = 10 / 255,
) -> torch.Tensor:
    """FGSM with a uniform random start (Wong, Rice & Kolter, ICLR 2020, "Fast is better than free").

    Args:
        x: clean images in [0,1], (N,C,H,W); y: labels (N,).
        eps: Linf budget; alpha: step size (10/255 at eps 8/255 in the paper).
    Returns:
        Adversarial images in the eps-ball ∩ [0,1], detached.
    """
    x0 = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0.0, 1.0)
    g = _input_grad(model, x0, y)
    return linf_project(x0 + alpha * g.sign(), x, eps).detach()


def pgd_linf_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 7,
) -> torch.Tensor:
    """PGD-AT inner maximisation (Madry et al., ICLR 2018): random start, ``steps`` signed steps."""
    xa = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0.0, 1.0)
    for _ in range(steps):
        g = _input_grad(model, xa, y)
        xa = linf_project(xa + alpha * g.sign(), x, eps).detach()
    return xa
