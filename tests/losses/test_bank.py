"""Bank NT-Xent: equals in-batch NT-Xent when the bank holds the batch-mates; batch-independent."""

from __future__ import annotations

import pytest
import torch

from revlit.losses import nt_xent, nt_xent_multi
from revlit.losses.bank import BankContrastiveLoss, bank_nt_xent


def _z(n: int, n_views: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_views * n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("positives, in_batch", [("first", nt_xent), ("all", nt_xent_multi)])
@pytest.mark.parametrize("n_views", [2, 4])
def test_matches_in_batch_loss_when_the_bank_is_the_other_images(positives, in_batch, n_views):
    # For image 0 of a batch, the in-batch negatives are all views of images 1..N-1: put exactly
    # those rows in the bank and the bank loss of image 0 alone must equal its in-batch loss.
    n = 5
    z = _z(n, n_views, seed=1) * 2.0
    ref = in_batch(z, n_views, temperature=0.3, reduction="none")
    zv = z.view(n_views, n, -1)
    for i in range(n):
        others = torch.cat([zv[:, j] for j in range(n) if j != i])
        own = zv[:, i]  # (V, D): view-major for N = 1
        got = bank_nt_xent(own, n_views, others, 0.3, "none", positives)
        torch.testing.assert_close(got, ref[i : i + 1], atol=1e-5, rtol=1e-5)


def test_per_image_loss_ignores_batch_mates_and_accepts_one_image():
    bank = torch.randn(30, 8)
    z = _z(4, 3, seed=2)
    full = bank_nt_xent(z, 3, bank, reduction="none")
    zv = z.view(3, 4, -1)
    sub = zv[:, [2, 0]].reshape(6, -1)
    part = bank_nt_xent(sub, 3, bank, reduction="none")
    torch.testing.assert_close(part, full[[2, 0]])
    one = bank_nt_xent(zv[:, 1], 3, bank, reduction="none")
    torch.testing.assert_close(one, full[1:2])
    torch.testing.assert_close(bank_nt_xent(z, 3, bank), full.mean())


def test_module_gradient_flows_to_z_only_and_bank_moves_with_module():
    bank = torch.randn(10, 8, requires_grad=True)
    loss = BankContrastiveLoss(bank, "nt_xent_multi", 0.5)
    assert not loss.bank.requires_grad
    torch.testing.assert_close(loss.bank.norm(dim=1), torch.ones(10))
    z = _z(3, 2).requires_grad_(True)
    loss(z, 2).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0 and bank.grad is None
    assert "bank" in dict(loss.named_buffers())
    # a better-aligned pair of views gives a lower loss (the loss measures agreement)
    a = torch.randn(1, 8)
    close = torch.cat([a, a + 0.01 * torch.randn(1, 8)])
    far = torch.cat([a, -a])
    assert loss(close, 2) < loss(far, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_views": 1}, "n_views >= 2"),
        ({"bank": torch.randn(4, 5)}, "bank must be"),
        ({"bank": torch.randn(0, 8)}, "bank must be"),
        ({"temperature": 0.0}, "temperature"),
        ({"reduction": "sum"}, "reduction"),
        ({"positives": "some"}, "positives"),
    ],
)
def test_refuses_bad_input(kwargs, match):
    args = {"z": _z(2, 2), "n_views": 2, "bank": torch.randn(4, 8)} | kwargs
    with pytest.raises(ValueError, match=match):
        bank_nt_xent(**args)


def test_module_refuses_the_negative_free_loss_and_bad_banks():
    with pytest.raises(ValueError, match="nt_xent, nt_xent_multi"):
        BankContrastiveLoss(torch.randn(4, 8), "alignment")
    with pytest.raises(ValueError, match="bank must be"):
        BankContrastiveLoss(torch.randn(8))
