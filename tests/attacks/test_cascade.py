"""The cascade of adaptive attacks on toys: only unbroken points are attacked, the worst case per
point, the deployed purifier inside BPDA by default, cost order, convergence variants."""

from __future__ import annotations

import pytest
import torch

from revlit.adaptive_report import row_names, row_robust, summarize_table
from revlit.attacks.cascade import (
    BPDAEOT,
    DefenseAwarePGD,
    Target,
    Transfer,
    adaptive_batch,
    order_by_cost,
    run_cascade,
)
from revlit.attacks.norms import Norm
from tests.helpers import TinyMLP


class SpyPurifier:
    """x + σ·N(0, 1) clipped, recording the batch sizes it purifies; ``steps``/``n_views`` give
    it a cost like a reverse purifier's."""

    def __init__(self, sigma: float = 0.1, steps: int = 3, n_views: int = 2) -> None:
        self.sigma, self.steps, self.n_views, self.seen = sigma, steps, n_views, []

    def purify(self, x, generator=None):
        self.seen.append(len(x))
        return (x + self.sigma * torch.randn(x.shape, generator=generator)).clamp(0, 1), None

    def bind(self, *_):
        return self


class SpyAttack(BPDAEOT):
    """BPDA+EOT PGD that records which points it was asked to attack."""

    def __init__(self, **kw) -> None:
        super().__init__("pgd", **kw)
        self.masks: list[torch.Tensor] = []

    def run(self, target, x, y, index, mask, gens, pad=None):
        self.masks.append(mask.clone())
        return super().run(target, x, y, index, mask, gens, pad)


def setup(n: int = 16, sigma: float = 0.1, draws: int = 3):
    model = TinyMLP().eval()
    x = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[: n // 4] = (y[: n // 4] + 1) % 10  # a quarter misclassified already: broken at once
    target = Target(model, SpyPurifier(sigma), Norm.LINF, 8 / 255, draws, chunk=64)
    return target, x, y, torch.arange(n)


def test_a_broken_point_is_not_attacked_again_and_stays_broken():
    target, x, y, idx = setup()
    spy = SpyAttack(steps=2)
    out, states = run_cascade([Transfer("pgd", 2), spy], target, x, y, idx, base_seed=7)
    after_transfer = states[0].robust
    assert not after_transfer[:4].any()  # the misclassified quarter is broken by the transfer row
    assert torch.equal(spy.masks[0], after_transfer)  # the second attack saw only unbroken points
    assert torch.equal(out["bpda_pgd.attacked"], after_transfer)
    final = out["final.robust"]
    assert not (final & ~after_transfer).any()  # broken once, broken for good
    assert torch.equal(final, row_robust(out, "bpda_pgd"))  # the last row is the worst case
    # without the cascade every attack runs on every point
    spy2 = SpyAttack(steps=2)
    run_cascade([Transfer("pgd", 2), spy2], target, x, y, idx, base_seed=7, cascade=False)
    assert spy2.masks[0].all()


def test_the_attack_purifies_only_the_unbroken_points_and_a_lone_one_with_a_batch_mate():
    target, x, y, idx = setup(n=8)
    spy = SpyAttack(steps=1)
    _, states = run_cascade([Transfer("pgd", 1), spy], target, x, y, idx, base_seed=0)
    k = int(states[0].robust.sum())
    assert 1 < k < 8 and set(target.defense.seen[-4:]) == {k}  # attack and evaluation draws
    lone = states[0].copy()
    lone.robust[:] = False
    lone.robust[5] = True
    target.defense.seen.clear()
    run_cascade([SpyAttack(steps=1)], target, x, y, idx, 0, state=lone)
    assert set(target.defense.seen) == {2}  # the lone image is purified beside one batch-mate


def test_the_worst_case_never_exceeds_the_mean_over_draws():
    target, x, y, idx = setup(n=32, sigma=0.3, draws=5)
    attacks = [Transfer("pgd", 2), Transfer("apgd_ce_dlr", 2), BPDAEOT("pgd", steps=2)]
    for cascade in (True, False):
        out, _ = run_cascade(attacks, target, x, y, idx, base_seed=1, cascade=cascade)
        strict = 0
        for s in summarize_table(out):
            assert s.worst <= s.mean + 1e-12, s.name
            strict += s.worst < s.mean
        for row in row_names(out):  # per image: robust means every draw right
            robust, frac = row_robust(out, row), out[f"{row}.draws"].float().mean(1)
            assert (robust.float() <= frac).all()
        assert strict > 0  # the noise flips some draws: the two numbers really differ


def test_the_inner_purifier_is_the_deployed_one_unless_set():
    target, *_ = setup()
    assert BPDAEOT().purifier(target) is target.defense
    assert BPDAEOT().settings()["inner_purifier"] == "deployed"
    assert BPDAEOT().settings()["iterate_breaks_counted"] is True
    cheap = SpyPurifier(steps=1)
    bound = []
    t2 = Target(target.classifier, target.defense, Norm.LINF, 8 / 255,
                bind=lambda p: bound.append(p) or p)  # fmt: skip
    spec = BPDAEOT(inner=cheap)
    assert spec.purifier(t2) is cheap and bound == [cheap]
    assert spec.settings()["iterate_breaks_counted"] is False
    # the deployed purifier is what the attack runs by default: it sees the attack's batches
    t3, x, y, idx = setup(n=8)
    run_cascade([BPDAEOT("pgd", steps=2, eot=2)], t3, x, y, idx, 0)
    assert len(t3.defense.seen) == 3 * 2 + t3.draws  # (steps + 1) x m draws + r evaluations


def test_attacks_run_cheapest_first_and_costs_follow_the_budget():
    deployed = SpyPurifier(steps=40, n_views=4)
    p = (40 + 1) * 4
    bpda, cheap = BPDAEOT("apgd_ce", 10, eot=2), BPDAEOT("apgd_ce", 10, 2, inner=SpyPurifier(20))
    assert bpda.cost(p, 3) == 11 * 2 * (p + 1) + 3 * (p + 1)
    assert cheap.cost(p, 3) < bpda.cost(p, 3)
    assert Transfer("apgd_ce_dlr", 100).cost(p, 3) == 2 * 101 + 3 * (p + 1)
    attacks = [bpda, Transfer("apgd_ce_dlr", 100), DefenseAwarePGD(10), Transfer("pgd", 10)]
    names = [a.name for a in order_by_cost(attacks, p, 3)]
    assert names == ["transfer_pgd", "transfer_apgd_ce_dlr", "defense_aware", "bpda_apgd_ce"]
    assert deployed.steps == 40
    assert bpda.scaled(steps=2).steps == 20 and bpda.scaled(eot=2).eot == 4
    with pytest.raises(ValueError, match="eot"):
        BPDAEOT(eot=0)
    with pytest.raises(ValueError, match="transfer attack"):
        Transfer("fgsm")


def test_convergence_variants_and_the_sweep_are_recorded():
    target, x, y, idx = setup(n=12, sigma=0.3)
    attacks = [Transfer("pgd", 1), BPDAEOT("pgd", steps=1)]
    out = adaptive_batch(attacks, target, x, y, idx, sweep_eps=[0.0, 0.5], convergence=True)
    for what in ("iterations", "eot", "restarts", "draws"):
        assert f"conv_{what}/final.robust" in out
    assert out["conv_draws/bpda_pgd.draws"].shape == (12, 2 * target.draws)
    # the doubled draws include the base draws: doubling r can only break more points
    assert not (out["conv_draws/final.robust"] & ~out["final.robust"]).any()
    assert row_names(out, "sweep1/") == ["bpda_pgd"]
    assert out["sweep1/final.robust"].float().mean() <= out["sweep0/final.robust"].float().mean()
