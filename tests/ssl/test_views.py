"""SimCLRViews: layout, modes, reproducibility, range, differentiability, torchvision agreement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from revlit.ssl.views import (
    SimCLRViews,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    crop_grid,
    hsv_to_rgb,
    rgb_to_hsv,
)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_shape_range_and_reproducibility(mode):
    x = _images(5)
    views = SimCLRViews(mode=mode)
    a = views(x, 3, _gen(7))
    b = views(x, 3, _gen(7))
    c = views(x, 3, _gen(8))
    assert a.shape == (15, 3, 32, 32)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_view_major_layout():
    # Geometry only: each image is a constant colour, so any view of image i keeps its colour,
    # and row v*N+i must carry image i's colour.
    n, n_views = 4, 3
    colours = torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.1, 0.5], [0.4, 0.8, 0.2], [0.6, 0.6, 0.0]])
    x = colours.view(n, 3, 1, 1).expand(n, 3, 32, 32).contiguous()
    for mode in ("shared", "per_sample"):
        views = SimCLRViews(jitter_p=0.0, gray_p=0.0, mode=mode)
        out = views(x, n_views, _gen(1))
        mean = out.mean(dim=(2, 3))
        for v in range(n_views):
            for i in range(n):
                torch.testing.assert_close(mean[v * n + i], colours[i], atol=1e-5, rtol=0)


def test_shared_gives_identical_views_of_identical_images_per_sample_does_not():
    x = _images(1).expand(6, 3, 32, 32).contiguous()
    shared = SimCLRViews(mode="shared")(x, 2, _gen(3)).view(2, 6, 3, 32, 32)
    per = SimCLRViews(mode="per_sample")(x, 2, _gen(3)).view(2, 6, 3, 32, 32)
    for v in range(2):
        assert all(torch.equal(shared[v, 0], shared[v, i]) for i in range(6))
        distinct = {tuple(per[v, i].flatten()[:64].tolist()) for i in range(6)}
        assert len(distinct) == 6
    assert not torch.equal(shared[0, 0], shared[1, 0])  # the two shared views differ


def test_per_sample_crops_differ_between_images():
    views = SimCLRViews(mode="per_sample")
    p = views.draw_params(8, 2, generator=_gen(0))
    assert len({tuple(b) for b in p["boxes"][:8].tolist()}) > 1
    p = SimCLRViews(mode="shared").draw_params(8, 2, generator=_gen(0))
    assert len({tuple(b) for b in p["boxes"][:8].tolist()}) == 1


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_input_gradient_is_nonzero_and_finite(mode):
    x = _images(4).requires_grad_(True)
    out = SimCLRViews(mode=mode)(x, 2, _gen(5))
    (g,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), x)
    assert torch.isfinite(g).all()
    assert (g.abs().flatten(1).sum(1) > 0).all()  # every image receives gradient


def test_every_jitter_op_is_differentiable():
    x = _images(3).requires_grad_(True)
    f = torch.tensor([0.5, 1.2, 1.6])
    for op, arg in (
        (adjust_contrast, f),
        (adjust_saturation, f),
        (adjust_hue, torch.tensor([0.1, -0.2, 0.05])),
    ):
        (g,) = torch.autograd.grad(op(x, arg).pow(2).sum(), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_identity_settings_return_the_input():
    x = _images(3)
    views = SimCLRViews(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    torch.testing.assert_close(views(x, 2, _gen(0)), torch.cat([x, x]), atol=1e-6, rtol=0)


def test_crop_grid_is_affine_grid():
    g = _gen(3)
    m, size = 64, 24
    sx = (torch.rand(m, generator=g) * 2 - 1).clamp_min(0.05) * torch.sign(torch.randn(m))
    tx, sy, ty = (torch.rand(m, generator=g) * 2 - 1 for _ in range(3))
    theta = torch.zeros(m, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    ref = F.affine_grid(theta, [m, 3, size, size], align_corners=False)
    out = crop_grid(sx, tx, sy, ty, size)
    assert out.shape == ref.shape == (m, size, size, 2)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # x follows the column, y the row (a transposed grid would fail here)
    assert not torch.allclose(out, ref.transpose(1, 2), atol=1e-3)


def test_crop_matches_interpolate_inside_and_flip_mirrors():
    x = _images(1)
    views = SimCLRViews(flip_p=0.0, jitter_p=0.0, gray_p=0.0, mode="per_sample")
    p = views.draw_params(1, 1, generator=_gen(0))
    p["boxes"] = torch.tensor([[4.0, 8.0, 16.0, 20.0]])
    out = views._crop_flip(x, p)
    ref = F.interpolate(x[:, :, 4:20, 8:28], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5, rtol=0)
    p["flip"] = torch.tensor([True])
    torch.testing.assert_close(views._crop_flip(x, p), out.flip(3), atol=1e-5, rtol=0)


def test_colour_ops_match_torchvision_v1():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = _images(2, seed=3)
    ones = torch.ones(2)
    torch.testing.assert_close(
        adjust_contrast(x, 0.4 * ones), tvf.adjust_contrast(x, 0.4), atol=2e-4, rtol=0
    )
    torch.testing.assert_close(
        adjust_saturation(x, 1.5 * ones), tvf.adjust_saturation(x, 1.5), atol=2e-4, rtol=0
    )
    torch.testing.assert_close(
        adjust_hue(x, 0.15 * ones), tvf.adjust_hue(x, 0.15), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5, rtol=0)


def test_grayscale_probability_one_gives_equal_channels():
    out = SimCLRViews(gray_p=1.0, mode="per_sample")(_images(3), 2, _gen(2))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode"):
        SimCLRViews(mode="batch")
    with pytest.raises(ValueError, match="scale"):
        SimCLRViews(scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="jitter"):
        SimCLRViews(jitter=(0.8, 0.8, 0.8, 0.7))
    with pytest.raises(ValueError, match="n_views"):
        SimCLRViews()(_images(2), 0)
    with pytest.raises(ValueError, match="RGB"):
        SimCLRViews()(torch.rand(2, 1, 32, 32), 2)


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_views_ignore_a_surrounding_bf16_autocast(mode, monkeypatch):
    """The views transform the image: under autocast they stay float32, bit for bit, and so does
    their gradient. Today's ops are not lowered by CPU autocast anyway, so the grayscale is made
    an op autocast does lower (a matmul) to show that the guard, not luck, keeps them float32."""
    import revlit.ssl.views as views_mod

    luma = torch.tensor(views_mod.LUMA)
    monkeypatch.setattr(
        views_mod, "grayscale", lambda x: (x.movedim(1, -1) @ luma[:, None]).movedim(-1, 1)
    )
    x = _images(4).requires_grad_(True)
    views = SimCLRViews(mode=mode, gray_p=1.0)
    ref = views(x, 2, _gen(3))
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x.movedim(1, -1) @ luma[:, None]).dtype == torch.bfloat16  # lowered out here
        out = views(x, 2, _gen(3))
    (g,) = torch.autograd.grad(out.square().sum(), x)
    assert out.dtype == torch.float32 and torch.equal(out, ref) and torch.equal(g, g_ref)
