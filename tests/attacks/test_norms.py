"""Steps, projections and random starts of the three threat models."""

import pytest
import torch

from revlit.attacks import (
    Norm,
    draw_noise,
    l1_step,
    lp_norm,
    project,
    project_l1_box,
    random_init,
    step,
)

EPS = {Norm.LINF: 8 / 255, Norm.L2: 0.5, Norm.L1: 12.0}
TOL = {Norm.LINF: 1e-6, Norm.L2: 1e-5, Norm.L1: 1e-4}


def _points(norm, x, scale, g):
    """Perturbations of L_norm length ``scale * eps`` in random directions (plus a spiky one)."""
    d = torch.randn(x.shape, generator=g)
    d[0].zero_()
    d[0, 0, 0, 0] = 1.0  # all mass on one coordinate
    d = d / lp_norm(d, norm).view(-1, 1, 1, 1)
    return x + d * scale * EPS[norm]


@pytest.mark.parametrize("norm", list(Norm))
@pytest.mark.parametrize("scale", [0.0, 0.3, 1.0, 1.0001, 3.0, 1000.0])
def test_projection_lands_in_ball_and_box(norm, scale):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 8, 8, generator=g)
    x[1] = 0.0  # images on the faces of the box
    x[2] = 1.0
    xa = _points(norm, x, scale, g)
    p = project(norm, xa, x, EPS[norm])
    assert p.min() >= 0.0 and p.max() <= 1.0
    assert (lp_norm(p - x, norm) <= EPS[norm] * (1 + TOL[norm])).all()
    # points already feasible are left alone
    feas = (
        (lp_norm(xa - x, norm) <= EPS[norm])
        & (xa.flatten(1).min(1).values >= 0)
        & (xa.flatten(1).max(1).values <= 1)
    )
    assert torch.allclose(p[feas], xa[feas], atol=1e-6)


def _bisection_projection(z, x, eps, iters=200):
    """Reference: box-clipped soft threshold, with λ found by bisection (float64)."""
    z, x = z.double(), x.double()

    def at(lam):
        return torch.clamp(z.sign() * (z.abs() - lam).clamp_min(0), -x, 1 - x)

    if at(0.0).abs().sum() <= eps:
        return at(0.0)
    lo, hi = 0.0, float(z.abs().max())
    for _ in range(iters):
        mid = (lo + hi) / 2
        if at(mid).abs().sum() > eps:
            lo = mid
        else:
            hi = mid
    return at(hi)


@pytest.mark.parametrize("seed", range(20))
def test_l1_box_projection_matches_bisection(seed):
    g = torch.Generator().manual_seed(seed)
    d = [3, 5, 10, 17][seed % 4]
    x = torch.rand(4, d, generator=g)
    x[:, 0] = 0.0
    x[:, 1] = 1.0
    z = torch.randn(4, d, generator=g) * [0.1, 0.5, 1.0, 3.0][seed % 4]
    for eps in (0.05, 0.5, 2.0):
        p = project_l1_box(z, x, eps)
        for i in range(4):
            ref = _bisection_projection(z[i], x[i], eps)
            assert torch.allclose(p[i].double(), ref, atol=1e-5), (p[i], ref)


def _random_feasible(z, x, eps, g, k=2000):
    """Random points of {‖δ‖₁ ≤ ε} ∩ [−x, 1−x}: box-clip random directions, shrink into the ball."""
    d = torch.randn(k, z.shape[-1], generator=g) * torch.rand(k, 1, generator=g) * 2
    d = d + z * torch.rand(k, 1, generator=g)  # some near z
    d = torch.max(torch.min(d, 1 - x), -x)
    n1 = d.abs().sum(1, keepdim=True)
    return d * torch.where(n1 > eps, eps / n1, torch.ones_like(n1))


@pytest.mark.parametrize("seed", range(5))
def test_l1_box_projection_is_the_closest_point(seed):
    g = torch.Generator().manual_seed(100 + seed)
    d = 8
    x = torch.rand(1, d, generator=g)
    z = torch.randn(1, d, generator=g)
    eps = 1.0
    p = project_l1_box(z, x, eps)
    q = _random_feasible(z, x, eps, g)
    assert (q.abs().sum(1) <= eps + 1e-5).all()
    dist_p = (p - z).norm()
    dist_q = (q - z).norm(dim=1)
    assert (dist_p <= dist_q + 1e-6).all()
    # plain rescaling into the L1 ball is not the projection (nor is clipping then rescaling)
    clipped = torch.max(torch.min(z, 1 - x), -x)
    rescaled = clipped * min(1.0, eps / float(clipped.abs().sum()))
    assert dist_p <= (rescaled - z).norm() + 1e-6


def test_l1_projection_batch_and_layout_independent():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, 3, 8, 8, generator=g)
    z = torch.randn(5, 3, 8, 8, generator=g)
    p = project_l1_box(z, x, 4.0)
    p_cl = project_l1_box(
        z.contiguous(memory_format=torch.channels_last),
        x.contiguous(memory_format=torch.channels_last),
        4.0,
    )
    assert torch.allclose(p, p_cl, atol=1e-6)
    p2 = torch.cat([project_l1_box(z[i : i + 1], x[i : i + 1], 4.0) for i in range(5)])
    assert torch.allclose(p, p2, atol=1e-6)


def test_l1_step_is_sparse_has_length_step_and_respects_the_box():
    g = torch.Generator().manual_seed(0)
    xa = torch.rand(4, 3, 10, 10, generator=g)
    grad = torch.randn(4, 3, 10, 10, generator=g)
    # coordinates pinned at a face with the gradient pointing out must not move
    xa[:, 0] = 1.0
    grad[:, 0] = grad[:, 0].abs() * 100  # the largest gradients, all pointing out of the box
    s = l1_step(grad, 2.0, x_adv=xa, topk=0.05)
    k = int(torch.tensor(0.05 * 300).ceil())
    nz = (s != 0).flatten(1).sum(1)
    assert (nz == k).all()
    assert torch.allclose(s.abs().flatten(1).sum(1), torch.full((4,), 2.0))
    assert (s[:, 0] == 0).all()
    # the moved coordinates are the top-k by |grad| among the movable ones, in the gradient's sign
    movable = grad.abs().clone()
    movable[:, 0] = 0
    thr = movable.flatten(1).topk(k, dim=1).values[:, -1]
    assert ((s != 0) == (movable >= thr.view(-1, 1, 1, 1))).all()
    assert (s.sign()[s != 0] == grad.sign()[s != 0]).all()


@pytest.mark.parametrize("norm", list(Norm))
def test_steps_have_the_norms_length(norm):
    g = torch.Generator().manual_seed(0)
    xa = torch.rand(3, 3, 8, 8, generator=g) * 0.5 + 0.25
    grad = torch.randn(3, 3, 8, 8, generator=g)
    s = step(norm, xa, grad, 0.1) - xa
    assert torch.allclose(lp_norm(s, norm), torch.full((3,), 0.1), atol=1e-5)
    # ascent: the first-order change of the loss is positive
    assert ((s * grad).flatten(1).sum(1) > 0).all()


@pytest.mark.parametrize("norm", list(Norm))
def test_random_init_inside_ball_and_box_and_reproducible(norm):
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[0] = 0.0
    a = random_init(norm, x, EPS[norm], torch.Generator().manual_seed(5))
    b = random_init(norm, x, EPS[norm], torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    r = lp_norm(a - x, norm)
    assert (r <= EPS[norm] * (1 + TOL[norm])).all()
    assert (r[1:] > 0.1 * EPS[norm]).all()  # it does move


@pytest.mark.parametrize("norm", list(Norm))
def test_per_example_generators_make_noise_batch_independent(norm):
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def gens(ids):
        return [torch.Generator().manual_seed(1000 + i) for i in ids]

    full = random_init(norm, x, EPS[norm], gens(range(6)))
    odd = random_init(norm, x[1::2], EPS[norm], gens(range(1, 6, 2)))
    assert torch.allclose(full[1::2], odd, atol=1e-6)
    with pytest.raises(ValueError):
        draw_noise("rand", (6, 3), gens(range(5)))


def test_bad_arguments_are_one_line_errors():
    x = torch.rand(2, 3, 4, 4)
    for call in (
        lambda: project("l_3", x, x, 0.1),
        lambda: project(Norm.L1, x, x, -1.0),
        lambda: random_init("bogus", x, 0.1),
        lambda: random_init(Norm.LINF, x, float("nan")),
        lambda: l1_step(x, 1.0, topk=0.0),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert "\n" not in str(e.value)
    assert Norm.parse("Linf") is Norm.LINF and Norm.parse("l1") is Norm.L1
