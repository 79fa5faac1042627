"""ReversePurifier: it lowers the SSL loss, stays in its ball and box, leaves the model untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from revlit.attacks.norms import Norm
from revlit.defenses import ReversePurifier
from revlit.losses import ContrastiveLoss
from revlit.models.base import Classifier, frozen_eval
from revlit.ssl import SimCLRViews, SSLHead
from tests.helpers import tiny_images


class TinyNet(Classifier):
    """Two strided conv-BN-ReLU blocks + global pooling: 32 features; BatchNorm on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32)
        self.feature_dim, self.num_classes = 32, 10
        self.fc = nn.Linear(32, 10)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def make_parts(seed: int = 0):
    """Tiny classifier (non-trivial BN statistics), SSL head, nt_xent."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = TinyNet()
        head = SSLHead(32, 32, 8)
        with torch.no_grad():
            clf.train()(torch.rand(64, 3, 32, 32))
            head.train()(torch.randn(64, 32))
    return clf.eval(), head.eval(), ContrastiveLoss("nt_xent", 0.2)


def images(n: int = 16, seed: int = 0) -> torch.Tensor:
    x, _ = tiny_images(n, seed)
    return torch.from_numpy(x).float() / 255.0


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def held_out_loss(pur: ReversePurifier, x: torch.Tensor, seeds=range(100, 108)) -> torch.Tensor:
    """Per-image SSL loss averaged over 8 draws of views the purifier never saw."""
    return torch.stack([pur.ssl_loss(x, gen(s)) for s in seeds]).mean(0)


def test_purification_lowers_the_mean_ssl_loss():
    clf, head, loss = make_parts()
    x = images(16)
    pur = ReversePurifier(clf, head, loss, SimCLRViews(), steps=20, n_views=4, step_size=4 / 255)
    x_rep, per_step = pur.purify(x, gen(0))
    before, after = held_out_loss(pur, x), held_out_loss(pur, x_rep)
    assert per_step.shape == (16, 21)
    assert after.mean() < before.mean() - 1e-3
    assert (after < before).float().mean() >= 0.75
    # control: the same steps *up* the loss (ascent) must not lower it, so the test can fail
    asc = ReversePurifier(
        clf, head, lambda z, v, reduction: -loss(z, v, reduction), SimCLRViews(),
        steps=20, n_views=4, step_size=4 / 255,
    )  # fmt: skip
    x_up, _ = asc.purify(x, gen(0))
    assert held_out_loss(pur, x_up).mean() > before.mean()


@pytest.mark.parametrize("norm,eps,step", [(Norm.LINF, 16 / 255, 2 / 255), (Norm.L2, 0.5, 0.2)])
def test_delta_stays_in_ball_and_box(norm, eps, step):
    clf, head, loss = make_parts()
    x = images(8)
    x[:, :, :4] = 0.0  # pixels on the faces of the box, where clipping matters
    x[:, :, -4:] = 1.0
    pur = ReversePurifier(
        clf, head, loss, SimCLRViews(), norm=norm, eps=eps, step_size=step, steps=6
    )
    x_rep, _ = pur.purify(x, gen(1))
    d = (x_rep - x).reshape(8, -1)
    size = d.abs().amax(1) if norm is Norm.LINF else d.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert (size > 0.5 * eps).all()  # it did move (not a no-op)
    assert x_rep.min() >= 0.0 and x_rep.max() <= 1.0
    assert not x_rep.requires_grad


def test_best_never_worse_than_last_and_returns_the_recorded_iterate():
    clf, head, loss = make_parts()
    x = images(8)
    kw = dict(steps=6, n_views=2, step_size=4 / 255)
    last = ReversePurifier(clf, head, loss, SimCLRViews(), select="last", **kw)
    best = ReversePurifier(clf, head, loss, SimCLRViews(), select="best", **kw)
    x_last, l_last = last.purify(x, gen(3))
    x_best, l_best = best.purify(x, gen(3))
    torch.testing.assert_close(l_best, l_last, rtol=0, atol=0)  # same trajectory
    sel = best.selected_step
    chosen = l_best.gather(1, sel[:, None])[:, 0]
    assert (chosen <= l_last[:, -1]).all()
    torch.testing.assert_close(chosen, l_best.min(1).values, rtol=0, atol=0)
    assert (last.selected_step == 6).all()
    assert (sel < 6).any(), "with noisy views some example should prefer an earlier iterate"
    # the returned image of each example is iterate sel[i]: rerun the same trajectory for k steps
    for k in sel.unique().tolist():
        if k == 0:  # iterate 0, the start, is what a traced 'last' run holds at t = 0
            snaps, _ = last.defend(x, gen(3), trace=[0])
            torch.testing.assert_close(x_best[sel == 0], snaps[0][sel == 0], rtol=0, atol=0)
            continue
        pk = ReversePurifier(clf, head, loss, SimCLRViews(), select="last", **{**kw, "steps": k})
        x_k, _ = pk.purify(x, gen(3))
        rows = sel == k
        torch.testing.assert_close(x_best[rows], x_k[rows], rtol=0, atol=0)


def test_parameters_buffers_and_modes_untouched():
    clf, head, loss = make_parts()
    clf.train()  # a purifier that forgot eval() would update BatchNorm statistics here
    head.train()
    head.net[0].weight.requires_grad_(True)
    state = {k: v.clone() for k, v in {**clf.state_dict(), **head.state_dict()}.items()}
    pur = ReversePurifier(clf, head, loss, SimCLRViews(), steps=3, n_views=2)
    pur.purify(images(8), gen(0))
    pur.ssl_loss(images(8), gen(1))
    after = {**clf.state_dict(), **head.state_dict()}
    for k, v in state.items():
        assert torch.equal(v, after[k]), k
    assert clf.training and head.training and clf.bn1.training  # modes restored
    assert all(p.grad is None for p in list(clf.parameters()) + list(head.parameters()))
    assert all(p.requires_grad for p in clf.parameters())  # requires_grad flags restored


def test_frozen_eval_restores_on_error():
    clf, _, _ = make_parts()
    clf.train()
    with pytest.raises(RuntimeError), frozen_eval(clf):
        assert not clf.training and not any(p.requires_grad for p in clf.parameters())
        raise RuntimeError("boom")
    assert clf.training and all(p.requires_grad for p in clf.parameters())


def test_seeded_and_chunking_invariant():
    clf, head, loss = make_parts()
    x = images(8)
    a = ReversePurifier(clf, head, loss, SimCLRViews(), steps=3, n_views=4)
    b = ReversePurifier(clf, head, loss, SimCLRViews(), steps=3, n_views=4, chunk_size=5)
    xa, la = a.purify(x, gen(7))
    xa2, _ = a.purify(x, gen(7))
    xb, lb = b.purify(x, gen(7))
    xc, _ = a.purify(x, gen(8))
    assert torch.equal(xa, xa2)
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
    assert (xa - xb).abs().max() <= 2 / 255 * 3 + 1e-6  # sign flips of ~0 gradients at most
    assert not torch.equal(xa, xc)  # another seed, other views and start


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda x: x.index_put_((torch.tensor([0]),), torch.tensor(float("nan"))), "NaN"),
        (lambda x: x * 2.0, r"\[0, 1\]"),
        (lambda x: x - 0.5, r"\[0, 1\]"),
        (lambda x: x[0], "shape"),
        (lambda x: (x * 255).to(torch.uint8), "float"),
    ],
)
def test_refuses_bad_input_in_one_line(bad, match):
    clf, head, loss = make_parts()
    pur = ReversePurifier(clf, head, loss, SimCLRViews(), steps=1, n_views=2)
    x = bad(images(4))
    with pytest.raises(ValueError, match=match) as e:
        pur.purify(x, gen(0))
    assert "\n" not in str(e.value)


def test_refuses_inference_mode_and_bad_settings():
    clf, head, loss = make_parts()
    pur = ReversePurifier(clf, head, loss, SimCLRViews(), steps=1, n_views=2)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        pur.purify(images(4), gen(0))
    for kw, match in [
        ({"norm": "l_1"}, "l_inf and l_2"),
        ({"select": "first"}, "select"),
        ({"n_views": 1}, "n_views"),
        ({"steps": -1}, "steps"),
        ({"eps": "x/255"}, "eps"),
        ({"relu_float_mb": -1}, "relu_float_mb"),
    ]:
        with pytest.raises(ValueError, match=match):
            ReversePurifier(clf, head, loss, SimCLRViews(), **kw)


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": -3}, "steps must be an integer >= 1"),
        ({"step_size": 0}, "eps and step_size must be > 0"),
        ({"eps": 0}, "eps and step_size must be > 0"),
        ({"step_size": "-2/255"}, "eps and step_size must be > 0"),
    ],
)
def test_a_reverse_defense_that_reverses_nothing_is_refused(kw, words):
    with pytest.raises(ValueError, match=words) as e:
        ReversePurifier(**kw)
    assert "\n" not in str(e.value)


def test_settings_first_networks_bound_later_give_the_same_images():
    from revlit.defenses import SETTINGS

    clf, head, loss = make_parts()
    x = images(4, seed=1)
    unbound = ReversePurifier(steps=3, n_views=2, loss=loss, views=SimCLRViews())
    with pytest.raises(RuntimeError, match="bind"):
        unbound.purify(x)
    bound = unbound.bind(clf, head)
    one_call = ReversePurifier(clf, head, loss, SimCLRViews(), steps=3, n_views=2)
    a, _ = bound.purify(x, torch.Generator().manual_seed(4))
    b, _ = one_call.purify(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert set(SETTINGS) <= set(bound.settings())
    assert bound.passes_per_image() == 4 * 2 + 3 * 2 + 1


def test_bind_fills_only_the_loss_and_views_not_given():
    clf, head, _ = make_parts()
    mine = ContrastiveLoss("nt_xent_multi", 0.5)
    pur = ReversePurifier(loss=mine).bind(
        clf, head, ContrastiveLoss(), SimCLRViews(mode="per_sample")
    )
    assert pur.loss is mine and pur.views.mode == "per_sample"
    default = ReversePurifier(classifier=clf, head=head)  # the notebook one-liner
    assert default.loss.name == "nt_xent" and default.views.mode == "shared"


def test_defend_traces_iterates_and_returns_the_purified_images():
    clf, head, loss = make_parts()
    x = images(4, seed=2)
    pur = ReversePurifier(clf, head, loss, SimCLRViews(), steps=3, n_views=2)
    got, extras = pur.defend(x, torch.Generator().manual_seed(5), trace=[0, 2])
    x_rep, losses = pur.purify(x, torch.Generator().manual_seed(5))
    assert set(got) == {0, 2, 3} and torch.equal(got[3], x_rep)
    assert torch.equal(extras["ssl_steps"], losses)
    two = ReversePurifier(clf, head, loss, SimCLRViews(), steps=2, n_views=2)
    assert torch.equal(got[2], two.purify(x, torch.Generator().manual_seed(5))[0])
    assert not torch.equal(got[0], got[2])
    with pytest.raises(ValueError, match="trace"):
        ReversePurifier(clf, head, loss, SimCLRViews(), steps=3, select="best").defend(x, None, [1])
