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
    diff = (out - ref).abs()
    # Signed steps may flip where a gradient entry is ~0 in float arithmetic: allow a handful
    # of such pixels, no more, and nothing else may differ beyond float rounding.
    assert (diff > 1e-5).float().mean() < 1e-3, diff.max()


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


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_recompute_mode_returns_the_default_paths_images(mode):
    """The memory-bounded path (graph one chunk at a time) is the same computation."""
    clf, head, loss, views = _parts(mode)
    clf = clf.to(memory_format=torch.channels_last)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    outs = []
    for recompute in (False, True):
        pur = ReversePurifier(
            clf, head, loss, views, steps=4, n_views=3, chunk_size=5, recompute=recompute
        )
        outs.append(pur.purify(x, torch.Generator().manual_seed(7)))
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)
    assert ((outs[1][0] - outs[0][0]).abs() > 1e-5).float().mean() < 1e-3
    # and it is not vacuous: the images moved
    assert ((outs[1][0] - x).abs() > 1e-3).float().mean() > 0.5
