"""SSLHead, head checkpoints (refused on another classifier), ssl_loss and mean_ssl_loss."""

from __future__ import annotations

import pytest
import torch

from revlit.losses import ContrastiveLoss
from revlit.models.checkpoint import CheckpointError
from revlit.ssl import SimCLRViews, SSLHead, load_head, mean_ssl_loss, save_head, ssl_loss
from tests.helpers import tiny_classifier


def test_head_shapes_and_bad_input():
    head = SSLHead(64)
    assert head(torch.randn(5, 64)).shape == (5, 16)
    assert [type(m).__name__ for m in head.net] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head.net[0].out_features == 256
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        head(torch.randn(5, 32))


@pytest.mark.parametrize("key", ["net.0.weight", "net.1.running_mean"])
def test_head_with_non_finite_weights_is_refused(tmp_path, key):
    head = SSLHead(8, hidden_dim=12, out_dim=4)
    save_head(head, tmp_path / "h.pt", classifier_sha256="a" * 64)
    obj = torch.load(tmp_path / "h.pt", weights_only=True)
    obj["state_dict"][key].view(-1)[3] = float("nan")
    torch.save(obj, tmp_path / "h.pt")
    with pytest.raises(CheckpointError, match=f"SSL head .*NaN/inf.*'{key}'") as e:
        load_head(tmp_path / "h.pt", classifier_sha256="a" * 64)
    assert "\n" not in str(e.value)


def test_save_load_roundtrip_and_classifier_check(tmp_path):
    torch.manual_seed(0)
    head = SSLHead(8, hidden_dim=12, out_dim=4)
    head.train()
    head(torch.randn(10, 8))  # move the BatchNorm running stats away from their init
    sha = save_head(head, tmp_path / "h.pt", classifier_sha256="a" * 64, meta={"epoch": 3})
    loaded, info = load_head(tmp_path / "h.pt", classifier_sha256="a" * 64)
    assert not loaded.training
    assert info["sha256"] == sha and info["meta"] == {"epoch": 3} and info["out_dim"] == 4
    for k, v in head.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    with pytest.raises(ValueError, match="trained on classifier aaaaaaaaaaaa, not bbbbbbbbbbbb"):
        load_head(tmp_path / "h.pt", classifier_sha256="b" * 64)
    loaded, info = load_head(tmp_path / "h.pt", classifier_sha256="b" * 64, allow_mismatch=True)
    assert info["classifier_sha256"] == "a" * 64
    # a checkpoint loads with weights_only=True (plain dict)
    obj = torch.load(tmp_path / "h.pt", weights_only=True)
    assert obj["format"] == "revlit-ssl-head/1"


def test_load_head_refuses_other_files(tmp_path):
    torch.save({"format": "revlit-classifier/1"}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="not a revlit SSL head"):
        load_head(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_head(tmp_path / "missing.pt")


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_ssl_loss_input_gradient_and_reproducibility(mode):
    clf = tiny_classifier().eval()
    head = SSLHead(clf.feature_dim).eval()
    views = SimCLRViews(mode=mode)
    loss = ContrastiveLoss()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    val = ssl_loss(clf, head, views, loss, x, 2, gen)
    (g,) = torch.autograd.grad(val, x)
    assert val.ndim == 0 and torch.isfinite(g).all() and (g.abs().flatten(1).sum(1) > 0).all()
    per = ssl_loss(clf, head, views, loss, x, 2, torch.Generator().manual_seed(1), reduction="none")
    torch.testing.assert_close(per.mean(), val)
    chunked = ssl_loss(clf, head, views, "nt_xent", x, 2, torch.Generator().manual_seed(1), chunk=3)
    torch.testing.assert_close(chunked, val, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in clf.parameters())


def test_mean_ssl_loss_is_the_image_weighted_mean_of_seeded_batches():
    clf = tiny_classifier().eval()
    torch.manual_seed(0)
    head = SSLHead(clf.feature_dim).eval()
    parts = (clf, head, SimCLRViews(), ContrastiveLoss())
    x = torch.rand(11, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # batches of 5, 5 and a last batch of one image (no negatives: skipped)
    want = [
        float(ssl_loss(*parts, xb, 2, torch.Generator().manual_seed(7 + j)))
        for j, xb in enumerate(x[:10].split(5))
    ]
    got = mean_ssl_loss(*parts, x, 2, batch_size=5, seed=7)
    assert got == pytest.approx(sum(want) / 2, rel=1e-6)
    assert mean_ssl_loss(*parts, x, 2, batch_size=5, seed=7) == got  # same seeds, same views
    assert mean_ssl_loss(*parts, x, 2, batch_size=5, seed=8) != pytest.approx(got)
    assert mean_ssl_loss(*parts, x[:1], 2, batch_size=5, seed=7) == 0.0
