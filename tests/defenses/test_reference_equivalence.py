"""The fast purifier returns what the plain reference loop returns, for the same seed."""

import pytest
import torch

from revlit.defenses.reference import reference_purify
from revlit.defenses.reverse import ReversePurifier
from revlit.losses import ContrastiveLoss
from revlit.models.resnet import CifarResNet
from revlit.ssl.head import SSLHead
from revlit.ssl.views import SimCLRViews


def _parts(mode: str):
    torch.manual_seed(0)
    clf = CifarResNet(depth=8).eval()
    head = SSLHead(clf.feature_dim, 32, 8).eval()
    return clf, head, ContrastiveLoss("nt_xent", 0.2), SimCLRViews(mode=mode)


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
@pytest.mark.parametrize("norm", ["l_inf", "l_2"])
def test_fast_purifier_matches_reference_loop(mode, norm):
    clf, head, loss, views = _parts(mode)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    eps, step = (16 / 255, 2 / 255) if norm == "l_inf" else (0.5, 0.1)
    ref, ref_losses = reference_purify(
        clf, head, loss, views, x, norm, eps, step, steps=4, n_views=3,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    # the fast path: channels_last model, frozen parameters, backbone chunks of 5 views
    fast_clf = clf.to(memory_format=torch.channels_last)
    pur = ReversePurifier(
        fast_clf, head, loss, views, norm=norm, eps=eps, step_size=step, steps=4, n_views=3,
        chunk_size=5,
    )  # fmt: skip
    out, losses = pur.purify(x, torch.Generator().manual_seed(7))
    assert out.shape == ref.shape
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-4)
    _assert_same_images(out, ref, norm)


def _assert_same_images(out, ref, norm):
    diff = (out - ref).abs()
    if norm == "l_inf":
        # Signed steps may flip where a gradient entry is ~0 in float arithmetic: allow a
        # handful of such pixels, no more, and nothing else may differ beyond float rounding.
        assert (diff > 1e-5).float().mean() < 1e-3, diff.max()
    else:
        # Normalised-gradient steps carry the gradient's rounding (NCHW vs channels_last
        # kernels differ in the last bits, by machine) into every pixel, a little: measured
        # mean 8e-7, max 2e-4 after 4 steps; a 10 % larger step moves 97 % of the pixels by
        # > 1e-5 (mean 3e-4), see the sensitivity test below.
        assert diff.mean() < 1e-5 and (diff > 1e-5).float().mean() < 0.1, diff.max()


def test_reference_is_sensitive_to_a_changed_step():
    """The equivalence test can fail: one more step, or another step size, changes the output."""
    clf, head, loss, views = _parts("shared")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pur = ReversePurifier(clf, head, loss, views, steps=3, n_views=2)
    out, _ = pur.purify(x, torch.Generator().manual_seed(3))
    ref, _ = reference_purify(
        clf, head, loss, views, x, step_size=3 / 255, steps=3, n_views=2,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert ((out - ref).abs() > 1e-5).float().mean() > 0.1


def test_l2_criterion_is_sensitive_to_a_changed_step():
    clf, head, loss, views = _parts("shared")
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref, _ = reference_purify(
        clf, head, loss, views, x, "l_2", 0.5, 0.1, steps=4, n_views=3,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    pur = ReversePurifier(
        clf.to(memory_format=torch.channels_last), head, loss, views, norm="l_2", eps=0.5,
        step_size=0.11, steps=4, n_views=3,
    )  # fmt: skip
    out, _ = pur.purify(x, torch.Generator().manual_seed(7))
    with pytest.raises(AssertionError):
        _assert_same_images(out, ref, "l_2")


def _two_runs(mode: str, first: dict, second: dict):
    """The channels_last purifier (4 steps, 3 views, chunks of 5) with two option sets, same seed."""
    clf, head, loss, views = _parts(mode)
    clf = clf.to(memory_format=torch.channels_last)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    outs = []
    for opts in (first, second):
        pur = ReversePurifier(clf, head, loss, views, steps=4, n_views=3, chunk_size=5, **opts)
        outs.append(pur.purify(x, torch.Generator().manual_seed(7)))
    # not vacuous: the images moved
    assert ((outs[0][0] - x).abs() > 1e-3).float().mean() > 0.5
    return outs


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_lean_and_plain_paths_return_identical_images(mode):
    """The lean input gradients are bitwise autograd's: the same images, pixel for pixel."""
    outs = _two_runs(mode, {"lean": True}, {"lean": False})
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
@pytest.mark.parametrize("relu_float_mb", [0.02, 512.0])  # some of a step's ReLU outputs, all
def test_float_relu_outputs_and_masks_return_identical_images(mode, relu_float_mb):
    """Float ReLU outputs (autograd's own ReLU) or masks: the same images, pixel for pixel."""
    outs = _two_runs(mode, {"relu_float_mb": relu_float_mb}, {"relu_float_mb": 0})
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_recompute_mode_returns_the_default_paths_images(mode):
    """The memory-bounded path (graph one chunk at a time) is the same computation."""
    outs = _two_runs(mode, {"recompute": False}, {"recompute": True})
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)
    assert ((outs[1][0] - outs[0][0]).abs() > 1e-5).float().mean() < 1e-3
