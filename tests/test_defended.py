"""DefendedClassifier: BPDA gradient at the purified point, no-gradient mode, seeding, libraries."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from revlit.defended import DefendedClassifier, load_defended
from revlit.defenses import ReversePurifier
from revlit.io import sha256_file
from revlit.losses import ContrastiveLoss
from revlit.ssl import SimCLRViews, SSLHead, save_head
from tests.helpers import tiny_classifier

EPS = 8 / 255


def _defended(gradient: str = "bpda", fixed: bool = False, steps: int = 2) -> DefendedClassifier:
    net = tiny_classifier()
    torch.manual_seed(0)
    head = SSLHead(net.feature_dim, 16, 8).eval()
    purifier = ReversePurifier(
        classifier=net,
        head=head,
        loss=ContrastiveLoss(),
        views=SimCLRViews(),
        steps=steps,
        n_views=2,
    )
    return DefendedClassifier(net, purifier, gradient=gradient, seed=3, fixed=fixed).eval()


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_bpda_gradient_is_the_classifiers_gradient_at_the_purified_point():
    model = _defended(fixed=True)
    x = _x().requires_grad_(True)
    logits = model(x)
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad((logits * w).sum(), x)
    # the same purified images (fixed seed), then the classifier's own input gradient there
    x_def = model.purify(x, torch.Generator().manual_seed(3))
    assert (x_def - x).abs().max() > 1e-3  # the purifier moved the images
    xd = x_def.clone().requires_grad_(True)
    ref_logits = model.classifier(xd)
    (g_ref,) = torch.autograd.grad((ref_logits * w).sum(), xd)
    assert torch.allclose(logits, ref_logits, atol=1e-6)  # the defended model's logits
    assert torch.allclose(g, g_ref, atol=1e-7, rtol=1e-5)
    # ... which is not the gradient at the unpurified input
    xc = x.detach().clone().requires_grad_(True)
    (g_clean,) = torch.autograd.grad((model.classifier(xc) * w).sum(), xc)
    assert not torch.allclose(g, g_clean, atol=1e-7, rtol=1e-3)


def test_none_mode_carries_no_gradient_to_the_input():
    model = _defended("none", fixed=True)
    x = _x().requires_grad_(True)
    out = model(x)
    assert out.shape == (4, 10)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(out.sum(), x)
    with torch.no_grad():
        assert torch.equal(out, _defended("bpda", fixed=True)(x))


def test_seed_per_call_or_fixed():
    x = _x()
    per_call = _defended()
    a, b = per_call.purify(x), per_call.purify(x)
    assert per_call.calls == 2 and not torch.equal(a, b)  # fresh randomness each call
    again = _defended()
    assert torch.equal(again.purify(x), a)  # reproducible from the seed and call number
    fixed = _defended(fixed=True)
    assert torch.equal(fixed.purify(x), fixed.purify(x))
    with pytest.raises(ValueError, match="gradient must be one of"):
        DefendedClassifier(per_call.classifier, per_call.defense, gradient="full")


def test_load_defended_uses_the_heads_loss_and_checks_its_classifier(
    tmp_path, tiny_classifier_ckpt
):
    net = tiny_classifier()
    head = SSLHead(net.feature_dim, 16, 8)
    meta = {"loss": "nt_xent", "temperature": 0.5, "view_mode": "per_sample"}
    save_head(head.eval(), tmp_path / "head.pt", sha256_file(tiny_classifier_ckpt), meta=meta)
    model, info = load_defended(str(tiny_classifier_ckpt), str(tmp_path / "head.pt"), steps=1)
    assert model.defense.loss.temperature == 0.5 and model.defense.views.mode == "per_sample"
    assert (
        info["defense"]["steps"] == 1
        and info["classifier"]["sha256"] == info["head"]["classifier_sha256"]
    )
    with torch.no_grad():
        assert model(_x(2)).shape == (2, 10)
    save_head(head.eval(), tmp_path / "other.pt", "0" * 64, meta=meta)
    with pytest.raises(ValueError, match="trained on classifier"):
        load_defended(str(tiny_classifier_ckpt), str(tmp_path / "other.pt"))


def _in_ball(x_adv: torch.Tensor, x: torch.Tensor) -> bool:
    return bool((x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1)


@pytest.mark.skipif(
    importlib.util.find_spec("pyautoattack") is None,
    reason="pyautoattack not installed (optional extra: pip install 'revlit[zoo]')",
)
def test_autoattack_rand_runs_on_the_defended_model():
    from pyautoattack import AutoAttack

    model = _defended(steps=1, fixed=True)
    x = _x(4)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point correctly classified: all are attacked
    calls = model.calls
    aa = AutoAttack(model, norm="Linf", eps=EPS, version="rand", seed=0)
    aa.apgd.n_iter, aa.apgd.eot_iter = 2, 2
    x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=4)  # pyautoattack: (x, pred)
    assert x_adv.shape == x.shape and _in_ball(x_adv, x) and y_adv.shape == y.shape
    assert model.calls - calls >= 2 * 2 * 2  # APGD-CE and -DLR, 2 iterations of 2 EOT draws


@pytest.mark.skipif(
    importlib.util.find_spec("torchattacks") is None,
    reason="torchattacks not installed (optional extra: pip install 'revlit[zoo]')",
)
def test_torchattacks_apgd_with_eot_runs_on_the_defended_model():
    import torchattacks

    model = _defended(steps=1, fixed=True)
    x = _x(4)
    with torch.no_grad():
        y = model(x).argmax(1)
    calls = model.calls
    atk = torchattacks.APGD(model, norm="Linf", eps=EPS, steps=2, eot_iter=2, seed=0)
    x_adv = atk(x, y)
    assert x_adv.shape == x.shape and _in_ball(x_adv, x)
    assert model.calls - calls >= 4  # EOT: several draws of the purifier per step


def test_a_lone_image_is_purified_beside_the_context():
    model = _defended(fixed=True)
    x1, ctx = _x(1, seed=5), _x(3, seed=6)
    with pytest.raises(ValueError, match="give DefendedClassifier a context"):
        model.purify(x1)
    padded = DefendedClassifier(model.classifier, model.defense, seed=3, fixed=True, context=ctx)
    got = padded.purify(x1)
    want = model.purify(torch.cat([x1, ctx[:1]]), torch.Generator().manual_seed(3))[:1]
    assert got.shape == (1, 3, 32, 32) and torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(padded(x1), model.classifier(want))
