"""BatchNorm folding: the folded twin computes the same features, and the purifier keeps it fresh."""

import pytest
import torch
from torch import nn

from revlit.defenses.reverse import ReversePurifier
from revlit.losses import ContrastiveLoss
from revlit.models.fold import fold_batchnorm
from revlit.models.preact import preact18
from revlit.models.resnet import CifarResNet
from revlit.ssl.head import SSLHead
from revlit.ssl.views import SimCLRViews


def _random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


def test_folded_resnet_matches_features_and_input_gradients():
    model = _random_bn(CifarResNet(depth=8))
    folded, pairs = fold_batchnorm(model)
    assert pairs == 7 + 2  # stem + 3 blocks x 2 + 2 projection shortcuts
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(not p.requires_grad for p in folded.parameters())
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch.testing.assert_close(folded.features(x), model.features(x), rtol=1e-4, atol=1e-4)
    (g_ref,) = torch.autograd.grad(model.features(x).square().sum(), x)
    (g_fold,) = torch.autograd.grad(folded.features(x).square().sum(), x)
    torch.testing.assert_close(g_fold, g_ref, rtol=1e-3, atol=1e-5)
    # the original is untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_pre_activation_blocks_are_never_folded_wrongly():
    model = _random_bn(preact18())
    folded, pairs = fold_batchnorm(model)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(folded.features(x), model.features(x), rtol=1e-4, atol=1e-4)
    if pairs == 0:
        assert folded is model


def test_a_wrong_fold_is_refused_by_the_check():
    class BnFirst(nn.Module):  # bn before conv: folding conv1/bn1 would change the function
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(3)

        def features(self, x):
            return self.conv1(self.bn1(x)).flatten(1)

    model = _random_bn(BnFirst())
    folded, pairs = fold_batchnorm(model)
    assert folded is model and pairs == 0


def test_purifier_refolds_when_the_classifier_changes():
    model = _random_bn(CifarResNet(depth=8))
    head = SSLHead(model.feature_dim, 32, 8).eval()
    pur = ReversePurifier(
        model, head, ContrastiveLoss("nt_xent", 0.2), SimCLRViews(), steps=1, fold_bn=True
    )
    first = pur.backbone()
    assert first is not model and pur.backbone() is first  # cached
    with torch.no_grad():
        model.conv1.weight.mul_(2.0)  # an in-place update (an optimizer step does the same)
    second = pur.backbone()
    assert second is not first
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(second.features(x), model.features(x), rtol=1e-4, atol=1e-4)
    plain = ReversePurifier(
        model, head, ContrastiveLoss("nt_xent", 0.2), SimCLRViews(), fold_bn=False
    )
    assert plain.backbone() is model


@pytest.mark.parametrize("fold_bn", [True, False])
def test_purified_images_agree_with_and_without_folding(fold_bn):
    model = _random_bn(CifarResNet(depth=8))
    head = SSLHead(model.feature_dim, 32, 8).eval()
    loss, views = ContrastiveLoss("nt_xent", 0.2), SimCLRViews()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    outs = []
    for fb in (fold_bn, not fold_bn):
        pur = ReversePurifier(model, head, loss, views, steps=3, n_views=2, fold_bn=fb)
        outs.append(pur.purify(x, torch.Generator().manual_seed(5))[0])
    assert ((outs[0] - outs[1]).abs() > 1e-5).float().mean() < 1e-3
