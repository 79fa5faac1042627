"""APGD (Croce & Hein 2020): checkpoints, step-size halving (both conditions), bookkeeping."""

from __future__ import annotations

import pytest
import torch

from revlit.attacks.apgd import Evaluation, apgd, apgd_attack, checkpoints, classifier_oracle
from revlit.attacks.pgd import pgd_attack
from tests.helpers import tiny_classifier

EPS = 8 / 255


def scripted_oracle(losses, seen: list | None = None):
    """An oracle whose k-th call returns ``losses(k)`` for every example (gradient = ones).

    The points it is called with are appended to ``seen``.
    """
    calls = [0]

    def oracle(xa: torch.Tensor, need_grad: bool) -> Evaluation:
        k = calls[0]
        calls[0] += 1
        if seen is not None:
            seen.append(xa.clone())
        n = len(xa)
        loss = torch.full((n,), float(losses(k)))
        return Evaluation(loss, torch.ones_like(xa), torch.zeros(n))

    return oracle


def test_checkpoints_follow_the_paper():
    # p0 = 0, p1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for n in (1, 5, 20, 37, 250):
        w = checkpoints(n)
        assert w == sorted(set(w)) and 0 < w[0] and w[-1] <= n


def test_step_halves_when_the_loss_stalls_and_not_when_it_climbs():
    x = torch.full((3, 3, 4, 4), 0.5)
    w1 = checkpoints(30)[0]
    stalled = apgd(scripted_oracle(lambda k: 1.0), x, eps=EPS, steps=30, random_start=False)
    climbing = apgd(scripted_oracle(lambda k: float(k)), x, eps=EPS, steps=30, random_start=False)
    assert stalled.eta_history[0].tolist() == pytest.approx([2 * EPS] * 3)
    # condition 1: no increase at all in the first interval -> halved at the first checkpoint
    assert stalled.eta_history[1].tolist() == pytest.approx([EPS] * 3)
    # every later checkpoint halves again
    assert stalled.eta.tolist() == pytest.approx([2 * EPS / 2 ** len(checkpoints(30))] * 3)
    # a loss that rises at every step keeps its step size
    assert climbing.eta_history.shape == (1 + len(checkpoints(30)), 3)
    torch.testing.assert_close(climbing.eta_history, torch.full_like(climbing.eta_history, 2 * EPS))
    assert w1 == 7


def test_halving_restarts_from_the_best_point_with_the_half_step():
    """A falling loss: the best point is x0, so after the first checkpoint APGD goes back to x0
    and (momentum reset) moves α·η/2 = 0.75·ε along the gradient's sign."""
    seen: list[torch.Tensor] = []
    x = torch.full((2, 3, 4, 4), 0.5)
    apgd(scripted_oracle(lambda k: -float(k), seen), x, eps=EPS, steps=30, random_start=False)
    w1 = checkpoints(30)[0]
    assert (seen[w1] - x).abs().max() > 0.9 * EPS  # it had moved away from x0 ...
    torch.testing.assert_close(
        seen[w1 + 1] - x, torch.full_like(x, 0.75 * EPS)
    )  # ... and came back


def test_condition_two_halves_when_the_best_loss_does_not_improve():
    """Rising in most steps of an interval, but never above the best loss -> halve (cond. 2)."""
    w = checkpoints(100)  # 22, 41, ...

    def losses(k):  # call 0 is x0; call k is iterate k
        if k <= w[0]:
            return float(k)  # climbs to 22: f_max = 22 at the first checkpoint
        return 0.1 * (k - w[0])  # climbs again, slowly, never reaching 22 by the second checkpoint

    r = apgd(scripted_oracle(losses), torch.full((2, 3, 4, 4), 0.5), eps=EPS, steps=100,
             random_start=False)  # fmt: skip
    assert r.eta_history[1].tolist() == pytest.approx([2 * EPS] * 2)  # climbing: kept
    assert r.eta_history[2].tolist() == pytest.approx([EPS] * 2)  # no new best: halved


def test_apgd_stays_feasible_and_returns_the_best_iterate():
    torch.manual_seed(0)
    model = tiny_classifier()
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    r = apgd_attack(model, x, y, eps=EPS, steps=12, generator=torch.Generator().manual_seed(1))
    assert (r.x_adv - x).abs().max() <= EPS + 1e-6
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    assert r.oracle_calls == 13 and r.loss_history.shape == (13, 6)
    with torch.no_grad():
        wrong = model(r.x_adv).argmax(1) != y
    assert torch.equal(wrong, r.broken)  # deterministic model: best point broken iff any iterate
    keep = ~r.broken
    torch.testing.assert_close(r.loss[keep], r.loss_history.amax(0)[keep])


def test_apgd_beats_or_matches_pgd_on_a_tiny_model():
    torch.manual_seed(0)
    model = tiny_classifier()
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 1 / 255
    a = apgd_attack(
        model, x, y, eps=eps, steps=20, loss="ce", generator=torch.Generator().manual_seed(0)
    )
    p = pgd_attack(model, x, y, eps=eps, steps=20, generator=torch.Generator().manual_seed(0))
    ce = classifier_oracle(model, y, "ce")
    assert ce(a.x_adv, False).loss.mean() >= ce(p.x_adv, False).loss.mean() - 1e-4


def test_bad_arguments_are_one_line_errors():
    x = torch.rand(2, 3, 4, 4)
    oracle = scripted_oracle(lambda k: 0.0)
    for kw, msg in (({"norm": "l_1"}, "l_inf and l_2"), ({"steps": 0}, "steps"),
                    ({"restarts": 0}, "restarts"), ({"rho": 1.5}, "rho")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            apgd(oracle, x, **kw)
