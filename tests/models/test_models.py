"""Every registered classifier honours the contract of revlit.models.base.Classifier."""

from __future__ import annotations

import pytest
import torch

from revlit.models import available, build
from revlit.models.base import Classifier
from revlit.models.preact import PreActResNet
from revlit.models.resnet import CifarResNet
from revlit.models.wideresnet import WideResNet

EXPECTED_FEATURES = {
    "resnet20": 64,
    "resnet32": 64,
    "resnet56": 64,
    "preact18": 512,
    "wrn28_10": 640,
    "wrn34_10": 640,
}


def test_registry_lists_the_issue_models():
    assert {"resnet20", "preact18", "wrn28_10", "wrn34_10"} <= set(available())


@pytest.mark.parametrize("name", sorted(EXPECTED_FEATURES))
def test_registered_model_logits_and_features(name):
    torch.manual_seed(0)
    model = build(name).eval()
    assert isinstance(model, Classifier)
    assert model.feature_dim == EXPECTED_FEATURES[name]
    assert model.num_classes == 10
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
        again = model.logits_from_features(feats)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert feats.shape == (2, model.feature_dim)
    torch.testing.assert_close(again, logits)
    assert not torch.allclose(logits[0], logits[1])  # depends on the input
    # The arch spec rebuilds the same architecture (same state_dict keys and shapes).
    arch, kwargs = model.arch_spec()
    twin = build(arch, **kwargs)
    assert type(twin) is type(model)
    assert {k: v.shape for k, v in twin.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_penultimate_features_follow_final_bn_relu():
    """Features are after the last BN-ReLU and average pooling: non-negative for the pre-act nets."""
    for model in (PreActResNet(width=8), WideResNet(10, 1), CifarResNet(8)):
        with torch.no_grad():
            f = model.eval().features(torch.rand(3, 3, 32, 32))
        assert (f >= 0).all()


def test_normalisation_is_inside_the_model():
    torch.manual_seed(0)
    a = WideResNet(10, 1).eval()
    b = WideResNet(10, 1, mean=None, std=None).eval()
    b.load_state_dict({**a.state_dict(), "mean": b.mean, "std": b.std})
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(a.normalize(x)))
        assert not torch.allclose(a(x), b(x), atol=1e-3)
    assert b.config["mean"] is None and a.config["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])


def test_preact_and_wrn_gradients_reach_the_input():
    for model in (PreActResNet(width=8), WideResNet(10, 1)):
        x = torch.rand(2, 3, 32, 32, requires_grad=True)
        (g,) = torch.autograd.grad(model.eval()(x).logsumexp(1).sum(), x)
        assert g.shape == x.shape and g.abs().sum() > 0


@pytest.mark.parametrize(
    "ctor,match",
    [
        (lambda: WideResNet(depth=27), "6n\\+4"),
        (lambda: WideResNet(widen_factor=0), "widen_factor"),
        (lambda: WideResNet(drop_rate=1.5), "drop_rate"),
        (lambda: PreActResNet(depth=20), "depth"),
        (lambda: build("nosuchnet"), "unknown model"),
    ],
)
def test_bad_arguments_give_one_line_errors(ctor, match):
    with pytest.raises(ValueError, match=match) as e:
        ctor()
    assert "\n" not in str(e.value)


def test_wrn_parameter_count():
    n = sum(p.numel() for p in build("wrn28_10").parameters())
    assert 36.4e6 < n < 36.6e6  # WRN-28-10: 36.5 M (Zagoruyko & Komodakis, Table 1)
