"""The fast backward paths of the views give autograd's numbers (clamp01, tent, in-place runs)."""

import pytest
import torch

import revlit.ssl.views as V
from revlit.ssl.views import SimCLRViews, clamp01, tent


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _edge_values() -> torch.Tensor:
    edges = [-1.0, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 0.5, 1.0 - 2**-24, 1.0, 1.0 + 2**-23, 2.0]
    return torch.cat([torch.tensor(edges), torch.rand(5000) * 1.4 - 0.2])


def test_clamp01_is_clamp_bit_for_bit():
    v = _edge_values()
    g = torch.randn(v.shape)
    a, b = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    ya, yb = a.clamp(0.0, 1.0), clamp01(b)
    (ga,) = torch.autograd.grad(ya, a, g)
    (gb,) = torch.autograd.grad(yb, b, g)
    assert torch.equal(_bits(ya), _bits(yb))
    assert torch.equal(_bits(ga), _bits(gb))


def test_tent_matches_autograd_including_the_ties():
    k = torch.cat([torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.5, 3.5, 6.0 - 2**-21]),
                   torch.rand(5000) * 6.0])  # fmt: skip
    g = torch.randn(k.shape)
    a, b = k.clone().requires_grad_(True), k.clone().requires_grad_(True)
    ya = torch.minimum(a, 4.0 - a).clamp(0.0, 1.0)
    yb = tent(b)
    (ga,) = torch.autograd.grad(ya, a, g)
    (gb,) = torch.autograd.grad(yb, b, g)
    assert torch.equal(_bits(ya), _bits(yb))
    assert torch.equal(ga, gb)  # values (a blocked entry may carry the other sign of zero)
    assert (ga != 0).float().mean() > 0.2  # the comparison is not between two zero tensors


def _views_and_grad(mode: str, seed: int, old: bool, monkeypatch):
    with monkeypatch.context() as mp:
        if old:  # the plain autograd expressions, and the sort-and-gather grouping
            mp.setattr(V, "clamp01", lambda x: x.clamp(0.0, 1.0))
            mp.setattr(V, "tent", lambda k: torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
            mp.setattr(V, "MAX_RUNS", 0)
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(24, 3, 32, 32, generator=g)
        x[:4] = (x[:4] > 0.5).float()  # saturated and black pixels: ties and clamp boundaries
        x[4:6] = x[4:6, :1].expand(-1, 3, -1, -1)  # grey images
        x.requires_grad_(True)
        v = SimCLRViews(mode=mode)(x, 4, torch.Generator().manual_seed(seed + 1))
        w = torch.randn(v.shape, generator=torch.Generator().manual_seed(5))
        (gx,) = torch.autograd.grad((v * w).sum(), x)
        return v.detach(), gx


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_fast_views_equal_the_plain_autograd_views(mode, monkeypatch):
    for seed in range(6):
        v0, g0 = _views_and_grad(mode, seed, True, monkeypatch)
        v1, g1 = _views_and_grad(mode, seed, False, monkeypatch)
        assert torch.equal(_bits(v0), _bits(v1)), seed
        assert torch.equal(g0, g1), seed


def test_fused_hue_equals_the_hsv_round_trip():
    """adjust_hue (one node) vs rgb_to_hsv -> rotate -> hsv_to_rgb under autograd."""
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(40, 3, 16, 16, generator=gen)
        x[:6] = (x[:6] > 0.5).float()  # saturated / black: ties for max, min and the sector
        x[6:9] = x[6:9, :1].expand(-1, 3, -1, -1)  # grey
        x[9:14] = (x[9:14] * 4).round() / 4  # more ties
        x[14], x[15] = 0.0, 1.0
        shift = torch.rand(40, generator=gen) - 0.5
        shift[:3] = 0.0
        g = torch.randn(x.shape, generator=gen)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = V.adjust_hue_reference(a, shift), V.adjust_hue(b, shift)
        (ga,) = torch.autograd.grad(ya, a, g)
        (gb,) = torch.autograd.grad(yb, b, g)
        assert torch.equal(_bits(ya), _bits(yb)), seed
        assert torch.equal(ga, gb), seed
        assert (ga != 0).float().mean() > 0.5
