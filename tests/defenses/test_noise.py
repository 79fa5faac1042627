"""RandomNoise baseline and the shared input checks."""

from __future__ import annotations

import pytest
import torch

from revlit.attacks.norms import Norm
from revlit.defenses import RandomNoise, check_images


@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 16 / 255), (Norm.L2, 0.5)])
def test_noise_in_ball_and_box_and_seeded(norm, eps):
    x = torch.rand(6, 3, 32, 32)
    x[:, 0] = 1.0  # a face of the box
    noise = RandomNoise(norm, eps)
    a = noise.purify(x, torch.Generator().manual_seed(0))
    b = noise.purify(x, torch.Generator().manual_seed(0))
    c = noise.purify(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = (a - x).reshape(6, -1)
    size = d.abs().amax(1) if norm is Norm.LINF else d.norm(dim=1)
    assert (size <= eps + 1e-6).all() and (size > 0.5 * eps).all()
    assert a.min() >= 0 and a.max() <= 1
    # uniform: in Linf the coordinates fill the cube (mean |u| = eps/2 before clipping)
    if norm is Norm.LINF:
        inner = (x > eps) & (x < 1 - eps)
        assert abs(float((a - x)[inner].abs().mean()) - eps / 2) < 0.05 * eps


def test_noise_settings_and_errors():
    assert RandomNoise("linf", "8/255").settings() == {
        "method": "noise",
        "norm": "l_inf",
        "eps": pytest.approx(8 / 255),
    }
    with pytest.raises(ValueError, match="l_inf and l_2"):
        RandomNoise("l_1")
    with pytest.raises(ValueError, match="eps"):
        RandomNoise("l_inf", -1)
    with pytest.raises(ValueError, match="NaN"):
        RandomNoise().purify(torch.full((1, 3, 4, 4), float("nan")))


def test_check_images_accepts_the_box_exactly():
    check_images(torch.tensor([0.0, 1.0]).view(1, 1, 1, 2))
    with pytest.raises(ValueError, match="infinite"):
        check_images(torch.tensor([float("inf")]).view(1, 1, 1, 1))
    with pytest.raises(ValueError, match="empty"):
        check_images(torch.zeros(0, 3, 4, 4))


def test_defenses_share_one_interface():
    """defend() keys the result by steps taken; purify() is its image; NoDefense is the identity."""
    from revlit.defenses import EPS_R, NoDefense

    x = torch.rand(4, 3, 8, 8)
    images, extras = NoDefense().defend(x)
    assert images == {0: x} and extras == {} and torch.equal(NoDefense().purify(x), x)
    noise = RandomNoise()
    assert noise.eps == EPS_R and noise.method == "noise" and noise.passes_per_image() == 1
    got, _ = noise.defend(x, torch.Generator().manual_seed(0))
    assert torch.equal(got[0], noise.purify(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(got[0], x)
    with pytest.raises(ValueError):
        NoDefense().defend(x * 2)
