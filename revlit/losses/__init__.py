"""Self-supervised losses on view-major embeddings (framework-free)."""

from __future__ import annotations

import torch
from torch import nn

from revlit.losses.bank import BANK_LOSSES, BankContrastiveLoss
from revlit.losses.contrastive import (
    ContrastiveLoss,
    alignment,
    available,
    get_loss,
    nt_xent,
    nt_xent_multi,
)


def make_loss(name: str, temperature: float, bank: torch.Tensor | None = None) -> nn.Module:
    """The SSL loss module by name: in-batch negatives, or a fixed bank of negatives.

    Args:
        name: ``nt_xent``, ``nt_xent_multi`` or ``alignment`` (:func:`available`); with a bank
            only the two NT-Xent forms.
        temperature: softmax temperature (> 0).
        bank: (M, D) negatives (:mod:`revlit.defenses.bank`); ``None`` takes the negatives from
            the batch (:class:`ContrastiveLoss`), else :class:`BankContrastiveLoss` on the bank's
            device.

    Raises:
        ValueError: one line, unknown loss or a loss the bank does not support.
    """
    if bank is None:
        return ContrastiveLoss(name, temperature)
    return BankContrastiveLoss(bank, name, temperature).to(bank.device)


__all__ = [
    "BANK_LOSSES",
    "BankContrastiveLoss",
    "ContrastiveLoss",
    "alignment",
    "available",
    "get_loss",
    "make_loss",
    "nt_xent",
    "nt_xent_multi",
]
