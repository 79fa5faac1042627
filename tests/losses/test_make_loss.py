"""The one SSL-loss lookup: in-batch negatives or a bank of negatives."""

from __future__ import annotations

import pytest
import torch

from revlit.losses import BankContrastiveLoss, ContrastiveLoss, make_loss


def test_without_a_bank_the_in_batch_loss():
    loss = make_loss("nt_xent_multi", 0.5)
    assert isinstance(loss, ContrastiveLoss)
    assert (loss.name, loss.temperature) == ("nt_xent_multi", 0.5)


def test_with_a_bank_the_bank_loss_on_its_negatives():
    bank = torch.randn(8, 4)
    loss = make_loss("nt_xent", 0.2, bank)
    assert isinstance(loss, BankContrastiveLoss)
    z = torch.randn(2 * 1, 4)  # one image, two views: works only against the bank
    assert loss(z, 2, reduction="none").shape == (1,)


def test_unknown_or_unsupported_names_are_refused():
    with pytest.raises(ValueError, match="unknown SSL loss"):
        make_loss("simclr", 0.2)
    with pytest.raises(ValueError):
        make_loss("alignment", 0.2, torch.randn(8, 4))
