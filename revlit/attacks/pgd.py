"""Projected gradient descent under Linf, L2 and L1 (evaluation attacks), framework-free.

``pgd(model, x, y, norm, eps, step_size, steps, restarts, loss, random_start, generator)`` maximises
a per-example loss (CE, CW margin or DLR, :mod:`revlit.attacks.losses`) over
(ε-ball of ``norm`` around x) ∩ [0,1] with the norm's own step and projection
(:mod:`revlit.attacks.norms`).

Per example, the returned point is the worst case seen over all iterates of all restarts:
misclassified beats correctly classified, then the higher loss wins (APGD's bookkeeping). This costs
one extra forward pass per restart (the last iterate is evaluated) and is never weaker than PGD's
last iterate. There is no early exit: every example runs every iteration of every restart, so the
result does not depend on which other examples share its batch.

The model is put in eval mode for the attack and its mode is restored afterwards; its parameters
are frozen (``requires_grad`` restored afterwards) and gradients are taken w.r.t. the input only
with ``torch.autograd.grad``. Images run in channels_last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from revlit.attacks.losses import LossFn, get_loss
from revlit.attacks.norms import (
    DEFAULT_EPS,
    L1_TOPK_DEFAULT,
    Generators,
    Norm,
    check_eps,
    default_step_size,
    project,
    random_init,
    step,
)
from revlit.models.base import frozen_eval


@dataclass
class AttackResult:
    """``x_adv`` (N,C,H,W), the attack loss (N,) and the prediction (N,) at ``x_adv``."""

    x_adv: torch.Tensor
    loss: torch.Tensor
    pred: torch.Tensor


def resolve_args(
    norm: Norm | str, eps: float | None, step_size: float | None, steps: int, restarts: int
) -> tuple[Norm, float, float]:
    """Validate the attack's arguments; returns (norm, eps, step size) with defaults filled in.

    Raises:
        ValueError: one line: unknown norm, negative/non-finite ε or step, steps < 0, restarts < 1.
    """
    norm = Norm.parse(norm)
    eps = DEFAULT_EPS[norm] if eps is None else check_eps(eps)
    if step_size is None:
        step_size = default_step_size(norm, eps)
    step_size = float(step_size)
    if not math.isfinite(step_size) or step_size < 0:
        raise ValueError(f"step_size must be a finite number >= 0, got {step_size}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps}")
    if int(restarts) != restarts or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts}")
    return norm, eps, step_size


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: Norm | str = Norm.LINF,
    eps: float | None = None,
    step_size: float | None = None,
    steps: int = 10,
    restarts: int = 1,
    loss: str | LossFn = "ce",
    random_start: bool = True,
    generator: Generators = None,
    l1_topk: float = L1_TOPK_DEFAULT,
) -> AttackResult:
    """PGD with restarts; returns the worst case per example and its loss and prediction.

    Args:
        model: classifier on [0,1] images returning logits.
        x: clean images in [0,1], (N,C,H,W); y: labels (N,).
        norm: ``Norm.LINF`` / ``L2`` / ``L1`` or a spelling :meth:`Norm.parse` accepts.
        eps: budget; default 8/255 (Linf), 0.5 (L2), 12 (L1).
        step_size: default :func:`revlit.attacks.norms.default_step_size` (ε/4).
        steps: gradient steps per restart (0: only the start point is evaluated).
        restarts: independent runs; the worst case per example is kept.
        loss: ``ce``, ``cw``, ``dlr`` or a callable ``(logits, y) -> (N,)``.
        random_start: start each restart at :func:`random_init` (else at ``x``).
        generator: a ``torch.Generator``, or one per example (see
            :func:`revlit.attacks.norms.draw_noise`), for the random starts.
        l1_topk: fraction of coordinates the sparse L1 step moves.
    """
    norm, eps, step_size = resolve_args(norm, eps, step_size, steps, restarts)
    loss_fn = get_loss(loss)
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    cl = x.dim() == 4
    x = x.detach()
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    best_x = x.clone()
    best_loss = torch.full((len(x),), -math.inf, device=x.device, dtype=x.dtype)
    best_mis = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    best_pred = y.clone()
    if len(x) == 0:
        return AttackResult(best_x, best_loss, best_pred)

    with frozen_eval(model):
        for _ in range(int(restarts)):
            xa = random_init(norm, x, eps, generator) if random_start and eps > 0 else x.clone()
            if cl:
                xa = xa.contiguous(memory_format=torch.channels_last)
            for t in range(int(steps) + 1):
                last = t == steps
                with torch.enable_grad() if not last else torch.no_grad():
                    xa.requires_grad_(not last)
                    logits = model(xa)
                    lv = loss_fn(logits, y)
                # keep the worst case seen so far (misclassified first, then higher loss)
                lvd = lv.detach()
                pred = logits.detach().argmax(1)
                mis = pred != y
                better = (mis & ~best_mis) | ((mis == best_mis) & (lvd > best_loss))
                if better.any():
                    b4 = better.view(-1, *([1] * (x.dim() - 1)))
                    best_x = torch.where(b4, xa.detach(), best_x)
                    best_loss = torch.where(better, lvd, best_loss)
                    best_mis = best_mis | mis
                    best_pred = torch.where(better, pred, best_pred)
                if last:
                    break
                (g,) = torch.autograd.grad(lv.sum(), xa)
                xa = project(norm, step(norm, xa.detach(), g, step_size, l1_topk), x, eps)
    if cl:
        best_x = best_x.contiguous(memory_format=torch.channels_last)
    return AttackResult(best_x.detach(), best_loss, best_pred)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: Norm | str = Norm.LINF,
    eps: float | None = None,
    step_size: float | None = None,
    steps: int = 10,
    restarts: int = 1,
    loss: str | LossFn = "ce",
    random_start: bool = True,
    generator: Generators = None,
    l1_topk: float = L1_TOPK_DEFAULT,
) -> torch.Tensor:
    """PGD adversarial images (see :func:`pgd_attack` for the arguments)."""
    return pgd_attack(
        model, x, y, norm, eps, step_size, steps, restarts, loss, random_start, generator, l1_topk
    ).x_adv
