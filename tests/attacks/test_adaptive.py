"""Adaptive attacks on purification: BPDA + EOT, defense-aware PGD, fixed seed, bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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
)
from revlit.attacks.apgd import apgd_attack, classifier_oracle
from revlit.attacks.pgd import pgd_attack
from revlit.defenses import ReversePurifier
from tests.helpers import TinyMLP, tiny_classifier

EPS = 8 / 255


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
    t_static, t_mean = float((transfer.pred == y).float().mean()), float(t_draws.float().mean())
    bpda = bpda_eot_attack(model, purifier, x, y, attack="pgd", eps=EPS, steps=10, eot=2,
                           generator=torch.Generator().manual_seed(1),
                           draw_generator=torch.Generator().manual_seed(2))  # fmt: skip
    b_draws, _ = evaluate_defense(model, purifier, bpda.x_adv, y, draws=3, generator=g)
    with torch.no_grad():
        b_static = float((model(bpda.x_adv).argmax(1) == y).float().mean())
    b_mean = float(b_draws.float().mean())
    b_worst = float((b_draws.all(0) & ~bpda.broken).float().mean())
    assert t_static == 0.0  # the undefended model is broken by PGD ...
    assert t_mean > 0.9  # ... but the purifier undoes the transfer points
    assert b_mean < 0.1 and b_worst <= b_mean  # BPDA + EOT breaks the defended model
    assert math.isclose(b_static, 1.0)  # with points the static model gets right
