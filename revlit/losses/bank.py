"""NT-Xent against a fixed bank of negatives: a contrastive loss that never looks at batch-mates.

The reverse attack of Mao et al. ("Adversarial Attacks are Reversible with Natural Supervision",
ICCV 2021) lowers the authors' NT-Xent loss, whose negatives for an anchor are the views of the
OTHER images of the batch. An image's repair therefore depends on which images share its batch,
and a batch of one image has nothing to contrast against. Here the negatives are a fixed bank of
embeddings instead (e.g. the head's embeddings of M clean training images, see
:mod:`revlit.defenses.bank`), so an anchor's loss depends only on its own image's views and on the
bank: the loss of image i is the same whatever else is in the batch, and N = 1 works.

For anchor (view v of image i) with L2-normalised embedding ẑ_vi, positives ẑ_ui (u ≠ v, the other
views of image i) and bank rows b̂_m (m = 1..M, L2-normalised)::

    log Z_vi = logsumexp( {ẑ_vi·ẑ_ui / T : u ≠ v} ∪ {ẑ_vi·b̂_m / T : m} )
    nt_xent:        loss_vi = log Z_vi − ẑ_vi·ẑ_ti / T     (t = first other view: 1 if v = 0 else 0)
    nt_xent_multi:  loss_vi = log Z_vi − mean_{u≠v} ẑ_vi·ẑ_ui / T

i.e. the two in-batch NT-Xent forms of :mod:`revlit.losses.contrastive` (the authors' "first other
view is the target" variant and the multi-positive SupCon L_out form) with the batch's other
images replaced by the bank. Same interface as :class:`revlit.losses.ContrastiveLoss`: view-major
embeddings (n_views * N, D); ``reduction="none"`` gives the per-image mean over its anchors (N,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from revlit.losses.contrastive import REDUCTIONS, _in_fp32

BANK_LOSSES = ("nt_xent", "nt_xent_multi")


@_in_fp32
def bank_nt_xent(
    z: torch.Tensor,
    n_views: int,
    bank: torch.Tensor,
    temperature: float = 0.2,
    reduction: str = "mean",
    positives: str = "first",
) -> torch.Tensor:
    """NT-Xent whose negatives are the rows of ``bank`` (never the other images of the batch).

    Args:
        z: embeddings (n_views * N, D), view-major (row ``v * N + i`` is view v of image i), any
            scale (L2-normalised here). N >= 1.
        n_views: views per image (>= 2: the positives).
        bank: negatives (M, D), M >= 1, any scale (L2-normalised here); no gradient flows into it.
        temperature: softmax temperature (> 0); the authors use 0.2.
        reduction: ``"mean"`` (scalar over all anchors) or ``"none"`` (per image, (N,)).
        positives: ``"first"`` (the authors' NT-Xent: target = the first other view, the other
            positives stay in the denominator) or ``"all"`` (mean over all positives).

    Returns:
        A scalar, or (N,) per-image losses; row i depends only on rows ``v * N + i`` of ``z``
        and on ``bank``.

    Raises:
        ValueError: bad shapes, n_views < 2, empty bank, dimension mismatch, temperature <= 0,
            unknown ``reduction`` or ``positives``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got '{reduction}'")
    if positives not in ("first", "all"):
        raise ValueError(f"positives must be 'first' or 'all', got '{positives}'")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n_views * N, D), got shape {tuple(z.shape)}")
    if n_views < 2:
        raise ValueError(f"a contrastive loss needs n_views >= 2, got {n_views}")
    if z.shape[0] == 0 or z.shape[0] % n_views != 0:
        raise ValueError(
            f"{z.shape[0]} embeddings are not a positive multiple of n_views={n_views}"
        )
    if bank.ndim != 2 or bank.shape[0] < 1 or bank.shape[1] != z.shape[1]:
        raise ValueError(
            f"bank must be (M >= 1, {z.shape[1]}) to match the embeddings, got {tuple(bank.shape)}"
        )
    n = z.shape[0] // n_views
    zn = F.normalize(z, dim=1).view(n_views, n, -1)
    bn = F.normalize(bank.detach().to(device=z.device, dtype=z.dtype), dim=1)
    pos = torch.einsum("vnd,und->nvu", zn, zn) / temperature  # (N, V, V)
    neg = torch.einsum("vnd,md->nvm", zn, bn) / temperature  # (N, V, M)
    eye = torch.eye(n_views, dtype=torch.bool, device=z.device)
    log_z = torch.logsumexp(torch.cat((pos.masked_fill(eye, float("-inf")), neg), dim=2), dim=2)
    if positives == "first":
        target = torch.ones(n_views, dtype=torch.long, device=z.device)
        target[1:] = 0  # view 0 -> view 1, every other view -> view 0
        s_pos = pos.gather(2, target.view(1, n_views, 1).expand(n, n_views, 1)).squeeze(2)
    else:
        s_pos = pos.masked_fill(eye, 0.0).sum(2) / (n_views - 1)
    per_image = (log_z - s_pos).mean(1)  # (N,)
    return per_image if reduction == "none" else per_image.mean()


class BankContrastiveLoss(nn.Module):
    """NT-Xent with a fixed bank of negatives, a drop-in for :class:`ContrastiveLoss`.

    Args:
        bank: (M, D) embeddings of clean images (stored L2-normalised as a buffer, so
            ``.to(device)`` moves it with the module).
        name: ``nt_xent`` (authors' form, default) or ``nt_xent_multi``: use the form the head was
            trained with.
        temperature: softmax temperature (default 0.2, the authors').

    ``forward(z, n_views, reduction="mean")`` with ``z`` (n_views * N, D) view-major returns a
    scalar or, for ``reduction="none"``, the per-image loss (N,); image i's value does not depend
    on the other images of the batch, and N = 1 is allowed.
    """

    def __init__(self, bank: torch.Tensor, name: str = "nt_xent", temperature: float = 0.2):
        super().__init__()
        if name not in BANK_LOSSES:
            raise ValueError(
                f"the bank loss supports {', '.join(BANK_LOSSES)} (negatives), got '{name}'"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not isinstance(bank, torch.Tensor) or bank.ndim != 2 or bank.shape[0] < 1:
            shape = tuple(bank.shape) if isinstance(bank, torch.Tensor) else type(bank).__name__
            raise ValueError(f"bank must be a (M >= 1, D) tensor, got {shape}")
        self.register_buffer("bank", F.normalize(bank.detach().float(), dim=1))
        self.name, self.temperature = name, float(temperature)

    def extra_repr(self) -> str:
        return f"name={self.name}, temperature={self.temperature}, bank={tuple(self.bank.shape)}"

    def forward(self, z: torch.Tensor, n_views: int, reduction: str = "mean") -> torch.Tensor:
        positives = "first" if self.name == "nt_xent" else "all"
        return bank_nt_xent(z, n_views, self.bank, self.temperature, reduction, positives)
