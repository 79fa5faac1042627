"""Adaptive attacks on a test-time purification defense, and their honest bookkeeping.

Attacks computed on the undefended classifier and then purified are a *transfer* evaluation.
Croce et al. ("Evaluating the Adversarial Robustness of Adaptive Test-time Defenses", ICML 2022,
arXiv 2202.13711) attacked nine test-time defenses, the reverse attack of Mao et al. (ICCV 2021)
among them, and found none clearly more robust than its static model once the attack targeted the
defense. This module implements those attacks, framework-free; the defended model enters only as
plain callables, so every piece runs on toys in tests:

- ``classifier(x) -> logits (N, C)`` for images x in [0, 1], (N, C, H, W);
- ``purifier(x, generator) -> x_repaired`` (or a tuple whose first item is ``x_repaired``, as
  :meth:`revlit.defenses.reverse.ReversePurifier.purify` returns), or an object with ``.purify``;
  randomness only from ``generator``;
- ``ssl_loss(x, generator) -> (N,)``: the self-supervised loss per image, differentiable w.r.t. x.

Attacks (threat model: Linf or L2 ball of radius ε around the clean image, ∩ [0, 1]):

- **defense-aware PGD** (Mao et al.'s own adaptive attack, §5): maximise
  CE(f(x')) − λ·L_ssl(x') (λ = 10, 2 views) so that x' is misclassified *and* looks natural to
  the self-supervised task, then purify x' as deployed;
- **BPDA + EOT** (Athalye et al. 2018; Croce et al. 2022): the gradient of the classifier's loss at
  the purified point, passed straight through the purifier (its Jacobian taken as the identity),
  averaged over m independent purifier draws (fresh random start and views): the oracle of
  :func:`bpda_eot_oracle`, used inside PGD (:func:`pgd_oracle`) and APGD
  (:func:`revlit.attacks.apgd.apgd`) with the CE or DLR loss;
- a **fixed-seed** (deterministic) purifier as a second target: :func:`fixed_seed`.

Bookkeeping (Carlini et al. 2019, "On Evaluating Adversarial Robustness"): a point is *broken* if
the defended classifier misclassified it at any attack iterate or in any evaluation draw. The final
points are evaluated with r fresh draws of the deployed purifier (:func:`evaluate_defense`);
:mod:`revlit.adaptive_report` reports the mean accuracy over the draws and that worst case (never
above the mean); :mod:`revlit.attacks.cascade` runs the attacks. The purifier inside the attack
may be a cheaper one (fewer steps and views, as Croce et al. used); iterate breaks only count toward the worst case when the attack ran the deployed purifier,
because a break of a different purifier is no break of the deployed defense.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from revlit.attacks.apgd import Evaluation, Oracle, apgd
from revlit.attacks.losses import LossFn, get_loss
from revlit.attacks.norms import (
    Generators,
    Norm,
    project,
    random_init,
    step,
)
from revlit.attacks.pgd import frozen_eval, resolve_args
from revlit.models.precision import full_precision

Purifier = Callable[..., torch.Tensor | tuple]
SSLLoss = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


# --------------------------------------------------------------------------- purifier helpers
def as_purifier(purifier) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]:
    """A function ``(x, generator) -> x_repaired`` (detached) from a purifier object or callable.

    Accepts an object with a ``purify`` method or a callable; a tuple result (as
    ``ReversePurifier.purify`` returns ``(x_repaired, loss_per_step)``) is reduced to its first item.

    Raises:
        ValueError: ``purifier`` is neither callable nor has ``purify``.
    """
    fn = getattr(purifier, "purify", purifier)
    if not callable(fn):
        raise ValueError(
            f"a purifier must be callable or have .purify, got {type(purifier).__name__}"
        )

    def run(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        out = fn(x, generator)
        if isinstance(out, tuple):
            out = out[0]
        return out.detach()

    return run


def identity_purifier(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The no-op purifier (returns ``x``): BPDA + EOT through it is plain PGD / APGD."""
    return x


def fixed_seed(
    purifier, seed: int = 0
) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]:
    """A deterministic purifier: every call uses a fresh generator seeded with ``seed``.

    The generator argument is ignored, so the same batch always gets the same random start and
    views: a fixed function of its input, the "deterministic" second target of Croce et al. 2022.
    """
    run = as_purifier(purifier)

    def det(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return run(x, torch.Generator().manual_seed(int(seed)))

    return det


def spawn_generators(generator: torch.Generator | None, m: int) -> list[torch.Generator]:
    """``m`` independent CPU generators seeded from ``generator`` (``None``: torch's global RNG)."""
    seeds = torch.randint(0, 2**62, (m,), generator=generator)
    return [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]


@contextmanager
def counting_passes(module: nn.Module) -> Iterator[list[int]]:
    """Count images through a backbone: yields a one-item list holding the running count.

    A forward hook on the first ``Conv2d`` (else ``Linear``) of ``module`` adds the batch size of
    every call, whichever entry point ran it (``forward``, ``features``, a purifier's views). A
    *pass* is one image through the backbone, with or without a backward pass to the input.
    """
    first = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        first = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
    count = [0]
    if first is None:
        yield count
        return

    def hook(_mod, inputs, _out):
        count[0] += int(inputs[0].shape[0])

    handle = first.register_forward_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


def _logits(classifier: Callable, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    if chunk is None or len(x) <= chunk:
        return classifier(x)
    return torch.cat([classifier(part) for part in x.split(chunk)])


# ------------------------------------------------------------------------------------ oracles
def bpda_eot_oracle(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    purifier,
    y: torch.Tensor,
    loss: str | LossFn = "ce",
    eot: int = 4,
    generator: torch.Generator | None = None,
    chunk: int | None = 512,
) -> Oracle:
    """BPDA + EOT gradient oracle of a randomised purifier followed by a classifier.

    At a point x the oracle draws ``eot`` independent purifications x̂_j = purify(x, g_j) (fresh
    generators from ``generator``: new random start and views every call), evaluates the loss
    ℓ(f(x̂_j), y) and returns

    - loss: (1/m) Σ_j ℓ(f(x̂_j), y), (N,);
    - grad: (1/m) Σ_j ∇_x̂ ℓ(f(x̂_j), y), the purifier's Jacobian taken as the identity (BPDA),
      (N, C, H, W);
    - wrong: the fraction of the m draws whose prediction differs from y, (N,).

    Each draw purifies the whole batch at once (the defense's contrastive loss takes its negatives
    from the batch, as deployed). Cost per call: m purifications + m·N classifier passes.

    Args:
        classifier: logits (N, C) of images in [0, 1].
        purifier: see :func:`as_purifier`.
        y: labels (N,).
        loss: ``ce``, ``dlr``, ``cw`` or a callable ``(logits, y) -> (N,)``.
        eot: m, the number of purifier draws averaged (>= 1).
        generator: seeds the draws.
        chunk: classify at most this many purified images at a time (``None``: all at once).
    """
    if int(eot) != eot or eot < 1:
        raise ValueError(f"eot (number of purifier draws) must be an integer >= 1, got {eot}")
    run = as_purifier(purifier)
    loss_fn = get_loss(loss)
    m = int(eot)

    def oracle(xa: torch.Tensor, need_grad: bool) -> Evaluation:
        xa = xa.detach()
        n = len(xa)
        xp = torch.cat([run(xa, g) for g in spawn_generators(generator, m)])
        ym = y.repeat(m)
        with torch.enable_grad() if need_grad else torch.no_grad():
            xp = xp.detach().requires_grad_(need_grad)
            logits = _logits(classifier, xp, chunk)
            lv = loss_fn(logits, ym)
            g = torch.autograd.grad(lv.sum(), xp)[0] if need_grad else None
        wrong = (logits.detach().argmax(1) != ym).to(xa.dtype).view(m, n).mean(0)
        if g is not None:
            g = g.reshape(m, *xa.shape).mean(0)
            if xa.dim() == 4:
                g = g.contiguous(memory_format=torch.channels_last)
        return Evaluation(lv.detach().view(m, n).mean(0), g, wrong)

    return oracle


def defense_aware_oracle(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    ssl_loss: SSLLoss,
    y: torch.Tensor,
    lam: float = 10.0,
    generator: torch.Generator | None = None,
) -> Oracle:
    """Oracle of Mao et al.'s defense-aware objective CE(f(x)) − λ·L_ssl(x).

    ``ssl_loss(x, generator)`` returns the per-image self-supervised loss (N,) on fresh views of x
    (a scalar is taken as the batch mean: the objective then uses N·mean, the same per-image
    weight). ``wrong`` is the *undefended* classifier's 0/1 error: the attack never runs the
    purifier.
    """
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lambda must be a finite number >= 0, got {lam}")

    def oracle(xa: torch.Tensor, need_grad: bool) -> Evaluation:
        with torch.enable_grad() if need_grad else torch.no_grad():
            xa = xa.detach().requires_grad_(need_grad)
            logits = classifier(xa)
            ce = get_loss("ce")(logits, y)
            ls = ssl_loss(xa, generator)
            if ls.dim() == 0:
                ls = ls.expand(len(xa))
            obj = ce - lam * ls
            total = obj.sum()
            g = torch.autograd.grad(total, xa)[0] if need_grad else None
        wrong = (logits.detach().argmax(1) != y).to(xa.dtype)
        return Evaluation(obj.detach(), g, wrong)

    return oracle


# -------------------------------------------------------------------------------- PGD on oracles
@dataclass
class AttackOutcome:
    """What an attack returns.

    Attributes:
        x_adv: the worst point per example (most draws wrong, then highest loss), (N, C, H, W).
        loss: the oracle's loss there, (N,).
        wrong: fraction of the oracle's draws wrong there, (N,).
        broken: misclassified by some draw at some iterate, (N,) bool (for BPDA + EOT: by the
            *attack's* purifier).
        oracle_calls: oracle evaluations.
    """

    x_adv: torch.Tensor
    loss: torch.Tensor
    wrong: torch.Tensor
    broken: torch.Tensor
    oracle_calls: int


def pgd_oracle(
    oracle: Oracle,
    x: torch.Tensor,
    norm: Norm | str = Norm.LINF,
    eps: float | None = None,
    step_size: float | None = None,
    steps: int = 10,
    restarts: int = 1,
    random_start: bool = True,
    generator: Generators = None,
) -> AttackOutcome:
    """PGD (Madry et al. 2018) maximising an oracle's loss over the ε-ball ∩ [0, 1].

    Same steps, projection, random start and bookkeeping as :func:`revlit.attacks.pgd.pgd_attack`
    (every iterate, the last included, is evaluated; more draws wrong beats fewer, then the higher
    loss), so with :func:`revlit.attacks.apgd.classifier_oracle` it returns the same points.

    Args:
        oracle: ``oracle(x_adv, need_grad) -> Evaluation``.
        x: clean images in [0, 1], (N, C, H, W).
        norm, eps, step_size, steps, restarts: as in :func:`revlit.attacks.pgd.pgd_attack`.
        random_start: start each restart at a uniform point of the ball.
        generator: for the random starts only.
    """
    norm, eps, step_size = resolve_args(norm, eps, step_size, steps, restarts)
    cl = x.dim() == 4
    x = x.detach()
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    n = len(x)
    best_x = x.clone()
    best_loss = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
    best_wrong = torch.full((n,), -1.0, device=x.device, dtype=x.dtype)
    broken = torch.zeros(n, dtype=torch.bool, device=x.device)
    calls = 0
    for _ in range(int(restarts)):
        xa = random_init(norm, x, eps, generator) if random_start and eps > 0 else x.clone()
        if cl:
            xa = xa.contiguous(memory_format=torch.channels_last)
        for t in range(int(steps) + 1):
            last = t == steps
            ev = oracle(xa, not last)
            calls += 1
            better = (ev.wrong > best_wrong) | ((ev.wrong == best_wrong) & (ev.loss > best_loss))
            if better.any():
                b4 = better.view(-1, *([1] * (x.dim() - 1)))
                best_x = torch.where(b4, xa.detach(), best_x)
                best_loss = torch.where(better, ev.loss, best_loss)
                best_wrong = torch.where(better, ev.wrong, best_wrong)
            broken = broken | (ev.wrong > 0)
            if last:
                break
            xa = project(norm, step(norm, xa.detach(), ev.grad, step_size), x, eps)
    if cl:
        best_x = best_x.contiguous(memory_format=torch.channels_last)
    return AttackOutcome(best_x.detach(), best_loss, best_wrong.clamp_min(0.0), broken, calls)


# ---------------------------------------------------------------------------- the attacks
ATTACKS = ("pgd", "apgd")


def bpda_eot_attack(
    classifier: nn.Module,
    purifier,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str = "apgd",
    loss: str | LossFn = "ce",
    norm: Norm | str = Norm.LINF,
    eps: float | None = None,
    step_size: float | None = None,
    steps: int = 100,
    restarts: int = 1,
    eot: int = 4,
    generator: Generators = None,
    draw_generator: torch.Generator | None = None,
    chunk: int | None = 512,
) -> AttackOutcome:
    """BPDA + EOT through a purifier, inside PGD or APGD (Croce et al. 2022's adaptive attack).

    Args:
        classifier: the classifier (frozen and in eval mode for the attack).
        purifier: the purifier the attack differentiates "through" (see :func:`as_purifier`); may
            be a cheaper version of the deployed one.
        x: clean images in [0, 1], (N, C, H, W); y: labels (N,).
        attack: ``pgd`` (fixed step ``step_size``, default ε/4) or ``apgd`` (Croce & Hein 2020:
            step 2ε halved at checkpoints, momentum 0.75, restart from the best point).
        loss: ``ce`` or ``dlr`` (or ``cw`` / a callable).
        norm, eps, steps, restarts: threat model and budget (Linf or L2 for ``apgd``).
        eot: purifier draws averaged per gradient (m).
        generator: random starts of the attack.
        draw_generator: seeds the purifier draws (kept apart from ``generator`` so the starts do
            not depend on m).
        chunk: classifier batch limit (see :func:`bpda_eot_oracle`).

    Returns:
        :class:`AttackOutcome`; ``broken`` and ``wrong`` refer to the attack's purifier.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got '{attack}'")
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    with frozen_eval(classifier):
        oracle = bpda_eot_oracle(classifier, purifier, y, loss, eot, draw_generator, chunk)
        if attack == "pgd":
            return pgd_oracle(oracle, x, norm, eps, step_size, steps, restarts, True, generator)
        r = apgd(oracle, x, norm, eps, steps, restarts, generator=generator)
        return AttackOutcome(r.x_adv, r.loss, r.wrong, r.broken, r.oracle_calls)


def defense_aware_pgd(
    classifier: nn.Module,
    ssl_loss: SSLLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    lam: float = 10.0,
    norm: Norm | str = Norm.LINF,
    eps: float | None = None,
    step_size: float | None = None,
    steps: int = 100,
    restarts: int = 1,
    generator: Generators = None,
    views_generator: torch.Generator | None = None,
) -> AttackOutcome:
    """Mao et al.'s defense-aware PGD: maximise CE(f(x')) − λ·L_ssl(x') (then purify as deployed).

    Args:
        classifier: the undefended classifier; ssl_loss: ``(x, generator) -> (N,)`` on fresh views
            (2 views in Mao et al.).
        lam: λ (10 in Mao et al.).
        generator: random starts; views_generator: the views of every step.
        Others: as :func:`pgd_oracle`.

    Returns:
        :class:`AttackOutcome` (``wrong``/``broken``: the *undefended* classifier's errors).
    """
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    with frozen_eval(classifier):
        oracle = defense_aware_oracle(classifier, ssl_loss, y, lam, views_generator)
        return pgd_oracle(oracle, x, norm, eps, step_size, steps, restarts, True, generator)


# ------------------------------------------------------------------------------- evaluation
def evaluate_defense(
    classifier: nn.Module,
    purifier,
    x: torch.Tensor,
    y: torch.Tensor,
    draws: int = 5,
    generator: torch.Generator | None = None,
    chunk: int | None = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The defended classifier on ``draws`` fresh purifications of the same points.

    Args:
        classifier: the classifier; purifier: the *deployed* purifier (see :func:`as_purifier`).
        x: images in [0, 1] (attacked or clean), (N, C, H, W); y: labels (N,).
        draws: r, independent purifier draws (fresh generators from ``generator``).
        chunk: classify at most this many images at a time.

    Returns:
        ``(correct, ce)``: bool (draws, N), True where draw j classified example i correctly, and
        the cross-entropy (draws, N) of each defended prediction.
    """
    if int(draws) != draws or draws < 1:
        raise ValueError(f"draws must be an integer >= 1, got {draws}")
    run = as_purifier(purifier)
    correct, ce = [], []
    with frozen_eval(classifier):
        for g in spawn_generators(generator, int(draws)):
            xp = run(x.detach(), g)
            with torch.no_grad(), full_precision(xp.device):  # the decision: float32
                logits = _logits(classifier, xp, chunk).float()
            correct.append(logits.argmax(1) == y)
            ce.append(get_loss("ce")(logits, y))
    return torch.stack(correct), torch.stack(ce)
