"""Self-supervised losses on view-major embeddings (Mao et al., ICCV 2021 and baselines).

Every loss takes embeddings ``z`` of shape (n_views * N, D) in VIEW-MAJOR layout (row ``v * N + i``
is view ``v`` of image ``i``, the layout of :class:`revlit.ssl.views.SimCLRViews`) and returns

* ``reduction="mean"``: a scalar, the mean over all n_views * N anchors;
* ``reduction="none"``: the per-IMAGE loss, shape (N,), the mean over that image's n_views
  anchors (its mean equals the ``"mean"`` value).

Three losses of two kinds:

* :func:`nt_xent` -- the authors' variant. Mao et al. built on a widely used SimCLR
  re-implementation whose ``info_nce_loss`` L2-normalises z, takes the cosine similarity of all
  pairs, drops self-similarity, and for every anchor puts the positives first and the negatives
  after them in one row of logits, with cross-entropy target column 0. The target is therefore
  only the FIRST other view of the same image (the lowest view index other than the anchor's own);
  with more than two views the remaining positives sit in the denominator like negatives.
  Temperature 0.2 as in the authors' ``constrastive_loss_func``.
* :func:`nt_xent_multi` -- the multi-positive (SupCon "L_out", Khosla et al. 2020) form: the mean
  over all n_views - 1 positives of ``-log softmax``; equals :func:`nt_xent` for two views.
* :func:`alignment` -- negative-free: mean squared distance between the L2-normalised embeddings of
  the views of one image (the "alignment" term of Wang & Isola 2020; the quantity BYOL/SimSiam
  minimise, here without a predictor), in [0, 4]. It needs no other images, so it also works for
  N = 1. It is meant as a test-time objective on a head trained with a contrastive loss: TRAINING a
  head with it alone collapses (a constant output has loss 0), because nothing pushes images apart.

Batch size: the two contrastive losses need negatives and refuse N < 2 with a ValueError (for
N = 1 the logits of an anchor are its positives only; with two views the loss is then identically
0, which would silently turn the purifier into a no-op). :func:`alignment` accepts any N >= 1.
All three need n_views >= 2.

Precision: the losses always compute in float32 with autocast off; embeddings from a head under
bf16/fp16 autocast are cast up first, and the loss is float32 (or float64 for float64 input).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from revlit.models.precision import full_precision

REDUCTIONS = ("mean", "none")
LossFn = Callable[..., torch.Tensor]


def _in_fp32(loss: LossFn) -> LossFn:
    """Run ``loss`` in float32 with autocast off: a bf16/fp16 ``z`` (a head under autocast) is
    cast up first, since a log-softmax over thousands of negatives in bf16 loses the loss."""

    @functools.wraps(loss)
    def wrapped(z: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if z.dtype in (torch.bfloat16, torch.float16):
            z = z.float()
        with full_precision(z.device):
            return loss(z, *args, **kwargs)

    return wrapped


def _check(z: torch.Tensor, n_views: int, reduction: str, min_n: int) -> int:
    """Validate the inputs and return N (images)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got '{reduction}'")
    if z.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n_views * N, D), got shape {tuple(z.shape)}")
    if n_views < 2:
        raise ValueError(f"a self-supervised loss needs n_views >= 2, got {n_views}")
    if z.shape[0] % n_views != 0:
        raise ValueError(f"{z.shape[0]} embeddings are not a multiple of n_views={n_views}")
    n = z.shape[0] // n_views
    if n < min_n:
        raise ValueError(
            f"this loss needs a batch of >= {min_n} images (negatives come from the batch), got {n}"
        )
    return n


def _reduce(per_anchor: torch.Tensor, n_views: int, n: int, reduction: str) -> torch.Tensor:
    per_image = per_anchor.view(n_views, n).mean(0)
    return per_image if reduction == "none" else per_image.mean()


def _log_softmax_no_self(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """(M, M) log-softmax of cosine similarities / temperature, self-similarity excluded."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    zn = F.normalize(z, dim=1)
    logits = zn @ zn.t() / temperature
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(eye, float("-inf"))
    return torch.log_softmax(logits, dim=1)


@_in_fp32
def nt_xent(
    z: torch.Tensor, n_views: int, temperature: float = 0.2, reduction: str = "mean"
) -> torch.Tensor:
    """NT-Xent as the authors used it: target = the first other view, other positives as negatives.

    For anchor row ``r = v * N + i`` the target column is ``u * N + i`` with ``u = 0`` if
    ``v != 0`` else ``u = 1``; the softmax runs over all ``M - 1`` other rows (``M = n_views * N``).

    Args:
        z: embeddings (n_views * N, D), view-major, any scale (they are L2-normalised here).
        n_views: views per image (>= 2).
        temperature: softmax temperature (> 0); the authors use 0.2.
        reduction: ``"mean"`` (scalar) or ``"none"`` (per image, shape (N,)).

    Raises:
        ValueError: bad shapes, n_views < 2, N < 2, temperature <= 0, unknown reduction.
    """
    n = _check(z, n_views, reduction, min_n=2)
    logp = _log_softmax_no_self(z, temperature)
    rows = torch.arange(n_views * n, device=z.device)
    view = rows // n
    target = torch.where(view == 0, n + rows, rows % n)  # view 0 -> view 1, others -> view 0
    per_anchor = -logp[rows, target]
    return _reduce(per_anchor, n_views, n, reduction)


@_in_fp32
def nt_xent_multi(
    z: torch.Tensor, n_views: int, temperature: float = 0.2, reduction: str = "mean"
) -> torch.Tensor:
    """Multi-positive NT-Xent (SupCon ``L_out``): mean of ``-log softmax`` over all positives.

    For anchor ``r`` with positives ``P(r)`` (the other n_views - 1 views of its image):
    ``loss_r = -1/|P(r)| * sum_{p in P(r)} log( exp(s_rp / t) / sum_{a != r} exp(s_ra / t) )``.

    Args and Raises: as :func:`nt_xent`.
    """
    n = _check(z, n_views, reduction, min_n=2)
    logp = _log_softmax_no_self(z, temperature)
    m = n_views * n
    img = torch.arange(m, device=z.device) % n
    pos = (img[:, None] == img[None, :]) & ~torch.eye(m, dtype=torch.bool, device=z.device)
    per_anchor = -(logp.masked_fill(~pos, 0.0).sum(1)) / (n_views - 1)
    return _reduce(per_anchor, n_views, n, reduction)


@_in_fp32
def alignment(
    z: torch.Tensor, n_views: int, temperature: float | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """Negative-free alignment loss: mean ``||ẑ_u - ẑ_v||²`` over pairs of views of one image.

    ``ẑ`` are the L2-normalised embeddings, so the value lies in [0, 4] (``= 2 - 2 cos``). For an
    anchor the loss is the mean over its n_views - 1 positives; the per-image value (mean over
    anchors) equals the mean over the image's unordered view pairs.

    Args:
        z: embeddings (n_views * N, D), view-major.
        n_views: views per image (>= 2).
        temperature: ignored (accepted so every loss has the same signature).
        reduction: ``"mean"`` or ``"none"`` (per image, (N,)).

    Raises:
        ValueError: bad shapes, n_views < 2, unknown reduction. Any N >= 1 is accepted.
    """
    n = _check(z, n_views, reduction, min_n=1)
    zn = F.normalize(z, dim=1).view(n_views, n, -1)
    # sum_{u<v} ||a_u - a_v||² = V * sum_v ||a_v||² - ||sum_v a_v||², per image.
    sq = zn.pow(2).sum(-1).sum(0)
    tot = zn.sum(0).pow(2).sum(-1)
    pairs = n_views * (n_views - 1) / 2
    per_image = (n_views * sq - tot) / pairs
    return per_image if reduction == "none" else per_image.mean()


_LOSSES: dict[str, LossFn] = {
    "nt_xent": nt_xent,
    "nt_xent_multi": nt_xent_multi,
    "alignment": alignment,
}


def available() -> list[str]:
    """Names accepted by :func:`get_loss`."""
    return sorted(_LOSSES)


def get_loss(name: str) -> LossFn:
    """The loss function registered as ``name`` (``nt_xent``, ``nt_xent_multi``, ``alignment``).

    Every returned function has the signature ``(z, n_views, temperature, reduction)``.

    Raises:
        ValueError: one line naming the unknown loss and the known ones.
    """
    if name not in _LOSSES:
        raise ValueError(f"unknown SSL loss '{name}'; known: {', '.join(available())}")
    return _LOSSES[name]


class ContrastiveLoss(nn.Module):
    """A registered SSL loss with its temperature, selectable from YAML by ``class_path``.

    Args:
        name: ``nt_xent`` (authors' variant, default), ``nt_xent_multi`` or ``alignment``.
        temperature: softmax temperature of the NT-Xent losses (ignored by ``alignment``).

    ``forward(z, n_views, reduction="mean")`` with ``z`` (n_views * N, D) view-major returns a
    scalar or, for ``reduction="none"``, the per-image loss (N,).
    """

    def __init__(self, name: str = "nt_xent", temperature: float = 0.2) -> None:
        super().__init__()
        self.fn = get_loss(name)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.name, self.temperature = name, float(temperature)

    def extra_repr(self) -> str:
        return f"name={self.name}, temperature={self.temperature}"

    def forward(self, z: torch.Tensor, n_views: int, reduction: str = "mean") -> torch.Tensor:
        return self.fn(z, n_views, temperature=self.temperature, reduction=reduction)
