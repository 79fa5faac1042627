"""The adaptive evaluation of a purification defense: attack specs and the cascade that runs them.

Threat model: Linf (or L2) ball of radius ε around each clean CIFAR-10 test image, ∩ [0, 1]; the
attacker knows the classifier, the SSL head and the purifier (Croce et al., "Evaluating the
Adversarial Robustness of Adaptive Test-time Defenses", ICML 2022), the purifier of Mao et al.
(ICCV 2021) is randomised, so every final point is judged by r fresh draws of the DEPLOYED purifier.

Attack specs are small framework-free classes (YAML selects them with ``class_path``/``init_args``):

- :class:`Transfer`: PGD, APGD-CE, APGD-DLR or APGD-CE+DLR on the undefended classifier, the
  points then purified. ``Transfer("apgd_ce_dlr", 100)`` is also the static reference (the
  undefended classifier's accuracy under APGD-CE + APGD-DLR, on every image);
- :class:`BPDAEOT`: BPDA + EOT inside APGD-CE, APGD-DLR or PGD through the deployed purifier (by
  default) or a cheaper ``inner`` one;
- :class:`DefenseAwarePGD`: Mao et al.'s own adaptive attack, CE − λ·L_ssl.

:func:`run_cascade` runs them (transfer attacks first, then the adaptive ones, each group in order
of estimated cost, :func:`order_by_cost`) and, as AutoAttack does between its attacks, attacks only points not yet broken: a point broken once (misclassified by some draw of the
deployed purifier at its final point, or at an iterate of an attack that ran the deployed purifier)
keeps the point that broke it and is never attacked again. The purifier's contrastive loss takes its
negatives from the batch, so an attack purifies the still-unbroken images of its test batch together
(a lone image is purified with one broken batch-mate beside it, for negatives). Costs are counted
in backbone passes: one image through the classifier's backbone forward (a backward pass to the
input is not counted separately), see :func:`revlit.attacks.adaptive.counting_passes`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from revlit.attacks.adaptive import (
    as_purifier,
    bpda_eot_attack,
    counting_passes,
    defense_aware_pgd,
    evaluate_defense,
)
from revlit.attacks.apgd import apgd_attack
from revlit.attacks.norms import Norm
from revlit.attacks.pgd import pgd_attack
from revlit.defenses.reverse import ReversePurifier
from revlit.models.precision import full_precision
from revlit.seeding import batch_seed, per_image_generators
from revlit.ssl.head import ssl_loss

TRANSFER = ("pgd", "apgd_ce", "apgd_dlr", "apgd_ce_dlr")
BPDA = ("apgd_ce", "apgd_dlr", "pgd")


def _count(name: str, v: int) -> int:
    if int(v) != v or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v}")
    return int(v)


def purify_passes(purifier) -> int:
    """Backbone passes per image of one purification (forward passes over views)."""
    if purifier is None or not hasattr(purifier, "steps"):
        return 0
    return (int(purifier.steps) + 1) * int(purifier.n_views)


@dataclass
class Target:
    """The defended model under attack.

    Attributes:
        classifier: logits (N, C) of images in [0, 1].
        defense: the deployed purifier (``purify(x, generator)``, e.g. a bound
            :class:`revlit.defenses.ReversePurifier`).
        norm, eps: the threat model.
        draws: r, fresh deployed draws judging each final point.
        chunk: most images through the classifier at once.
        seed: the run's seed (per-example generators of the transfer PGD, as the stored sets).
        bind: ``bind(inner) -> purifier`` binds a cheaper inner purifier to the same networks.
    """

    classifier: nn.Module
    defense: object
    norm: Norm
    eps: float
    draws: int = 3
    chunk: int = 256
    seed: int = 0
    bind: Callable | None = None


@dataclass
class Points:
    """What an attack returns for a batch (full batch size N; rows outside the attacked mask are
    ignored): final points (N, C, H, W), the undefended classifier right there (N,) bool, and
    breaks of the deployed purifier at an attack iterate (N,) bool."""

    x_adv: torch.Tensor
    static: torch.Tensor
    broken_iter: torch.Tensor
    extra: dict | None = None


class Transfer:
    """An attack on the undefended classifier whose points are then purified (a transfer attack).

    Args:
        attack: ``pgd`` (step ε/4, per-example random starts seeded from the test index),
            ``apgd_ce``, ``apgd_dlr`` or ``apgd_ce_dlr`` (APGD-DLR's point where APGD-CE failed;
            the static reference).
        steps: iterations; restarts: random restarts.
    """

    kind = "transfer"

    def __init__(self, attack: str = "pgd", steps: int = 10, restarts: int = 1) -> None:
        if attack not in TRANSFER:
            raise ValueError(f"transfer attack must be one of {', '.join(TRANSFER)}: {attack!r}")
        self.attack, self.steps = attack, _count("steps", steps)
        self.restarts = _count("restarts", restarts)

    @property
    def name(self) -> str:
        return f"transfer_{self.attack}"

    def settings(self) -> dict:
        return {"name": self.name, "kind": self.kind, "attack": self.attack, "steps": self.steps,
                "restarts": self.restarts, "target": "undefended classifier"}  # fmt: skip

    def cost(self, deployed_passes: int, draws: int) -> int:
        """Estimated backbone passes per attacked image: the attack, then r deployed draws."""
        losses = 2 if self.attack == "apgd_ce_dlr" else 1
        return losses * self.restarts * (self.steps + 1) + draws * (deployed_passes + 1)

    def scaled(self, **_: int) -> Transfer:
        return self

    def run(self, target: Target, x, y, index, mask, gens) -> Points:
        """Transfer points are computed on every image (cheap): the static column covers all."""
        kw = {"norm": target.norm, "eps": target.eps, "steps": self.steps}
        if self.attack == "pgd":
            res = pgd_attack(target.classifier, x, y, restarts=self.restarts, loss="ce",
                             random_start=True, generator=per_image_generators(target.seed, index),
                             **kw)  # fmt: skip
            return Points(res.x_adv, res.pred == y, torch.zeros_like(y, dtype=torch.bool))
        res = {}
        for j, loss in enumerate(("ce", "dlr")):
            if self.attack in (f"apgd_{loss}", "apgd_ce_dlr"):
                res[loss] = apgd_attack(target.classifier, x, y, restarts=self.restarts,
                                        loss=loss, generator=gens[j], **kw)  # fmt: skip
        first = res.get("ce", res.get("dlr"))
        x_adv, broken = first.x_adv, first.broken
        extra = {}
        if len(res) == 2:
            pick = (~res["ce"].broken & res["dlr"].broken).view(-1, 1, 1, 1)
            x_adv = torch.where(pick, res["dlr"].x_adv, res["ce"].x_adv)
            broken = res["ce"].broken | res["dlr"].broken
            extra = {"static_ce": ~res["ce"].broken, "static_dlr": ~res["dlr"].broken}
        return Points(x_adv, ~broken, torch.zeros_like(broken), extra)


class BPDAEOT:
    """BPDA + EOT (Athalye et al. 2018; Croce et al. 2022) inside APGD or PGD, through a purifier.

    Args:
        attack: ``apgd_ce``, ``apgd_dlr`` or ``pgd`` (CE, step ε/4).
        steps: iterations; eot: m, purifier draws averaged per gradient; restarts.
        inner: the purifier the attack differentiates through; ``None`` (default): the DEPLOYED
            one (same steps, views, ε_r; its iterate breaks count toward the worst case). A
            cheaper :class:`revlit.defenses.ReversePurifier` is bound to the same networks; breaks
            of a different purifier are not breaks of the deployed defense, so only the final
            points' deployed draws count then.
    """

    kind = "adaptive"

    def __init__(self, attack: str = "apgd_ce", steps: int = 20, eot: int = 1,
                 restarts: int = 1, inner: ReversePurifier | None = None) -> None:  # fmt: skip
        if attack not in BPDA:
            raise ValueError(f"BPDA+EOT attack must be one of {', '.join(BPDA)}: {attack!r}")
        self.attack, self.steps = attack, _count("steps", steps)
        self.eot, self.restarts, self.inner = (
            _count("eot", eot),
            _count("restarts", restarts),
            inner,
        )

    @property
    def name(self) -> str:
        return f"bpda_{self.attack}"

    def settings(self) -> dict:
        inner = None if self.inner is None else _settings(self.inner)
        return {"name": self.name, "kind": self.kind, "attack": self.attack, "steps": self.steps,
                "eot": self.eot, "restarts": self.restarts, "bpda": True,
                "inner_purifier": "deployed" if inner is None else inner,
                "iterate_breaks_counted": self.inner is None}  # fmt: skip

    def cost(self, deployed_passes: int, draws: int) -> int:
        inner = deployed_passes if self.inner is None else purify_passes(self.inner)
        attack = self.restarts * (self.steps + 1) * self.eot * (inner + 1)
        return attack + draws * (deployed_passes + 1)

    def scaled(self, steps: int = 1, eot: int = 1, restarts: int = 1) -> BPDAEOT:
        return BPDAEOT(self.attack, self.steps * steps, self.eot * eot, self.restarts * restarts,
                       self.inner)  # fmt: skip

    def purifier(self, target: Target):
        """The purifier inside the attack: the deployed one unless ``inner`` is set."""
        if self.inner is None:
            return target.defense
        return target.bind(self.inner) if target.bind is not None else self.inner

    def run(self, target: Target, x, y, index, mask, gens, pad=None) -> Points:
        if target.eps == 0:
            return _scatter(x, y, mask, x[mask], torch.zeros_like(y[mask], dtype=torch.bool),
                            target.classifier)  # fmt: skip
        sub = _padded(self.purifier(target), pad)
        atk, loss = ("pgd", "ce") if self.attack == "pgd" else ("apgd", self.attack[5:])
        res = bpda_eot_attack(target.classifier, sub, x[mask], y[mask], atk, loss, target.norm,
                              target.eps, None, self.steps, self.restarts, self.eot,
                              generator=gens[0], draw_generator=gens[1],
                              chunk=target.chunk)  # fmt: skip
        broken = res.broken if self.inner is None else torch.zeros_like(res.broken)
        return _scatter(x, y, mask, res.x_adv, broken, target.classifier)


class DefenseAwarePGD:
    """Mao et al.'s defense-aware PGD: maximise CE(f(x')) − λ·L_ssl(x') (ICCV 2021, §5).

    Args:
        steps: iterations (step ε/4); lam: λ; ssl_views: views of L_ssl; restarts.
    """

    kind = "adaptive"
    name = "defense_aware"

    def __init__(self, steps: int = 20, lam: float = 10.0, ssl_views: int = 2,
                 restarts: int = 1) -> None:  # fmt: skip
        self.steps, self.restarts = _count("steps", steps), _count("restarts", restarts)
        self.lam, self.ssl_views = float(lam), _count("ssl_views", ssl_views)

    def settings(self) -> dict:
        return {"name": self.name, "kind": self.kind, "attack": "pgd", "loss": "ce - lambda*ssl",
                "lambda": self.lam, "ssl_views": self.ssl_views, "steps": self.steps,
                "restarts": self.restarts}  # fmt: skip

    def cost(self, deployed_passes: int, draws: int) -> int:
        attack = self.restarts * (self.steps + 1) * (1 + self.ssl_views)
        return attack + draws * (deployed_passes + 1)

    def scaled(self, steps: int = 1, eot: int = 1, restarts: int = 1) -> DefenseAwarePGD:
        return DefenseAwarePGD(self.steps * steps, self.lam, self.ssl_views,
                               self.restarts * restarts)  # fmt: skip

    def run(self, target: Target, x, y, index, mask, gens, pad=None) -> Points:
        d = target.defense
        k = int(mask.sum())

        def ssl_fn(xa, g):
            xa = xa if pad is None else torch.cat([xa, pad])
            return ssl_loss(d.classifier, d.head, d.views, d.loss, xa, self.ssl_views,
                            generator=g, reduction="none", chunk=target.chunk)[:k]  # fmt: skip

        res = defense_aware_pgd(target.classifier, ssl_fn, x[mask], y[mask], self.lam,
                                target.norm, target.eps, None, self.steps, self.restarts,
                                generator=gens[0], views_generator=gens[1])  # fmt: skip
        none = torch.zeros(k, dtype=torch.bool, device=x.device)
        return _scatter(x, y, mask, res.x_adv, none, target.classifier)


Attack = Transfer | BPDAEOT | DefenseAwarePGD


def default_attacks() -> list[Attack]:
    """Transfer PGD-10 and APGD-CE+DLR-100 (the static reference), defense-aware PGD-20, then
    BPDA+EOT APGD-CE, APGD-DLR and PGD through the deployed purifier (20 iterations, m = 1)."""
    return [Transfer("pgd", 10), Transfer("apgd_ce_dlr", 100), DefenseAwarePGD(20),
            BPDAEOT("apgd_ce", 20), BPDAEOT("apgd_dlr", 20), BPDAEOT("pgd", 20)]  # fmt: skip


def _settings(p) -> dict:
    return p.settings() if hasattr(p, "settings") else {"purifier": type(p).__name__}


def _padded(purifier, pad: torch.Tensor | None):
    """Purify ``x`` together with ``pad`` (batch-mates for the contrastive negatives), return x's."""
    run = as_purifier(purifier)
    if pad is None:
        return run
    return lambda x, g: run(torch.cat([x, pad]), g)[: len(x)]


def _scatter(x, y, mask, x_sub, broken_sub, classifier) -> Points:
    x_adv = x.clone()
    x_adv[mask] = x_sub
    broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    broken[mask] = broken_sub
    with torch.no_grad(), full_precision(x_adv.device):  # the static decision: float32
        static = classifier(x_adv).argmax(1) == y
    return Points(x_adv, static, broken)


def order_by_cost(attacks: Sequence[Attack], deployed_passes: int, draws: int) -> list[Attack]:
    """Transfer attacks first, then the adaptive ones, each group cheapest first (stable)."""
    return sorted(attacks, key=lambda a: (a.kind != "transfer", a.cost(deployed_passes, draws)))


def _gen(base: int, k: int, j: int) -> torch.Generator:
    return torch.Generator().manual_seed((base + 1_000_003 * (3 * k + j + 1)) % (1 << 63))


@dataclass
class State:
    """Per image, after the attacks so far: still unbroken (N,) bool; the worst point (N, C, H, W)
    (the point that broke it, or the last attacked point); its deployed draws (N, r) bool and
    cross-entropies (N, r); an iterate break (N,) bool; the undefended classifier right (N,)."""

    robust: torch.Tensor
    x: torch.Tensor
    draws: torch.Tensor
    ce: torch.Tensor
    broken_iter: torch.Tensor
    static: torch.Tensor

    @classmethod
    def start(cls, x: torch.Tensor, y: torch.Tensor, draws: int) -> State:
        n = len(y)
        ones = torch.ones(n, draws, dtype=torch.bool, device=x.device)
        none = torch.zeros(n, dtype=torch.bool, device=x.device)
        return cls(~none, x.clone(), ones, torch.zeros(n, draws, device=x.device), none, ~none)

    def copy(self) -> State:
        return State(*(t.clone() for t in vars(self).values()))


def run_cascade(
    attacks: Sequence[Attack],
    target: Target,
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
    base_seed: int,
    cascade: bool = True,
    state: State | None = None,
    prefix: str = "",
    first_k: int = 0,
) -> tuple[dict[str, torch.Tensor], list[State]]:
    """Run ``attacks`` in the given order on one test batch; the worst case per image.

    Args:
        attacks: specs, in the order to run (see :func:`order_by_cost`).
        target: the defended model.
        x: clean images in [0, 1], (N, C, H, W); y: labels (N,); index: test indices (N,).
        base_seed: the batch's seed; attack k draws from generators seeded from (base, k).
        cascade: attack only points not yet broken (default); ``False``: every attack on every
            image (standalone rows, e.g. to compare which attack breaks which image).
        state: start from this state (e.g. after the transfer attacks); ``None``: all unbroken.
        prefix: prepended to each row name in the output keys.
        first_k: seed index of the first attack (keeps seeds when resuming from a state).

    Returns:
        ``(out, states)``: ``out["<prefix><row>.<field>"]`` with fields ``attacked``, ``static``,
        ``draws`` (N, r), ``ce`` (N, r), ``broken_iter``, ``passes``, ``seconds`` per image (the
        row's totals spread over the batch) and, for rows not attacking an image, that image's
        worst point so far (so each row is the worst case after the attacks up to it);
        ``out["<prefix>final.robust"]``; ``states``: the state after each attack.
    """
    n, r = len(y), int(target.draws)
    st = State.start(x, y, r) if state is None else state.copy()
    out: dict[str, torch.Tensor] = {}
    states: list[State] = []
    for k, atk in enumerate(attacks, start=first_k):
        gens = [_gen(base_seed, k, j) for j in range(2)]
        mask = st.robust.clone() if cascade else torch.ones(n, dtype=torch.bool, device=x.device)
        fresh = {"draws": st.draws.clone(), "ce": st.ce.clone(), "broken_iter": st.broken_iter}
        t0, count = time.perf_counter(), [0]
        extra: dict = {}
        static = st.static.clone()
        transfer = isinstance(atk, Transfer)
        if transfer or mask.any():  # a transfer attack's static column covers every image
            pad = _pad(st, mask)
            with counting_passes(target.classifier) as count, torch.enable_grad():
                args = (target, x, y, index, mask, gens)
                pts = atk.run(*args) if transfer else atk.run(*args, pad=pad)
                if mask.any():
                    correct, ce = evaluate_defense(target.classifier, _padded(target.defense, pad),
                                                   pts.x_adv[mask], y[mask], r,
                                                   _gen(base_seed, k, 2), target.chunk)  # fmt: skip
                    fresh["draws"][mask], fresh["ce"][mask] = correct.t(), ce.t().to(st.ce.dtype)
            fresh["broken_iter"] = torch.where(mask, pts.broken_iter, st.broken_iter)
            static = pts.static if transfer else torch.where(mask, pts.static, static)
            extra = pts.extra or {}
            robust_row = fresh["draws"].all(1) & ~fresh["broken_iter"]
            upd = mask & st.robust
            st.x[upd] = pts.x_adv[upd]
            st.draws[upd], st.ce[upd] = fresh["draws"][upd], fresh["ce"][upd]
            st.broken_iter = torch.where(upd, fresh["broken_iter"], st.broken_iter)
            st.static = torch.where(upd, static, st.static)
            st.robust = st.robust & (robust_row | ~mask)
        full = torch.ones(n, dtype=torch.float64)
        row = prefix + atk.name
        out.update({f"{row}.attacked": mask.cpu(), f"{row}.static": static.cpu(),
                    f"{row}.draws": fresh["draws"].cpu(), f"{row}.ce": fresh["ce"].float().cpu(),
                    f"{row}.broken_iter": fresh["broken_iter"].cpu(),
                    f"{row}.passes": full * (count[0] / n),
                    f"{row}.seconds": full * ((time.perf_counter() - t0) / n),
                    **{f"{row}.{key}": v.cpu() for key, v in extra.items()}})  # fmt: skip
        states.append(st.copy())
    out[f"{prefix}final.robust"] = st.robust.cpu()
    return out, states


def _pad(st: State, mask: torch.Tensor) -> torch.Tensor | None:
    """One broken batch-mate (at its worst point) for a lone attacked image, else ``None``."""
    if int(mask.sum()) != 1 or bool(mask.all()):
        return None
    return st.x[~mask][:1]


def scaled_attacks(attacks: Sequence[Attack], what: str) -> list[Attack]:
    """The attacks with one budget doubled: ``iterations``, ``eot`` or ``restarts``."""
    kw = {"iterations": {"steps": 2}, "eot": {"eot": 2}, "restarts": {"restarts": 2}}[what]
    return [a.scaled(**kw) for a in attacks]


def copy_target(target: Target, **changes) -> Target:
    """A copy of ``target`` with some fields changed (e.g. ``eps`` for the sweep, ``draws``)."""
    t = copy.copy(target)
    for key, v in changes.items():
        setattr(t, key, v)
    return t


def adaptive_batch(
    attacks: Sequence[Attack],
    target: Target,
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
    cascade: bool = True,
    sweep_eps: Sequence[float] = (),
    sweep_attack: Attack | None = None,
    convergence: bool = False,
) -> dict[str, torch.Tensor]:
    """The whole adaptive evaluation of one test batch (framework-free; the module's test step).

    Runs the attacks cheapest first (:func:`run_cascade`); then, if asked, ``sweep_attack``
    (default: the cheapest BPDA+EOT attack) alone at each ε of ``sweep_eps`` (rows ``sweep<i>/<name>``: accuracy must approach 0 as ε grows, else
    gradient masking), and the convergence check: the adaptive attacks again with their
    iterations, EOT draws m or restarts doubled (from the state after the transfer attacks, which
    do not change), and the whole cascade with the evaluation draws r doubled (rows
    ``conv_<what>/<name>``, worst case ``conv_<what>/final.robust``; ``sweep<i>/eps`` holds the ε).

    Returns:
        per-image tensors: ``index``, ``label``, and the rows' fields (see :func:`run_cascade`).
    """
    base = batch_seed(target.seed, int(index[0]))
    order = order_by_cost(attacks, purify_passes(target.defense), target.draws)
    out = {"index": index.cpu(), "label": y.cpu()}
    rows, states = run_cascade(order, target, x, y, index, base, cascade)
    out.update(rows)
    for i, e in enumerate(sweep_eps):
        bpda = [a for a in order if isinstance(a, BPDAEOT)]
        atk = sweep_attack or (bpda or [a for a in order if a.kind == "adaptive"] or order)[0]
        swept = copy_target(target, eps=float(e))
        o, _ = run_cascade([atk], swept, x, y, index, base, prefix=f"sweep{i}/", first_k=100 + i)
        out.update(o, **{f"sweep{i}/eps": torch.full((len(y),), float(e), dtype=torch.float64)})
    if convergence:
        n_t = next((k for k, a in enumerate(order) if a.kind != "transfer"), len(order))
        start = states[n_t - 1] if n_t else None
        for what in ("iterations", "eot", "restarts"):
            o, _ = run_cascade(scaled_attacks(order[n_t:], what), target, x, y, index, base,
                               cascade, state=start, prefix=f"conv_{what}/",
                               first_k=n_t)  # fmt: skip
            out.update(o)
        doubled = copy_target(target, draws=2 * target.draws)
        o, _ = run_cascade(order, doubled, x, y, index, base, cascade, prefix="conv_draws/")
        out.update(o)
    return out
