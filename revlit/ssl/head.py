"""The self-supervised projection head of Mao et al. (ICCV 2021), its checkpoints, and ``ssl_loss``.

Mao et al. attach a small MLP to the penultimate features of a FROZEN classifier and train it with
a contrastive loss on SimCLR views of clean images; at test time the gradient of that loss w.r.t.
the input pixels drives the reverse attack. The authors' head on WRN-28-10 is
640 -> 256 -> BatchNorm1d -> ReLU -> 16; for ResNet-20 the input is 64-dimensional.

A head checkpoint is a plain dict (``torch.load(..., weights_only=True)`` loads it)::

    {"format": "revlit-ssl-head/1", "in_dim", "hidden_dim", "out_dim", "state_dict",
     "classifier_sha256", "meta"}

and is only valid for the classifier it was trained on: :func:`load_head` refuses another
classifier's sha256 unless ``allow_mismatch``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from pathlib import Path

import torch
from torch import nn

from revlit.io import atomic_save, sha256_file
from revlit.losses.contrastive import ContrastiveLoss
from revlit.models.checkpoint import CheckpointError, check_finite, safe_load
from revlit.models.lean import lean_input_grad
from revlit.ssl.views import SimCLRViews

HEAD_FORMAT = "revlit-ssl-head/1"


class SSLHead(nn.Module):
    """Projection head ``Linear(in, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out)``.

    Args:
        in_dim: classifier feature dimension (64 for ResNet-20, 640 for WRN-28-10).
        hidden_dim: hidden width (authors: 256).
        out_dim: embedding dimension fed to the contrastive loss (authors: 16).

    Input (B, in_dim) penultimate features; output (B, out_dim) embeddings (unnormalised; the
    losses L2-normalise). In training mode BatchNorm needs B >= 2.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 256, out_dim: int = 16) -> None:
        super().__init__()
        for name, d in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if int(d) < 1:
                raise ValueError(f"SSLHead {name} must be >= 1, got {d}")
        self.in_dim, self.hidden_dim, self.out_dim = int(in_dim), int(hidden_dim), int(out_dim)
        self.net = nn.Sequential(
            nn.Linear(self.in_dim, self.hidden_dim),
            nn.BatchNorm1d(self.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(self.hidden_dim, self.out_dim),
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if f.ndim != 2 or f.shape[1] != self.in_dim:
            raise ValueError(f"SSLHead expects features (B, {self.in_dim}), got {tuple(f.shape)}")
        return self.net(f)


def save_head(
    head: SSLHead,
    path: str | os.PathLike,
    classifier_sha256: str,
    meta: dict | None = None,
) -> str:
    """Write a head checkpoint atomically and return its sha256.

    Args:
        head: the trained head.
        path: destination file (parent folders are created).
        classifier_sha256: sha256 of the classifier checkpoint the head was trained on.
        meta: extra JSON-like information (epoch, loss, views, ...): strings, numbers, lists, dicts.
    """
    if not isinstance(classifier_sha256, str) or not classifier_sha256:
        raise ValueError("save_head needs the classifier's sha256 (a non-empty string)")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    obj = {
        "format": HEAD_FORMAT,
        "in_dim": head.in_dim,
        "hidden_dim": head.hidden_dim,
        "out_dim": head.out_dim,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
        "classifier_sha256": classifier_sha256,
        "meta": dict(meta or {}),
    }
    atomic_save(obj, p)
    return sha256_file(p)


def load_head(
    path: str | os.PathLike,
    classifier_sha256: str | None = None,
    allow_mismatch: bool = False,
) -> tuple[SSLHead, dict]:
    """Load a head checkpoint written by :func:`save_head`.

    Args:
        path: the checkpoint.
        classifier_sha256: sha256 of the classifier the head will be used with; ``None`` skips the
            check.
        allow_mismatch: accept a head trained on another classifier (logs nothing; the caller
            should say so in its record).

    Returns:
        ``(head in eval mode, info)`` with info keys ``path``, ``sha256``, ``classifier_sha256``,
        ``in_dim``, ``hidden_dim``, ``out_dim``, ``meta``.

    Raises:
        CheckpointError (a ValueError, one line): missing/unsafe file, not a head checkpoint,
            NaN/inf weights, or trained on a different classifier without ``allow_mismatch``.
    """
    obj = safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != HEAD_FORMAT:
        raise CheckpointError(
            f"{path} is not a revlit SSL head checkpoint (expected {HEAD_FORMAT})"
        )
    made_for = obj.get("classifier_sha256")
    if classifier_sha256 is not None and made_for != classifier_sha256 and not allow_mismatch:
        raise CheckpointError(
            f"SSL head {path} was trained on classifier {str(made_for)[:12]}, not "
            f"{classifier_sha256[:12]}; retrain it or pass allow_mismatch"
        )
    head = SSLHead(obj["in_dim"], obj["hidden_dim"], obj["out_dim"])
    head.load_state_dict(obj["state_dict"])
    check_finite(head.state_dict(), f"SSL head {path}")
    head.eval()
    info = {
        "path": str(path),
        "sha256": sha256_file(path),
        "classifier_sha256": made_for,
        "in_dim": obj["in_dim"],
        "hidden_dim": obj["hidden_dim"],
        "out_dim": obj["out_dim"],
        "meta": obj.get("meta", {}),
    }
    return head, info


_LOSS_ARGS = inspect.signature(ContrastiveLoss).parameters
#: what a head was trained with when its checkpoint does not record it: the defaults of
#: :class:`revlit.losses.ContrastiveLoss` and :class:`revlit.ssl.SimCLRViews` (the authors' setting)
HEAD_DEFAULTS = {
    "loss": _LOSS_ARGS["name"].default,
    "temperature": _LOSS_ARGS["temperature"].default,
    "view_mode": inspect.signature(SimCLRViews).parameters["mode"].default,
}


def head_training(info: dict, defaults: bool = True) -> dict:
    """Loss name, temperature and views mode a head was trained with, from its info's ``meta``.

    The one reader of a head's training record: ``meta["loss"]`` (a name, or ``{"name",
    "temperature"}``), ``meta["temperature"]`` (or ``loss_temperature``), ``meta["view_mode"]``
    (or ``views_mode``, ``views["mode"]``, or a ``repr(SimCLRViews)`` string).

    Args:
        info: the info dict of :func:`load_head` (only ``meta`` is read).
        defaults: fill what the record lacks from :data:`HEAD_DEFAULTS`; ``False`` returns only
            the keys the record states (to compare a requested setting with the recorded one).

    Returns:
        ``{"loss": str, "temperature": float, "view_mode": "shared" | "per_sample"}`` (a subset
        without ``defaults``).
    """
    meta = info.get("meta") or {}
    out: dict = {}
    loss = meta.get("loss")
    if isinstance(loss, dict):
        out["loss"], out["temperature"] = loss.get("name"), loss.get("temperature")
    elif isinstance(loss, str):
        out["loss"] = loss
    for key in ("temperature", "loss_temperature"):
        if out.get("temperature") is None and meta.get(key) is not None:
            out["temperature"] = meta[key]
    views = meta.get("views")
    mode = meta.get("view_mode", meta.get("views_mode"))
    if mode is None and isinstance(views, dict):
        mode = views.get("mode")
    if mode is None and isinstance(views, str):  # repr(SimCLRViews): "...mode=shared)"
        found = re.search(r"mode=['\"]?(shared|per_sample)", views)
        mode = found.group(1) if found else None
    out["view_mode"] = mode
    out = {k: v for k, v in out.items() if v is not None}
    if "temperature" in out:
        out["temperature"] = float(out["temperature"])
    return {**HEAD_DEFAULTS, **out} if defaults else out


def ssl_loss(
    classifier: nn.Module,
    head: nn.Module,
    views: nn.Module,
    loss,
    x: torch.Tensor,
    n_views: int,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    chunk: int | None = None,
    lean: bool = False,
    arena=None,
    relu_float_bytes: int = 0,
) -> torch.Tensor:
    """Self-supervised loss of a batch: views -> ``classifier.features`` -> head -> loss.

    Framework-free; differentiable w.r.t. ``x`` (the purifier takes ``torch.autograd.grad`` of it)
    and w.r.t. the head's parameters (head training). It does not change any module's mode: put
    classifier and head in eval mode for test-time use so BatchNorm statistics stay untouched.

    Args:
        classifier: a :class:`revlit.models.Classifier` (``features(x) -> (B, feature_dim)``).
        head: maps (B, feature_dim) -> (B, D), e.g. :class:`SSLHead`.
        views: ``views(x, n_views, generator) -> (n_views * N, 3, H, W)`` view-major, e.g.
            :class:`revlit.ssl.views.SimCLRViews`.
        loss: ``loss(z, n_views, reduction=...)``, e.g. :class:`revlit.losses.ContrastiveLoss`,
            or a registered loss name.
        x: images in [0, 1], (N, 3, H, W).
        n_views: views per image (>= 2).
        generator: CPU generator for the views (same seed -> same views).
        reduction: ``"mean"`` (scalar) or ``"none"`` (per image, (N,)).
        chunk: if set, run the backbone over chunks of at most this many views (one graph, one
            loss; the same features for any chunking): bounds the size of single allocations.
        lean: run the backbone under :func:`revlit.models.lean.lean_input_grad` (one context for
            all chunks): a frozen, eval-mode classifier then keeps only 1-byte ReLU masks for the
            backward pass instead of its float activations; the input gradient is bitwise the
            same. Needs a frozen classifier to save anything (other calls fall through).
        arena: with ``lean``, the :class:`revlit.models.lean.MaskArena` the ReLU masks come from
            (default: a fresh one).
        relu_float_bytes: with ``lean``, keep the first ReLU outputs up to this many bytes as
            floats instead of masks (faster; see :class:`revlit.models.lean.lean_input_grad`).

    Returns:
        The loss: a scalar or (N,).
    """
    if isinstance(loss, str):
        from revlit.losses import ContrastiveLoss

        loss = ContrastiveLoss(loss)
    v = views(x, n_views, generator)
    v = v.contiguous(memory_format=torch.channels_last)  # faster convolutions (docs/speed.md)
    with lean_input_grad(arena, relu_float_bytes) if lean else contextlib.nullcontext():
        if chunk is not None and chunk > 0 and v.shape[0] > chunk:
            feats = torch.cat([classifier.features(part) for part in v.split(chunk)])
        else:
            feats = classifier.features(v)
    return loss(head(feats), n_views, reduction=reduction)


@torch.no_grad()
def mean_ssl_loss(
    classifier: nn.Module,
    head: nn.Module,
    views: nn.Module,
    loss,
    x: torch.Tensor,
    n_views: int,
    batch_size: int,
    seed: int,
    chunk: int | None = None,
    device: torch.device | str | None = None,
) -> float:
    """Mean :func:`ssl_loss` per image of ``x``, in batches of ``batch_size``, without gradients.

    Batch ``j`` draws its views from a generator seeded ``seed + j``, so two image sets of the
    same size (clean images and their attacked versions, Mao et al., ICCV 2021) are compared on
    the same batches with the same views. A batch of one image has no negatives and is skipped.
    Modes are left as they are (eval mode for a comparison).

    Args:
        classifier, head, views, loss, n_views, chunk: as in :func:`ssl_loss`.
        x: images in [0, 1], (N, 3, H, W), on any device.
        batch_size: images per batch (the contrastive negatives come from the batch).
        seed: view seed of the first batch.
        device: where each batch is evaluated (default: where ``x`` is).

    Returns:
        The mean loss per image (0.0 when no batch has two images).
    """
    gen = torch.Generator()
    total, n = 0.0, 0
    for j, xb in enumerate(x.split(batch_size)):
        if len(xb) < 2:
            continue
        gen.manual_seed(seed + j)
        xb = (xb if device is None else xb.to(device)).contiguous(memory_format=torch.channels_last)
        loss_b = ssl_loss(classifier, head, views, loss, xb, n_views, gen, "mean", chunk)
        total += float(loss_b) * len(xb)
        n += len(xb)
    return total / max(n, 1)
