"""A plain, deliberately unoptimised reverse attack: the numerics reference of the fast purifier.

Same algorithm and the same use of the random generator as
:meth:`revlit.defenses.reverse.ReversePurifier.purify` (Linf or L2 ball, last iterate): the random
start is drawn first, then each step's fresh views, then the views of the final loss. No chunking,
no channels_last, no frozen parameters — it is what a first implementation looks like, and the
``make bench`` "before" row. Tests check that the fast purifier returns the same images.
"""

from __future__ import annotations

import torch
from torch import nn

from revlit.attacks.norms import Norm, project, random_init
from revlit.defenses.reverse import SETTINGS


def reference_purify(
    classifier: nn.Module,
    head: nn.Module,
    loss,
    views,
    x: torch.Tensor,
    norm: Norm | str = SETTINGS["norm"],
    eps: float = SETTINGS["eps"],
    step_size: float = SETTINGS["step_size"],
    steps: int = SETTINGS["steps"],
    n_views: int = SETTINGS["n_views"],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse attack of Mao et al. (ICCV 2021), written as plainly as possible.

    Args:
        classifier, head, loss, views: as for :class:`revlit.defenses.reverse.ReversePurifier`
            (modules must already be in eval mode).
        x: images in [0, 1], (N, 3, H, W).
        norm: ``Norm.LINF`` (signed steps) or ``Norm.L2`` (normalised-gradient steps).
        eps, step_size, steps, n_views: the budget ε_r, the step, K and V (defaults: the
            purifier's).
        generator: the only source of randomness.

    Returns:
        ``(x_repaired, loss_per_step)`` with shapes (N, 3, H, W) and (N, steps + 1).
    """
    norm = Norm.parse(norm)
    x = x.detach().contiguous()
    cur = random_init(norm, x, eps, generator)
    losses = []
    for t in range(steps + 1):
        xr = cur.detach().clone().requires_grad_(t < steps)
        with torch.set_grad_enabled(t < steps):
            z = head(classifier.features(views(xr, n_views, generator)))
            per = loss(z, n_views, reduction="none")
        losses.append(per.detach().float())
        if t == steps:
            break
        per.sum().backward()
        g = xr.grad
        if norm is Norm.LINF:
            direction = g.sign()
        else:
            flat = g.flatten(1).norm(dim=1).clamp_min(1e-12)
            direction = g / flat.view(-1, 1, 1, 1)
        cur = project(norm, cur - step_size * direction, x, eps)
    return cur.detach(), torch.stack(losses, dim=1)
