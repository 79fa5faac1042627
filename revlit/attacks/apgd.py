"""Auto-PGD (APGD) of Croce & Hein (ICML 2020), framework-free, on any gradient oracle.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (ICML 2020), Algorithm 1. APGD is PGD with

- a step size that starts at η = 2ε and is **halved at checkpoints** w_j when progress stalls,
- **momentum** α = 0.75: x⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + α(z⁽ᵏ⁺¹⁾ − x⁽ᵏ⁾) + (1 − α)(x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾)) with
  z⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + η s(∇f(x⁽ᵏ⁾))) and s the norm's steepest-ascent direction,
- a **restart from the best point** x_max whenever the step is halved.

Checkpoints: p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), w_j = ⌈p_j N_iter⌉.
At checkpoint w_j the step of an example is halved if either

1. the loss went up in fewer than ρ·(w_j − w_{j−1}) of the steps since w_{j−1} (ρ = 0.75), or
2. the step was not halved at w_{j−1} and the best loss f_max did not improve since w_{j−1}.

(On a halving the iterate returns to x_max and its momentum is reset: the previous iterate is
taken to be x_max too. The paper leaves that detail open; this is revlit's choice.)

The attack sees the model only through an **oracle** ``oracle(x_adv, need_grad) -> Evaluation``:
the per-example loss to maximise, its gradient w.r.t. ``x_adv``, and the fraction of the model's
draws that misclassify ``x_adv`` (0 or 1 for a plain classifier; k/m for a randomised defense
averaged over m draws, see :mod:`revlit.attacks.adaptive`). So the same code attacks a plain
classifier (:func:`apgd_attack`) and a purified one through BPDA + EOT.

Bookkeeping: per example, the returned point is the iterate (over all iterations and restarts)
misclassified by the largest fraction of draws, ties broken by the higher loss; ``broken`` says
whether any iterate was misclassified by any draw. Threat models: Linf and L2 (images [0, 1]
float NCHW; the feasible set is the ε-ball ∩ [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from revlit.attacks.losses import LossFn, get_loss
from revlit.attacks.norms import (
    DEFAULT_EPS,
    Generators,
    Norm,
    check_eps,
    l2_step,
    project,
    random_init,
)
from revlit.attacks.pgd import frozen_eval


@dataclass
class Evaluation:
    """What an attack sees at one point.

    Attributes:
        loss: per-example loss to maximise, (N,).
        grad: gradient of ``loss.sum()`` w.r.t. the point, (N, C, H, W); ``None`` if not asked.
        wrong: fraction of the model's draws that misclassify the point, (N,) float in [0, 1].
    """

    loss: torch.Tensor
    grad: torch.Tensor | None
    wrong: torch.Tensor


Oracle = Callable[[torch.Tensor, bool], Evaluation]


def classifier_oracle(model: nn.Module, y: torch.Tensor, loss: str | LossFn = "ce") -> Oracle:
    """The oracle of a plain (deterministic) classifier: loss, input gradient, 0/1 error.

    Args:
        model: classifier on [0, 1] images returning logits (N, C); used as it is (put it in eval
            mode and freeze it yourself, or use :func:`apgd_attack`).
        y: labels (N,).
        loss: ``ce``, ``cw``, ``dlr`` or a callable ``(logits, y) -> (N,)``.
    """
    loss_fn = get_loss(loss)

    def oracle(xa: torch.Tensor, need_grad: bool) -> Evaluation:
        with torch.enable_grad() if need_grad else torch.no_grad():
            xa = xa.detach().requires_grad_(need_grad)
            logits = model(xa)
            lv = loss_fn(logits, y)
            g = torch.autograd.grad(lv.sum(), xa)[0] if need_grad else None
        wrong = (logits.detach().argmax(1) != y).to(xa.dtype)
        return Evaluation(lv.detach(), g, wrong)

    return oracle


def checkpoints(steps: int) -> list[int]:
    """APGD's checkpoint iterations w_j = ⌈p_j·steps⌉ in (0, steps], increasing, no duplicates.

    >>> checkpoints(100)
    [22, 41, 57, 70, 80, 87, 93, 99]
    """
    ps = [0.0, 0.22]
    while True:
        nxt = ps[-1] + max(ps[-1] - ps[-2] - 0.03, 0.06)
        if nxt > 1.0:
            break
        ps.append(nxt)
    out: list[int] = []
    for p in ps[1:]:
        w = math.ceil(round(p * steps, 9))
        if 0 < w <= steps and (not out or w > out[-1]):
            out.append(w)
    return out


@dataclass
class APGDResult:
    """Result of :func:`apgd`.

    Attributes:
        x_adv: the worst point per example (most draws wrong, then highest loss), (N, C, H, W).
        loss: the oracle's loss at ``x_adv``, (N,).
        wrong: fraction of draws wrong at ``x_adv``, (N,).
        broken: some iterate was misclassified by some draw, (N,) bool.
        eta: step sizes at the end of the last restart, (N,).
        eta_history: step size after each checkpoint of the last restart (row 0: the initial
            η = 2ε), (1 + number of checkpoints, N).
        loss_history: the loss at every iterate x⁽⁰⁾..x⁽ᴺ⁾ of the last restart, (steps + 1, N).
        oracle_calls: number of oracle evaluations (all with a gradient).
    """

    x_adv: torch.Tensor
    loss: torch.Tensor
    wrong: torch.Tensor
    broken: torch.Tensor
    eta: torch.Tensor
    eta_history: torch.Tensor
    loss_history: torch.Tensor
    oracle_calls: int = 0
    checkpoints: list[int] = field(default_factory=list)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _ascent(norm: Norm, grad: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """Steepest-ascent step of per-example length ``eta`` (Linf: sign; L2: normalised gradient)."""
    if norm is Norm.LINF:
        return grad.sign() * _bcast(eta, grad)
    return l2_step(grad, 1.0) * _bcast(eta, grad)


def _better(wrong, loss, best_wrong, best_loss) -> torch.Tensor:
    """More draws wrong wins; at equal ``wrong`` the higher loss wins."""
    return (wrong > best_wrong) | ((wrong == best_wrong) & (loss > best_loss))


def apgd(
    oracle: Oracle,
    x: torch.Tensor,
    norm: Norm | str = Norm.LINF,
    eps: float | None = None,
    steps: int = 100,
    restarts: int = 1,
    rho: float = 0.75,
    momentum: float = 0.75,
    random_start: bool = True,
    generator: Generators = None,
) -> APGDResult:
    """APGD (Croce & Hein 2020) maximising the oracle's loss over the ε-ball ∩ [0, 1].

    Args:
        oracle: ``oracle(x_adv, need_grad) -> Evaluation`` (see :func:`classifier_oracle`).
        x: clean images in [0, 1], (N, C, H, W).
        norm: ``Norm.LINF`` or ``Norm.L2`` (or a spelling :meth:`Norm.parse` accepts).
        eps: budget; default 8/255 (Linf) or 0.5 (L2).
        steps: iterations N_iter per restart (each costs one oracle call; one more for x⁽⁰⁾).
        restarts: independent runs from fresh random starts; the worst point per example is kept.
        rho: the fraction ρ of condition 1 (0.75 in the paper).
        momentum: α (0.75 in the paper; 1 = no momentum).
        random_start: start at a uniform point of the ε-ball (else at ``x``).
        generator: ``torch.Generator`` (or one per example) for the random starts.

    Returns:
        :class:`APGDResult`.

    Raises:
        ValueError: L1 (not implemented here), bad ``steps``/``restarts``/``rho``/``momentum``.
    """
    norm = Norm.parse(norm)
    if norm is Norm.L1:
        raise ValueError("apgd supports l_inf and l_2 (use revlit.attacks.pgd for l_1)")
    eps = DEFAULT_EPS[norm] if eps is None else check_eps(eps)
    if int(steps) != steps or steps < 1:
        raise ValueError(f"apgd steps must be an integer >= 1, got {steps}")
    if int(restarts) != restarts or restarts < 1:
        raise ValueError(f"apgd restarts must be an integer >= 1, got {restarts}")
    if not 0.0 < rho <= 1.0 or not 0.0 < momentum <= 1.0:
        raise ValueError(f"apgd rho and momentum must be in (0, 1], got {rho}, {momentum}")
    steps, restarts = int(steps), int(restarts)
    x = x.detach()
    n = len(x)
    ckpts = checkpoints(steps)
    best_x = x.clone()
    best_loss = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
    best_wrong = torch.full((n,), -1.0, device=x.device, dtype=x.dtype)
    broken = torch.zeros(n, dtype=torch.bool, device=x.device)
    calls = 0
    eta = torch.full((n,), 2.0 * eps, device=x.device, dtype=x.dtype)
    eta_hist: list[torch.Tensor] = []
    loss_hist: list[torch.Tensor] = []

    def keep(xa: torch.Tensor, ev: Evaluation) -> None:
        nonlocal best_x, best_loss, best_wrong, broken
        b = _better(ev.wrong, ev.loss, best_wrong, best_loss)
        best_x = torch.where(_bcast(b, xa), xa, best_x)
        best_loss = torch.where(b, ev.loss, best_loss)
        best_wrong = torch.where(b, ev.wrong, best_wrong)
        broken = broken | (ev.wrong > 0)

    for _ in range(restarts):
        xk = random_init(norm, x, eps, generator) if random_start and eps > 0 else x.clone()
        ev = oracle(xk, True)
        calls += 1
        keep(xk, ev)
        f_cur, g_cur = ev.loss, ev.grad
        f_max, x_max, g_max = f_cur.clone(), xk.clone(), g_cur.clone()
        eta = torch.full((n,), 2.0 * eps, device=x.device, dtype=x.dtype)
        eta_hist, loss_hist = [eta.clone()], [f_cur.clone()]
        x_prev = xk.clone()
        increases = torch.zeros(n, device=x.device, dtype=x.dtype)
        last_w, f_max_at_last = 0, f_max.clone()
        halved_at_last = torch.zeros(n, dtype=torch.bool, device=x.device)
        for k in range(steps):
            z = project(norm, xk + _ascent(norm, g_cur, eta), x, eps)
            if k == 0:
                x_new = z
            else:
                x_new = xk + momentum * (z - xk) + (1.0 - momentum) * (xk - x_prev)
                x_new = project(norm, x_new, x, eps)
            ev = oracle(x_new, True)
            calls += 1
            keep(x_new, ev)
            increases += (ev.loss > f_cur).to(x.dtype)
            up = ev.loss > f_max
            f_max = torch.where(up, ev.loss, f_max)
            x_max = torch.where(_bcast(up, x_new), x_new, x_max)
            g_max = torch.where(_bcast(up, x_new), ev.grad, g_max)
            x_prev, xk, f_cur, g_cur = xk, x_new, ev.loss, ev.grad
            loss_hist.append(f_cur.clone())
            if k + 1 in ckpts:
                w = k + 1
                cond1 = increases < rho * (w - last_w)
                cond2 = ~halved_at_last & (f_max <= f_max_at_last)
                halve = cond1 | cond2
                eta = torch.where(halve, eta / 2.0, eta)
                hb = _bcast(halve, xk)
                xk = torch.where(hb, x_max, xk)
                x_prev = torch.where(hb, x_max, x_prev)
                f_cur = torch.where(halve, f_max, f_cur)
                g_cur = torch.where(hb, g_max, g_cur)
                halved_at_last = halve
                f_max_at_last = f_max.clone()
                increases.zero_()
                last_w = w
                eta_hist.append(eta.clone())
    return APGDResult(
        x_adv=best_x.detach(),
        loss=best_loss,
        wrong=best_wrong.clamp_min(0.0),
        broken=broken,
        eta=eta,
        eta_history=torch.stack(eta_hist),
        loss_history=torch.stack(loss_hist),
        oracle_calls=calls,
        checkpoints=ckpts,
    )


def apgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: Norm | str = Norm.LINF,
    eps: float | None = None,
    steps: int = 100,
    restarts: int = 1,
    loss: str | LossFn = "ce",
    random_start: bool = True,
    generator: Generators = None,
) -> APGDResult:
    """APGD-CE / APGD-DLR on a plain classifier (frozen, in eval mode for the attack).

    Args:
        model: classifier on [0, 1] images (N, C, H, W) returning logits (N, classes).
        x: clean images in [0, 1]; y: labels (N,).
        loss: ``ce`` (APGD-CE) or ``dlr`` (APGD-DLR), ``cw`` or a callable.
        Others: see :func:`apgd`.
    """
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    with frozen_eval(model):
        return apgd(
            classifier_oracle(model, y, loss),
            x,
            norm=norm,
            eps=eps,
            steps=steps,
            restarts=restarts,
            random_start=random_start,
            generator=generator,
        )
