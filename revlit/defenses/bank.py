"""A bank of clean negatives: the reverse attack, one image at a time (batch-independent purifier).

The reverse attack of Mao et al. ("Adversarial Attacks are Reversible with Natural Supervision",
ICCV 2021) descends an NT-Xent loss whose negatives are the other images of the batch, so how an
image is repaired depends on its batch-mates, and at batch size 1 there is nothing to contrast.
revlit adds an option that removes both: a fixed *bank* of negatives, the head's embeddings of M
clean training images (e.g. M = 4,096) computed once from the frozen classifier and head and
stored beside the head (with the head's and the classifier's sha256). Every image is contrasted
against the same bank (:class:`revlit.losses.bank.BankContrastiveLoss`), and its randomness (the
random start and the views of every step) comes from its own generator seeded from
(seed, test index) (:func:`per_image_generators`), so each image is repaired on its own: its
pixels do not change when its batch-mates change, and B = 1 works.

Nothing here changes the default purifier: :func:`bank_purifier` builds a plain
:class:`revlit.defenses.ReversePurifier` with the bank loss, and per-image generators are passed to
its ``purify`` (the views and the random start accept a list of generators, one per image).

Bank file (``torch.load(..., weights_only=True)``)::

    {"format": "revlit-ssl-bank/1", "embeddings": float32 (M·k, D) L2-normalised,
     "indices": int64 (M,) CIFAR-10 training indices, "head_sha256", "classifier_sha256", "meta"}

Command line (writes ``<head>_bank.pt`` next to the head by default)::

    python -m revlit.defenses.bank --classifier checkpoints/resnet20_at.pt \\
        --head checkpoints/resnet20_at_head.pt --m 4096
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from revlit.defenses.reverse import ReversePurifier
from revlit.losses import make_loss
from revlit.models.base import frozen_eval
from revlit.models.checkpoint import CheckpointError, safe_load, sha256_file
from revlit.ssl.head import HEAD_DEFAULTS

BANK_FORMAT = "revlit-ssl-bank/1"


@torch.no_grad()
def compute_bank(
    classifier: nn.Module,
    head: nn.Module,
    images: torch.Tensor,
    views: nn.Module | None = None,
    views_per_image: int = 1,
    generator: torch.Generator | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """L2-normalised head embeddings of clean images: the bank of negatives.

    Args:
        classifier: a :class:`revlit.models.Classifier` (frozen; put in eval mode here).
        head: the SSL head trained on it (eval mode here).
        images: clean images (M, 3, H, W), float in [0, 1] or uint8 in [0, 255].
        views: if given (e.g. :class:`revlit.ssl.SimCLRViews`), embed ``views_per_image`` random
            views of every image, as the negatives were during the head's training; ``None``
            embeds the images as they are.
        views_per_image: random views per image (>= 1; ignored without ``views``).
        generator: CPU generator of the views.
        batch_size: images per backbone pass.

    Returns:
        (M · k, D) float32 on the CPU, unit rows (k = ``views_per_image`` or 1).
    """
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"bank images must be (M >= 1, C, H, W), got {tuple(images.shape)}")
    if views_per_image < 1:
        raise ValueError(f"views_per_image must be >= 1, got {views_per_image}")
    dev = next(classifier.parameters()).device
    out = []
    with frozen_eval(classifier, head, views):
        for xb in images.split(batch_size):
            xb = xb.to(dev)
            xb = xb.float().div(255.0) if xb.dtype == torch.uint8 else xb.float()
            if views is not None:
                xb = views(xb, views_per_image, generator)
            xb = xb.contiguous(memory_format=torch.channels_last)
            out.append(F.normalize(head(classifier.features(xb)).float(), dim=1).cpu())
    return torch.cat(out)


def default_bank_path(head_path: str | os.PathLike) -> Path:
    """Where a head's bank lives by default: ``<head stem>_bank.pt`` beside the head."""
    p = Path(head_path)
    return p.with_name(p.stem + "_bank.pt")


def save_bank(
    path: str | os.PathLike,
    embeddings: torch.Tensor,
    head_sha256: str,
    classifier_sha256: str,
    indices: torch.Tensor | None = None,
    meta: dict | None = None,
) -> str:
    """Write a bank file atomically and return its sha256.

    Args:
        path: destination (parent folders are created).
        embeddings: (M, D) bank rows (stored L2-normalised, float32).
        head_sha256: sha256 of the head checkpoint that produced them.
        classifier_sha256: sha256 of the classifier checkpoint under the head.
        indices: CIFAR-10 training indices of the bank images.
        meta: JSON-like extras (M, seed, views, commit, date, ...).
    """
    for name, sha in (("head_sha256", head_sha256), ("classifier_sha256", classifier_sha256)):
        if not isinstance(sha, str) or not sha:
            raise ValueError(f"save_bank needs {name} (a non-empty string)")
    if embeddings.ndim != 2 or embeddings.shape[0] < 1:
        raise ValueError(f"bank embeddings must be (M >= 1, D), got {tuple(embeddings.shape)}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    obj = {
        "format": BANK_FORMAT,
        # clone: a slice would otherwise drag its whole parent storage into the file
        "embeddings": F.normalize(embeddings.detach().float().cpu(), dim=1).clone(),
        "indices": None if indices is None else indices.detach().long().cpu().clone(),
        "head_sha256": head_sha256,
        "classifier_sha256": classifier_sha256,
        "meta": dict(meta or {}),
    }
    tmp = p.with_suffix(p.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, p)
    return sha256_file(p)


def load_bank(
    path: str | os.PathLike, head_sha256: str | None = None, allow_mismatch: bool = False
) -> tuple[torch.Tensor, dict]:
    """Load a bank written by :func:`save_bank`.

    Args:
        path: the bank file.
        head_sha256: sha256 of the head it will be used with; ``None`` skips the check.
        allow_mismatch: accept a bank computed with another head.

    Returns:
        ``(embeddings (M, D) float32 unit rows, info)``; info keys ``path``, ``sha256``,
        ``head_sha256``, ``classifier_sha256``, ``m``, ``dim``, ``meta``.

    Raises:
        CheckpointError (a ValueError, one line): missing/unsafe file, not a bank, or made with
            another head without ``allow_mismatch``.
    """
    obj = safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != BANK_FORMAT:
        raise CheckpointError(f"{path} is not a revlit bank of negatives (expected {BANK_FORMAT})")
    emb = obj.get("embeddings")
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] < 1:
        raise CheckpointError(f"{path}: the bank holds no (M, D) embeddings")
    made_with = obj.get("head_sha256")
    if head_sha256 is not None and made_with != head_sha256 and not allow_mismatch:
        raise CheckpointError(
            f"bank {path} was computed with head {str(made_with)[:12]}, not {head_sha256[:12]}; "
            "rebuild it (python -m revlit.defenses.bank) or pass allow_mismatch"
        )
    info = {
        "path": str(path),
        "sha256": sha256_file(path),
        "head_sha256": made_with,
        "classifier_sha256": obj.get("classifier_sha256"),
        "m": int(emb.shape[0]),
        "dim": int(emb.shape[1]),
        "meta": obj.get("meta", {}),
    }
    return emb.float(), info


def bank_purifier(
    classifier: nn.Module,
    head: nn.Module,
    bank: torch.Tensor,
    views: nn.Module,
    loss: str = HEAD_DEFAULTS["loss"],
    temperature: float = HEAD_DEFAULTS["temperature"],
    **purifier_kwargs,
) -> ReversePurifier:
    """A :class:`ReversePurifier` whose negatives are ``bank`` instead of the batch.

    Call its ``purify(x, per_image_generators(seed, indices))`` to repair every image on its own:
    the result for an image then does not depend on the other images of the batch (eval-mode
    BatchNorm and per-row views, start and loss), and a batch of one image works.

    Args:
        classifier, head, views: as for :class:`ReversePurifier`.
        bank: (M, D) negatives, e.g. from :func:`load_bank`.
        loss: ``nt_xent`` or ``nt_xent_multi``, the form the head was trained with.
        temperature: its temperature.
        **purifier_kwargs: the other :class:`ReversePurifier` settings (eps, steps, n_views, ...).
    """
    dev = next(classifier.parameters()).device
    bank_loss = make_loss(loss, temperature, bank.to(dev))
    purifier = ReversePurifier(classifier, head, bank_loss, views, **purifier_kwargs)
    purifier.per_image = True  # defend() draws from per_image_generators(seed, indices)
    return purifier


# ---------------------------------------------------------------------- command line
def build_bank_file(
    classifier_path: str,
    head_path: str,
    out: str | None = None,
    m: int = 4096,
    seed: int = 0,
    data_dir: str | None = None,
    views_per_image: int = 1,
    allow_mismatch: bool = False,
) -> tuple[Path, dict]:
    """Compute and store the bank of ``head_path``: M training images chosen by a seeded shuffle.

    Returns:
        ``(path written, meta)``.
    """
    from revlit.data.cifar import default_data_dir, load_cifar10
    from revlit.io import git_commit
    from revlit.models.checkpoint import load_classifier
    from revlit.ssl.head import head_training, load_head
    from revlit.ssl.views import SimCLRViews

    if m < 1:
        raise ValueError(f"bank size m must be >= 1, got {m}")
    net, cinfo = load_classifier(classifier_path)
    head, hinfo = load_head(head_path, cinfo["sha256"], allow_mismatch=allow_mismatch)
    x_train, _ = load_cifar10(data_dir or default_data_dir(), train=True)
    if m > len(x_train):
        raise ValueError(f"bank size m={m} exceeds the {len(x_train)} training images")
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:m]
    views = SimCLRViews(mode=head_training(hinfo)["view_mode"])
    t0 = time.perf_counter()
    emb = compute_bank(
        net.to(memory_format=torch.channels_last),
        head,
        x_train[idx],
        views,
        views_per_image,
        torch.Generator().manual_seed(seed + 1),
    )
    meta = {
        "m": m,
        "views_per_image": views_per_image,
        "seed": seed,
        "views": repr(views),
        "head_path": str(head_path),
        "classifier_path": str(classifier_path),
        "seconds": round(time.perf_counter() - t0, 2),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = Path(out) if out else default_bank_path(head_path)
    save_bank(path, emb, hinfo["sha256"], cinfo["sha256"], idx, meta)
    return path, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m revlit.defenses.bank",
        description="Compute the bank of clean negatives of an SSL head (batch-independent purifier).",
    )
    p.add_argument("--classifier", default="checkpoints/resnet20_at.pt")
    p.add_argument("--head", default="checkpoints/resnet20_at_head.pt")
    p.add_argument("--out", default=None, help="bank file (default: <head stem>_bank.pt)")
    p.add_argument("--m", type=int, default=4096, help="training images in the bank")
    p.add_argument("--views-per-image", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default $REVLIT_DATA_DIR)")
    p.add_argument("--allow-mismatch", action="store_true")
    a = p.parse_args(argv)
    try:
        path, meta = build_bank_file(
            a.classifier, a.head, a.out, a.m, a.seed, a.data_dir, a.views_per_image,
            a.allow_mismatch,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"revlit: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"wrote {path} (M={meta['m']}, {meta['seconds']} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
