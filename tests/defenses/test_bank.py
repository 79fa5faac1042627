"""Bank of clean negatives: batch-independent repair, B = 1, per-image views, bank file I/O."""

from __future__ import annotations

import pytest
import torch

from revlit.defenses import ReversePurifier
from revlit.defenses.bank import (
    bank_purifier,
    compute_bank,
    default_bank_path,
    load_bank,
    save_bank,
)
from revlit.losses import ContrastiveLoss
from revlit.models.checkpoint import CheckpointError
from revlit.seeding import image_seed, per_image_generators
from revlit.ssl import SimCLRViews, SSLHead
from tests.helpers import tiny_classifier, tiny_images


def parts(seed: int = 0):
    """Tiny ResNet (non-trivial BN statistics), head with trained-looking BN, shared-mode views."""
    clf = tiny_classifier(seed)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 1)
        clf.train()(torch.rand(32, 3, 32, 32))
        head = SSLHead(clf.feature_dim, 32, 8)
        head.train()(torch.randn(64, clf.feature_dim))
    return clf.eval(), head.eval(), SimCLRViews()


def images(n: int, seed: int = 0) -> torch.Tensor:
    x, _ = tiny_images(n, seed)
    return torch.from_numpy(x).float() / 255.0


@pytest.fixture(scope="module")
def bank_parts():
    clf, head, views = parts()
    bank = compute_bank(clf, head, images(48, seed=5), views, 1, torch.Generator().manual_seed(0))
    return clf, head, views, bank


def test_repair_of_an_image_does_not_depend_on_its_batch_mates_and_b1_works(bank_parts):
    clf, head, views, bank = bank_parts
    pur = bank_purifier(clf, head, bank, views, steps=4, n_views=4, eps=16 / 255, chunk_size=7)
    x, idx = images(6, seed=1), torch.arange(200, 206)
    full, _ = pur.purify(x, per_image_generators(0, idx))
    assert (full - x).abs().max() > 1e-3  # it did move the pixels
    # other batch-mates (a subset, another order, one image replaced): image 2 is repaired the same
    sub = [4, 2, 0]
    part, _ = pur.purify(x[sub], per_image_generators(0, idx[sub]))
    assert torch.equal(part[1], full[2]) and torch.equal(part[0], full[4])
    x_other = x.clone()
    x_other[0] = images(1, seed=9)[0]
    other, _ = pur.purify(x_other, per_image_generators(0, idx))
    assert torch.equal(other[2], full[2])
    # batch of one image
    one, losses = pur.purify(x[2:3], per_image_generators(0, idx[2:3]))
    assert one.shape == (1, 3, 32, 32) and losses.shape == (1, 5)
    assert torch.equal(one[0], full[2])
    # the per-image seed matters: another seed gives another repair
    again, _ = pur.purify(x[2:3], per_image_generators(1, idx[2:3]))
    assert not torch.equal(again[0], full[2])


def test_in_batch_negatives_do_depend_on_batch_mates(bank_parts):
    # The same per-image randomness with the authors' in-batch loss: changing one batch-mate
    # changes another image's repair (this is what the bank removes), and B = 1 is refused.
    clf, head, views, _ = bank_parts
    pur = ReversePurifier(clf, head, ContrastiveLoss("nt_xent"), views, steps=4, n_views=4)
    x, idx = images(6, seed=1), torch.arange(200, 206)
    full, _ = pur.purify(x, per_image_generators(0, idx))
    x_other = x.clone()
    x_other[0] = images(1, seed=9)[0]
    other, _ = pur.purify(x_other, per_image_generators(0, idx))
    assert not torch.equal(other[2], full[2])
    with pytest.raises(ValueError, match="batch of >= 2"):
        pur.purify(x[:1], per_image_generators(0, idx[:1]))


def test_bank_purifier_lowers_the_bank_loss(bank_parts):
    clf, head, views, bank = bank_parts
    kw = {"steps": 10, "n_views": 4, "step_size": 4 / 255, "random_start": False}
    pur = bank_purifier(clf, head, bank, views, **kw)
    x, idx = images(8, seed=2), torch.arange(8)
    x_rep, _ = pur.purify(x, per_image_generators(0, idx))
    # control: the same steps UP the bank loss must not lower it (so this test can fail)
    up = ReversePurifier(clf, head, lambda z, v, reduction: -pur.loss(z, v, reduction), views, **kw)
    x_up, _ = up.purify(x, per_image_generators(0, idx))
    seeds = (50, 51, 52, 53)  # held-out views; fresh generators for each measurement

    def held_out(z):
        return torch.stack([pur.ssl_loss(z, per_image_generators(s, idx)) for s in seeds]).mean(0)

    before, after = held_out(x), held_out(x_rep)
    assert after.mean() < before.mean() - 1e-3
    assert (after < before).float().mean() >= 0.75
    assert held_out(x_up).mean() > before.mean()


def test_per_image_views_ignore_the_batch_and_keep_the_layout():
    views = SimCLRViews(mode="shared")
    x = images(5, seed=3)
    a = views(x, 3, per_image_generators(7, range(5)))
    b = views(x[[3, 1]], 3, per_image_generators(7, [3, 1]))
    av, bv = a.view(3, 5, 3, 32, 32), b.view(3, 2, 3, 32, 32)
    assert torch.equal(av[:, 3], bv[:, 0]) and torch.equal(av[:, 1], bv[:, 1])
    # per_sample mode draws the same per-image views (the mode only concerns one shared generator)
    c = SimCLRViews(mode="per_sample")(x, 3, per_image_generators(7, range(5)))
    assert torch.equal(a, c)
    # different images' generators give different views of the same picture
    same = x[:1].expand(2, 3, 32, 32).contiguous()
    d = views(same, 2, per_image_generators(7, [0, 1])).view(2, 2, 3, 32, 32)
    assert not torch.equal(d[:, 0], d[:, 1])
    with pytest.raises(ValueError, match="3 view generators for 5 images"):
        views(x, 2, per_image_generators(7, range(3)))


def test_image_seed_separates_seeds_and_indices():
    assert image_seed(0, 5) != image_seed(1, 5) != image_seed(0, 6)
    with pytest.raises(ValueError, match=">= 0"):
        image_seed(0, -1)


def test_compute_bank_unit_rows_and_model_untouched():
    clf, head, views = parts()
    state = {k: v.clone() for k, v in clf.state_dict().items()}
    clf.train()
    emb = compute_bank(clf, head, images(10), views, 2, torch.Generator().manual_seed(0), 4)
    assert emb.shape == (20, 8)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(20))
    assert clf.training  # mode restored
    assert all(torch.equal(v, clf.state_dict()[k]) for k, v in state.items())
    raw = compute_bank(clf, head, (images(10) * 255).round().to(torch.uint8))
    assert raw.shape == (10, 8)


def test_bank_file_round_trip_and_refusals(tmp_path):
    emb = torch.randn(12, 8) * 3
    path = tmp_path / "head_bank.pt"
    sha = save_bank(path, emb, "h" * 64, "c" * 64, torch.arange(12), {"m": 12})
    loaded, info = load_bank(path, head_sha256="h" * 64)
    torch.testing.assert_close(loaded, torch.nn.functional.normalize(emb, dim=1))
    assert info["sha256"] == sha and info["m"] == 12 and info["classifier_sha256"] == "c" * 64
    # a slice of a big tensor (e.g. randperm(50000)[:m]) must not drag its storage into the file
    big = tmp_path / "sliced_bank.pt"
    save_bank(big, emb, "h" * 64, "c" * 64, torch.randperm(200_000)[:12])
    assert big.stat().st_size < 20_000
    with pytest.raises(CheckpointError, match="computed with head hhhh"):
        load_bank(path, head_sha256="x" * 64)
    load_bank(path, head_sha256="x" * 64, allow_mismatch=True)
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a revlit bank"):
        load_bank(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="head_sha256"):
        save_bank(path, emb, "", "c" * 64)
    assert default_bank_path("checkpoints/resnet20_at_head.pt").name == "resnet20_at_head_bank.pt"


def test_bank_cli_writes_a_bank_tied_to_the_head(tmp_path, tiny_cifar_dir, tiny_classifier_ckpt):
    from revlit.defenses.bank import main
    from revlit.models.checkpoint import load_classifier
    from revlit.ssl.head import save_head

    _, cinfo = load_classifier(tiny_classifier_ckpt)
    head_path = tmp_path / "head.pt"
    head_sha = save_head(SSLHead(64, 16, 8), head_path, cinfo["sha256"])
    rc = main(["--classifier", str(tiny_classifier_ckpt), "--head", str(head_path),
               "--m", "20", "--data-dir", str(tiny_cifar_dir)])  # fmt: skip
    assert rc == 0
    emb, info = load_bank(default_bank_path(head_path), head_sha256=head_sha)
    assert emb.shape == (20, 8) and info["classifier_sha256"] == cinfo["sha256"]
    rc = main(["--classifier", str(tiny_classifier_ckpt), "--head", str(head_path),
               "--m", "1000", "--data-dir", str(tiny_cifar_dir)])  # fmt: skip
    assert rc == 2
