"""Contrastive losses against explicit python-loop references, and their properties."""

from __future__ import annotations

import math

import pytest
import torch

from revlit.losses import ContrastiveLoss, alignment, get_loss, nt_xent, nt_xent_multi


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb)


def _reference(z: torch.Tensor, n_views: int, t: float, multi: bool) -> list[float]:
    """Per-image loss by explicit loops, written from the definitions (not from the code)."""
    rows = z.tolist()
    m = len(rows)
    n = m // n_views
    per_anchor = []
    for r in range(m):
        v, i = divmod(r, n)
        denom = sum(math.exp(_cos(rows[r], rows[a]) / t) for a in range(m) if a != r)
        positives = [u * n + i for u in range(n_views) if u != v]
        if multi:
            terms = [-math.log(math.exp(_cos(rows[r], rows[p]) / t) / denom) for p in positives]
            per_anchor.append(sum(terms) / len(terms))
        else:  # authors: target = the first other view (lowest index), the rest are in denom only
            p = positives[0]
            per_anchor.append(-math.log(math.exp(_cos(rows[r], rows[p]) / t) / denom))
    return [sum(per_anchor[u * n + i] for u in range(n_views)) / n_views for i in range(n)]


@pytest.mark.parametrize("n_views,n", [(2, 3), (3, 2), (4, 3)])
@pytest.mark.parametrize("multi", [False, True])
def test_nt_xent_matches_loop_reference(n_views, n, multi):
    g = torch.Generator().manual_seed(n_views * 10 + n)
    z = torch.randn(n_views * n, 5, generator=g, dtype=torch.float64)
    fn = nt_xent_multi if multi else nt_xent
    got = fn(z, n_views, temperature=0.3, reduction="none")
    ref = torch.tensor(_reference(z, n_views, 0.3, multi), dtype=torch.float64)
    assert got.shape == (n,)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fn(z, n_views, temperature=0.3), ref.mean(), rtol=1e-10, atol=1e-10)


def test_authors_variant_differs_from_multi_positive_beyond_two_views():
    z = torch.randn(4 * 3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert not torch.allclose(nt_xent(z, 4), nt_xent_multi(z, 4))
    z2 = z[:6]  # two views of three images: the forms coincide
    torch.testing.assert_close(nt_xent(z2, 2), nt_xent_multi(z2, 2))


def test_alignment_matches_pairwise_distances():
    n_views, n = 3, 4
    z = torch.randn(n_views * n, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    zn = torch.nn.functional.normalize(z, dim=1)
    ref = []
    for i in range(n):
        d = [
            (zn[u * n + i] - zn[w * n + i]).pow(2).sum().item()
            for u in range(n_views)
            for w in range(u + 1, n_views)
        ]
        ref.append(sum(d) / len(d))
    torch.testing.assert_close(
        alignment(z, n_views, reduction="none"), torch.tensor(ref, dtype=torch.float64)
    )


@pytest.mark.parametrize("name", ["nt_xent", "nt_xent_multi", "alignment"])
def test_loss_falls_when_views_are_pulled_together(name):
    n_views, n, d = 2, 8, 16
    g = torch.Generator().manual_seed(2)
    anchors = torch.randn(n, d, generator=g)
    noise = torch.randn(n_views, n, d, generator=g)
    loss = ContrastiveLoss(name, temperature=0.2)
    values = []
    for spread in (2.0, 1.0, 0.3, 0.0):
        z = (anchors[None] + spread * noise).reshape(n_views * n, d)
        values.append(loss(z, n_views).item())
    assert all(a > b for a, b in zip(values, values[1:])), values
    # gradient descent on z lowers it too
    z = (anchors[None] + noise).reshape(n_views * n, d).requires_grad_(True)
    before = loss(z, n_views)
    (grad,) = torch.autograd.grad(before, z)
    assert loss(z.detach() - 0.5 * grad, n_views) < before.detach()


def test_identical_views_reach_the_minimum_for_alignment_and_below_chance_for_nt_xent():
    n = 16
    z1 = torch.randn(n, 32, generator=torch.Generator().manual_seed(3))
    z = torch.cat([z1, z1])
    assert alignment(z, 2).item() == pytest.approx(0.0, abs=1e-6)
    assert nt_xent(z, 2).item() < math.log(2 * n - 1)


def test_random_embeddings_sit_near_chance_at_temperature_one_scale():
    # With t large all logits are equal -> loss = log(M - 1) exactly.
    n_views, n = 2, 10
    z = torch.randn(n_views * n, 4, generator=torch.Generator().manual_seed(4))
    assert nt_xent(z, n_views, temperature=1e6).item() == pytest.approx(
        math.log(n_views * n - 1), rel=1e-5
    )


def test_bad_inputs_are_refused_with_one_line_errors():
    z = torch.randn(6, 4)
    with pytest.raises(ValueError, match="n_views >= 2"):
        nt_xent(z, 1)
    with pytest.raises(ValueError, match="multiple of n_views"):
        nt_xent(z, 4)
    with pytest.raises(ValueError, match=">= 2 images"):
        nt_xent(z[:2], 2)
    with pytest.raises(ValueError, match=">= 2 images"):
        nt_xent_multi(z[:3], 3)
    with pytest.raises(ValueError, match="reduction"):
        nt_xent(z, 2, reduction="sum")
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z, 2, temperature=0.0)
    with pytest.raises(ValueError, match="2-D"):
        nt_xent(z.view(6, 2, 2), 2)
    with pytest.raises(ValueError, match="unknown SSL loss 'simclr'"):
        get_loss("simclr")
    # alignment needs no negatives: a single image is fine
    assert alignment(z[:2], 2).shape == ()


def test_get_loss_and_wrapper_agree():
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(5))
    for name in ("nt_xent", "nt_xent_multi", "alignment"):
        torch.testing.assert_close(
            ContrastiveLoss(name, temperature=0.5)(z, 2, reduction="none"),
            get_loss(name)(z, 2, temperature=0.5, reduction="none"),
        )


@pytest.mark.parametrize("name", ["nt_xent", "nt_xent_multi"])
def test_bf16_embeddings_under_autocast_give_the_float32_loss(name):
    """A head under bf16 autocast hands the loss bf16 embeddings; the loss is computed in float32
    with autocast off (its cosine matmul would otherwise run in bf16): the same bits as the loss
    of the same embeddings cast up outside autocast, in float32, and the same gradient."""
    z = torch.randn(4 * 64, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    z.requires_grad_(True)
    fn = get_loss(name)
    ref = fn(z.float(), 4, reduction="none")
    (g_ref,) = torch.autograd.grad(ref.sum(), z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per = fn(z, 4, reduction="none")
        mean = ContrastiveLoss(name)(z, 4)
    (g,) = torch.autograd.grad(per.sum(), z)
    assert per.dtype == mean.dtype == torch.float32
    assert torch.equal(per, ref) and torch.equal(g, g_ref)
    assert mean == ref.mean()
