"""PGD on a tiny model trained on synthetic data: it works, restarts help, the model is untouched."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from revlit.attacks import Norm, cw_loss, dlr_loss, lp_norm, pgd, pgd_attack
from revlit.attacks.losses import ce_loss, get_loss

EPS = {Norm.LINF: 8 / 255, Norm.L2: 0.5, Norm.L1: 12.0}


class TinyNet(nn.Module):
    def __init__(self, c=3, hw=8, k=4):
        super().__init__()
        self.conv = nn.Conv2d(c, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * hw * hw, k)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(h.flatten(1)))


def _data(n, g, k=4, hw=8):
    """k classes of 3x8x8 images in [0,1]: class templates + noise, separable but not by much."""
    templates = torch.rand(k, 3, hw, hw, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, k, (n,), generator=g)
    x = 0.5 + 0.06 * (templates[y] - 0.5) + 0.02 * torch.randn(n, 3, hw, hw, generator=g)
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = _data(256, g)
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    xt, yt = _data(200, torch.Generator().manual_seed(1))
    with torch.no_grad():
        acc = (net(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.9, acc
    return net, xt, yt, acc


@pytest.mark.parametrize("norm", list(Norm))
@pytest.mark.parametrize("loss", ["ce", "cw", "dlr"])
def test_pgd_lowers_accuracy_and_stays_feasible(trained, norm, loss):
    net, x, y, clean_acc = trained
    res = pgd_attack(
        net,
        x,
        y,
        norm=norm,
        eps=EPS[norm],
        steps=10,
        loss=loss,
        generator=torch.Generator().manual_seed(0),
    )
    acc = (net(res.x_adv).argmax(1) == y).float().mean().item()
    assert acc < clean_acc - 0.4, (norm, loss, clean_acc, acc)
    assert torch.equal(res.pred, net(res.x_adv).argmax(1))
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert (lp_norm(res.x_adv - x, norm) <= EPS[norm] * (1 + 1e-5)).all()


@pytest.mark.parametrize("norm", list(Norm))
def test_restarts_are_never_weaker_than_one(trained, norm):
    net, x, y, _ = trained
    # a budget where the attack does not always win
    eps = EPS[norm] / (16 if norm is Norm.L1 else 4)
    one = pgd_attack(
        net, x, y, norm, eps, steps=3, restarts=1, generator=torch.Generator().manual_seed(7)
    )
    many = pgd_attack(
        net, x, y, norm, eps, steps=3, restarts=4, generator=torch.Generator().manual_seed(7)
    )
    mis1, mis4 = one.pred != y, many.pred != y
    assert (mis4 | ~mis1).all()  # never loses a success
    same = mis1 == mis4
    assert (many.loss[same] >= one.loss[same] - 1e-6).all()
    assert mis4.sum() >= mis1.sum()
    assert (many.loss > one.loss + 1e-4).any() or (mis4 & ~mis1).any()  # and does help somewhere


def test_model_mode_and_parameters_untouched(trained):
    net, x, y, _ = trained
    net.train()
    net.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    seen = []
    h = net.bn.register_forward_hook(lambda m, i, o: seen.append(m.training))
    try:
        pgd(net, x[:16], y[:16], Norm.L2, 0.5, steps=3)
    finally:
        h.remove()
        net.eval()
    assert seen and not any(seen)  # attacked in eval mode
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics included


def test_restores_eval_mode_and_frozen_params():
    net = TinyNet().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    pgd(net, torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), steps=1)
    assert not net.training and not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("norm", list(Norm))
def test_results_do_not_depend_on_batching(trained, norm):
    net, x, y, _ = trained
    x, y = x[:12], y[:12]

    def gens(ids):
        return [torch.Generator().manual_seed(50 + i) for i in ids]

    full = pgd_attack(net, x, y, norm, EPS[norm], steps=4, restarts=2, generator=gens(range(12)))
    half = pgd_attack(
        net, x[1::2], y[1::2], norm, EPS[norm], steps=4, restarts=2, generator=gens(range(1, 12, 2))
    )
    assert torch.allclose(full.x_adv[1::2], half.x_adv, atol=1e-5)
    assert torch.equal(full.pred[1::2], half.pred)


def test_trivial_budgets(trained):
    net, x, y, _ = trained
    assert torch.equal(pgd(net, x[:5], y[:5], Norm.LINF, 0.0, steps=3), x[:5])
    assert torch.equal(pgd(net, x[:5], y[:5], Norm.L1, 1.0, steps=0, random_start=False), x[:5])
    r = pgd_attack(net, x[:0], y[:0])
    assert r.x_adv.shape == (0, 3, 8, 8)


def test_channels_last_output(trained):
    net, x, y, _ = trained
    out = pgd(net, x[:4], y[:4], Norm.LINF, steps=1)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm": "l_3"},
        {"eps": -0.1},
        {"steps": -1},
        {"restarts": 0},
        {"step_size": -1.0},
        {"loss": "hinge"},
    ],
)
def test_bad_arguments_are_one_line_value_errors(kwargs):
    net = TinyNet().eval()
    with pytest.raises(ValueError) as e:
        pgd(net, torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), **kwargs)
    assert "\n" not in str(e.value)


def test_losses():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=g) * 3
    y = torch.randint(0, 10, (64,), generator=g)
    cw = cw_loss(z, y)
    assert torch.equal(cw > 0, z.argmax(1) != y)
    d = dlr_loss(z, y)
    assert torch.allclose(d, dlr_loss(5 * z + 2, y), atol=1e-5)  # shift and scale invariant
    assert torch.equal(d > 0, cw > 0)
    assert torch.allclose(ce_loss(z, y), F.cross_entropy(z, y, reduction="none"))
    assert get_loss("CE") is ce_loss
