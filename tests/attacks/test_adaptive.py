"""Adaptive attacks on purification: BPDA + EOT, defense-aware PGD, fixed seed, bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from revlit.adaptive_report import wilson_interval
from revlit.attacks.adaptive import (
    as_purifier,
    bpda_eot_attack,
    bpda_eot_oracle,
    counting_passes,
    defense_aware_oracle,
    evaluate_defense,
    fixed_seed,
    identity_purifier,
    spawn_generators,
    summarize,
)
from revlit.attacks.apgd import apgd_attack, classifier_oracle
from revlit.attacks.pgd import pgd_attack
from revlit.defenses import ReversePurifier
from tests.helpers import tiny_classifier

EPS = 8 / 255


class TinyMLP(nn.Module):
    """A small smooth nonlinear classifier on 3x4x4 images (fast)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.l1, self.l2 = nn.Linear(48, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x.flatten(1) * 4 - 2)))


def noise_purifier(sigma: float):
    """A randomised toy purifier: x + σ·N(0, 1), clipped to [0, 1]."""

    def purify(x, generator=None):
        return (x + sigma * torch.randn(x.shape, generator=generator)).clamp(0, 1), None

    return purify


def images(n: int, seed: int = 0, shape=(3, 32, 32)) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ BPDA + EOT on the identity
@pytest.mark.parametrize("eot", [1, 3])
def test_bpda_eot_through_the_identity_is_plain_pgd(eot):
    model = tiny_classifier()
    x = images(8)
    with torch.no_grad():
        y = model(x).argmax(1)
    ref = pgd_attack(model, x, y, eps=EPS, steps=5, generator=torch.Generator().manual_seed(4))
    out = bpda_eot_attack(model, identity_purifier, x, y, attack="pgd", eps=EPS, steps=5, eot=eot,
                          generator=torch.Generator().manual_seed(4))  # fmt: skip
    assert torch.equal(out.x_adv, ref.x_adv)
    torch.testing.assert_close(out.loss, ref.loss)
    assert torch.equal(out.broken, ref.pred != y)
    # and a different start seed gives different points (the comparison can fail)
    other = bpda_eot_attack(model, identity_purifier, x, y, attack="pgd", eps=EPS, steps=5,
                            eot=eot, generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert not torch.equal(other.x_adv, ref.x_adv)


def test_bpda_eot_apgd_through_the_identity_is_plain_apgd():
    model = TinyMLP()
    x = images(16, shape=(3, 4, 4))
    with torch.no_grad():
        y = model(x).argmax(1)
    ref = apgd_attack(
        model, x, y, eps=EPS, steps=15, loss="dlr", generator=torch.Generator().manual_seed(2)
    )
    out = bpda_eot_attack(model, identity_purifier, x, y, attack="apgd", loss="dlr", eps=EPS,
                          steps=15, eot=1, generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert torch.equal(out.x_adv, ref.x_adv)
    assert torch.equal(out.broken, ref.broken)


# ------------------------------------------------------------------------- EOT variance
def test_eot_average_has_lower_variance_than_one_draw():
    model = TinyMLP()
    x = images(4, shape=(3, 4, 4))
    y = torch.tensor([0, 1, 2, 3])
    purifier = noise_purifier(0.3)

    def spread(m: int) -> float:
        g = torch.Generator().manual_seed(11)
        grads = torch.stack(
            [
                bpda_eot_oracle(model, purifier, y, "ce", eot=m, generator=g)(x, True).grad
                for _ in range(24)
            ]
        )
        return float((grads - grads.mean(0)).pow(2).sum((1, 2, 3, 4)).mean())

    one, eight = spread(1), spread(8)
    assert one > 0
    assert eight < 0.4 * one  # ~1/8 expected for independent draws


def test_each_oracle_call_draws_fresh_purifications():
    seen: list[int] = []

    def purify(x, generator):
        seen.append(int(torch.randint(0, 2**31, (1,), generator=generator)))
        return x

    model = TinyMLP()
    x = images(2, shape=(3, 4, 4))
    oracle = bpda_eot_oracle(
        model, purify, torch.tensor([0, 1]), eot=3, generator=torch.Generator().manual_seed(0)
    )
    oracle(x, True)
    oracle(x, True)
    assert len(seen) == 6 and len(set(seen)) == 6


# ------------------------------------------------------------------------- fixed seed
def test_fixed_seed_purifier_is_deterministic_and_the_random_one_is_not():
    x = images(3, shape=(3, 4, 4))
    rand = as_purifier(noise_purifier(0.1))
    det = fixed_seed(noise_purifier(0.1), seed=7)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(det(x, g), det(x, g)) and torch.equal(det(x, None), det(x, g))
    assert not torch.equal(rand(x, g), rand(x, g))
    assert not torch.equal(det(x, None), fixed_seed(noise_purifier(0.1), seed=8)(x, None))


# ---------------------------------------------------------------------- worst-case bookkeeping
def test_worst_case_never_exceeds_the_mean_over_draws():
    model = TinyMLP()
    x = images(64, shape=(3, 4, 4))
    with torch.no_grad():
        y = model(x).argmax(1)
    strict = 0
    for seed in range(4):
        correct, ce = evaluate_defense(model, noise_purifier(0.25), x, y, draws=5,
                                       generator=torch.Generator().manual_seed(seed))  # fmt: skip
        assert correct.shape == ce.shape == (5, 64) and correct.dtype == torch.bool
        s = summarize(torch.ones(64, dtype=torch.bool), correct)
        assert s.worst <= s.mean + 1e-12
        assert s.worst == pytest.approx(float(correct.all(0).float().mean()))
        strict += s.worst < s.mean
        broken = torch.zeros(64, dtype=torch.bool)
        broken[:32] = True
        s2 = summarize(torch.ones(64, dtype=torch.bool), correct, broken)
        assert s2.worst <= s.worst and s2.robust[:32].sum() == 0 and s2.mean == s.mean
    assert strict > 0  # the noise really flips some draws, so the two numbers differ


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and 0.25 < hi < 0.35  # 0.2775
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson_interval(500, 500)
    assert hi == 1.0 and 0.99 < lo < 1.0
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


# ----------------------------------------------------------------------- defense-aware PGD
def test_defense_aware_objective_is_ce_minus_lambda_ssl():
    model = TinyMLP()
    x = images(5, shape=(3, 4, 4))
    y = torch.arange(5)

    def ssl(xa, generator):  # a smooth per-image "SSL loss"
        return xa.flatten(1).pow(2).mean(1)

    ev = defense_aware_oracle(model, ssl, y, lam=10.0)(x, True)
    xr = x.clone().requires_grad_(True)
    obj = F.cross_entropy(model(xr), y, reduction="none") - 10.0 * ssl(xr, None)
    (g,) = torch.autograd.grad(obj.sum(), xr)
    torch.testing.assert_close(ev.loss, obj.detach())
    torch.testing.assert_close(ev.grad, g)
    # λ = 0 is the plain CE oracle
    ev0 = defense_aware_oracle(model, ssl, y, lam=0.0)(x, True)
    torch.testing.assert_close(ev0.grad, classifier_oracle(model, y, "ce")(x, True).grad)
    with pytest.raises(ValueError, match="lambda"):
        defense_aware_oracle(model, ssl, y, lam=-1.0)


def test_counting_passes_counts_images_through_the_backbone():
    model = tiny_classifier()
    with counting_passes(model) as c:
        model(torch.rand(3, 3, 32, 32))
        model.features(torch.rand(5, 3, 32, 32))
    assert c[0] == 8
    model(torch.rand(2, 3, 32, 32))
    assert c[0] == 8  # hook removed


def test_spawn_generators_are_independent_and_reproducible():
    a = [
        torch.rand(1, generator=g).item()
        for g in spawn_generators(torch.Generator().manual_seed(1), 4)
    ]
    b = [
        torch.rand(1, generator=g).item()
        for g in spawn_generators(torch.Generator().manual_seed(1), 4)
    ]
    assert a == b and len(set(a)) == 4


# ------------------------------------- a tiny model + tiny head where transfer overstates
class ShiftSensitive(nn.Module):
    """Toy classifier: the class-0 margin g(u) = 1 − k(u − β)² of u = mean(s·(x − 0.5)).

    Its static gradient at a clean point (u = 0) points to u < 0, but the reverse attack below
    shifts u by about +0.038, where the loss grows with u: PGD on the undefended model aims the
    wrong way (the purifier undoes it), BPDA evaluates the gradient at the purified point.
    """

    def __init__(self, d: int, beta: float = 0.02, k: float = 1000.0) -> None:
        super().__init__()
        s = torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
        self.register_buffer("s", s)
        self.beta, self.k, self.feature_dim = beta, k, 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.flatten(1) - 0.5) * self.s).mean(1, keepdim=True)

    def logits_from_features(self, f: torch.Tensor) -> torch.Tensor:
        g = 1.0 - self.k * (f[:, 0] - self.beta) ** 2
        rest = torch.full((len(f), 8), -10.0)
        return torch.cat([(g / 2)[:, None], (-g / 2)[:, None], rest], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(x))


def test_bpda_eot_beats_the_transfer_attack_on_a_tiny_model_with_a_tiny_head():
    shape = (3, 8, 8)
    model = ShiftSensitive(d=192).eval()
    head = nn.Linear(1, 1)
    with torch.no_grad():
        head.weight.fill_(1.0)
        head.bias.zero_()

    def ssl(z, n_views, reduction="none"):  # lower = "more natural": larger u
        return -z[:, 0].view(n_views, -1).mean(0)

    def views(x, n_views, generator=None):
        return x.repeat(n_views, 1, 1, 1)

    purifier = ReversePurifier(
        model, head, ssl, views, eps=16 / 255, step_size=4 / 255, steps=3, n_views=2
    )
    x = 0.5 + 0.2 * (images(12, 3, shape) - 0.5)
    x = x - (model.features(x)[:, 0][:, None] * model.s).view(-1, *shape)  # u = 0 exactly
    y = torch.zeros(12, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).all()
    clean, _ = evaluate_defense(model, purifier, x, y, draws=3, generator=g)
    assert clean.all()

    transfer = pgd_attack(
        model, x, y, eps=EPS, steps=10, generator=torch.Generator().manual_seed(1)
    )
    t_draws, _ = evaluate_defense(model, purifier, transfer.x_adv, y, draws=3, generator=g)
    t = summarize(transfer.pred == y, t_draws)
    bpda = bpda_eot_attack(model, purifier, x, y, attack="pgd", eps=EPS, steps=10, eot=2,
                           generator=torch.Generator().manual_seed(1),
                           draw_generator=torch.Generator().manual_seed(2))  # fmt: skip
    b_draws, _ = evaluate_defense(model, purifier, bpda.x_adv, y, draws=3, generator=g)
    with torch.no_grad():
        b = summarize(model(bpda.x_adv).argmax(1) == y, b_draws, bpda.broken)
    assert t.static == 0.0  # the undefended model is broken by PGD ...
    assert t.mean > 0.9  # ... but the purifier undoes the transfer points
    assert b.mean < 0.1 and b.worst <= b.mean  # BPDA + EOT breaks the defended model
    assert math.isclose(b.static, 1.0)  # with points the static model gets right


# ------------------------------------------------------------------------------ the report
def fake_row(correct_draws: torch.Tensor, static=None, broken=None) -> dict[str, torch.Tensor]:
    n, r = correct_draws.shape
    return {
        "static": torch.ones(n, dtype=torch.bool) if static is None else static,
        "draws": correct_draws,
        "ce": torch.zeros(n, r),
        "broken_iter": torch.zeros(n, dtype=torch.bool) if broken is None else broken,
        "passes": torch.full((n,), 10.0, dtype=torch.float64),
        "seconds": torch.full((n,), 0.5, dtype=torch.float64),
    }


def merged_of(**rows) -> dict[str, torch.Tensor]:
    out = {}
    for name, fields in rows.items():
        out.update({f"{name}.{k}": v for k, v in fields.items()})
    return out


def test_convergence_check_flags_a_move_of_one_point_or_more():
    from revlit.adaptive_report import convergence_check

    base = torch.ones(100, 2, dtype=torch.bool)
    base[:40] = False  # worst case 0.60
    same = base.clone()
    moved = base.clone()
    moved[40:42] = False  # two more examples broken: 0.58
    m = merged_of(base=fake_row(base), a=fake_row(same), b=fake_row(moved))
    ok = convergence_check(m, "base", {"iterations": "a"})
    assert ok["converged"] is True and ok["variants"]["iterations"]["delta"] == 0
    bad = convergence_check(m, "base", {"iterations": "a", "eot_samples": "b"})
    assert bad["converged"] is False
    assert bad["variants"]["eot_samples"]["delta"] == pytest.approx(-0.02)
    assert bad["variants"]["eot_samples"]["examples_changed"] == 2
    missing = convergence_check(m, "base", {"iterations": "a", "restarts": "nope"})
    assert missing["converged"] is None and missing["variants"]["restarts"] is None


def test_worst_case_row_takes_each_example_at_its_weakest_and_verdict_uses_it():
    from revlit.adaptive_report import WORST, summarize_table, verdict

    n = 200
    a = torch.ones(n, 3, dtype=torch.bool)
    a[:50] = False
    b = torch.ones(n, 3, dtype=torch.bool)
    b[40:100, 1] = False  # broken in one draw only
    static = torch.zeros(n, dtype=torch.bool)
    static[:90] = True  # static APGD keeps 45 %
    m = merged_of(transfer_apgd=fake_row(a, static=static), bpda_apgd_ce=fake_row(b))
    rows = {s.name: s for s in summarize_table(m)}
    assert rows["transfer_apgd"].worst == pytest.approx(0.75)
    assert rows["bpda_apgd_ce"].worst == pytest.approx(0.70)
    assert rows["bpda_apgd_ce"].mean == pytest.approx(1 - 60 / 600)
    assert rows[WORST].worst == pytest.approx(0.50)  # broken by one row or the other: 0..99
    assert rows[WORST].passes_per_image == pytest.approx(20.0)
    text = verdict(list(rows.values()))
    assert "50.0 %" in text and "45.0 %" in text and "count on" in text


def test_paired_difference_counts_discordant_images_and_drives_the_verdict():
    from revlit.adaptive_report import paired_difference, summarize_table, verdict

    n = 400
    static = torch.zeros(n, dtype=torch.bool)
    static[:160] = True  # static APGD keeps 40 %
    same = torch.zeros(n, 2, dtype=torch.bool)
    same[:160] = True  # defended worst case: exactly the same images
    m = merged_of(transfer_apgd=fake_row(same, static=static))
    p = paired_difference(m)
    assert p["difference"] == 0 and p["only_defended"] == 0 and p["only_static"] == 0
    assert p["ci"] == [0.0, 0.0]
    better = same.clone()
    better[160:200] = True  # 40 more images survive only with the defense: +10 points
    better[:8] = False  # 8 survive only without it: -2 points
    m2 = merged_of(transfer_apgd=fake_row(better, static=static))
    p2 = paired_difference(m2)
    assert p2["only_defended"] == 40 and p2["only_static"] == 8
    assert p2["difference"] == pytest.approx(32 / n)
    assert p2["ci"][0] > 0 and p2["ci"][0] < 32 / n < p2["ci"][1]
    text = verdict(summarize_table(m2), paired=p2)
    assert "+8.0 points" in text and "excludes 0" in text
    assert paired_difference(merged_of(bpda_pgd=fake_row(same))) is None  # no static row
