"""The defended-evaluation loop: one batch, classified without and with a defense.

One framework-free function, :func:`defend_batch`, is what
:class:`revlit.modules.defense.DefenseModule` runs in ``predict``/``test`` and what the studies
(:func:`revlit.studies.common.defend`) run over a split, so a study's row at the default settings
is the number ``python -m revlit.evaluate`` reports.

Seeding (:mod:`revlit.seeding`): the defense draws from one generator per batch, seeded from
``(seed, first test index of the batch)`` (or, for a batch-independent defense, one per image);
the paired before/after SSL-loss diagnostic draws its views from a generator of its own, so
measuring it never changes the defended images. Images are [0, 1] float NCHW.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from revlit.defenses.base import Defense, check_images
from revlit.models.precision import full_precision
from revlit.seeding import batch_generator, diagnostic_generator, per_image_generators
from revlit.ssl.head import ssl_loss


@dataclass
class SSLProbe:
    """The diagnostic SSL loss of a batch: per-image contrastive loss over one draw of views.

    Not part of any defense's cost; measured before and after the defense on the SAME draw of
    views, so the difference is not view noise.
    """

    classifier: nn.Module
    head: nn.Module
    loss: nn.Module
    views: nn.Module
    n_views: int
    chunk_size: int

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from revlit.models.base import frozen_eval

        with frozen_eval(self.classifier, self.head, self.views):
            per = ssl_loss(
                self.classifier, self.head, self.views, self.loss, x, self.n_views,
                generator=generator, reduction="none", chunk=self.chunk_size,
            )  # fmt: skip
        return per.float()


@dataclass
class BatchResult:
    """Per-example results of one batch (``rows``) and the defended images by steps taken.

    ``rows`` keys: ``index``, ``label``, ``pred``/``loss`` (no defense: prediction and
    cross-entropy), ``pred_def``/``loss_def`` (defended), ``delta_linf``/``delta_l2`` (size of
    the defense's change), ``sec_none``/``sec_def`` (compute seconds per image), with a probe
    ``ssl_before``/``ssl_after``, and the defense's extras (the reverse attack: ``ssl_steps``
    (N, steps + 1), ``selected_step`` (N,)). ``preds`` holds the prediction at every traced step.
    """

    rows: dict[str, torch.Tensor]
    images: dict[int, torch.Tensor]
    preds: dict[int, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def classify(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None):
    """Predictions (N,) and, with labels, per-example cross-entropy (N,) of images in [0, 1].

    The decision is float32 with autocast off, whatever precision the defense ran in.
    """
    with full_precision(x.device):
        logits = classifier(x.contiguous(memory_format=torch.channels_last)).float()
    ce = F.cross_entropy(logits, y, reduction="none") if y is not None else None
    return logits.argmax(1), ce


def defend_batch(
    classifier: nn.Module,
    defense: Defense,
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
    seed: int,
    probe: SSLProbe | None = None,
    trace: Sequence[int] | None = None,
) -> BatchResult:
    """Classify a batch without and with ``defense`` (bound to ``classifier``'s parts).

    Args:
        classifier: the frozen classifier, eval mode.
        defense: a bound :class:`revlit.defenses.base.Defense`.
        x: images (N, C, H, W) in [0, 1]; y: labels (N,); index: CIFAR-10 test indices (N,).
        seed: the run's seed (:mod:`revlit.seeding`).
        probe: also measure the SSL loss before/after (``None``: skip; the studies do).
        trace: also classify these intermediate iterates of an iterative defense.

    Raises:
        ValueError: NaN/inf or out-of-range images, or an empty batch.
    """
    check_images(x, "input images")
    if index.numel() == 0:
        raise ValueError("empty batch")
    first = int(index[0])
    if defense.per_image:
        gen = per_image_generators(seed, index)
    else:
        gen = batch_generator(seed, first)
    t0 = time.perf_counter()
    pred, ce = classify(classifier, x, y)
    t1 = time.perf_counter()
    ssl_before = probe(x, diagnostic_generator(seed, first)) if probe is not None else None
    t2 = time.perf_counter()
    images, extras = defense.defend(x, gen, trace)
    x_def = images[defense.steps]
    pred_def, ce_def = classify(classifier, x_def, y)
    t3 = time.perf_counter()
    preds = {k: (pred_def if k == defense.steps else classify(classifier, v)[0])
             for k, v in images.items()}  # fmt: skip
    n = len(y)
    delta = (x_def - x).reshape(n, -1).float()
    full = torch.full((n,), 1.0, dtype=torch.float64, device=x.device)
    none = defense.method == "none"
    rows = {
        **extras,
        "index": index,
        "label": y,
        "pred": pred,
        "loss": ce,
        "pred_def": pred_def,
        "loss_def": ce_def,
        "delta_linf": delta.abs().amax(1),
        "delta_l2": delta.norm(dim=1),
        "sec_none": full * ((t1 - t0) / n),
        "sec_def": full * (((t1 - t0) if none else (t3 - t2)) / n),
    }
    if probe is not None:
        rows["ssl_before"] = ssl_before
        rows["ssl_after"] = ssl_before if none else probe(x_def, diagnostic_generator(seed, first))
    return BatchResult({k: v.detach() for k, v in rows.items()}, images, preds)


def bind_defense(
    defense: Defense | None, classifier: nn.Module, head: nn.Module, head_info: dict
) -> tuple[Defense, SSLProbe, dict]:
    """Bind a defense (default: ``ReversePurifier()``) to a loaded classifier and SSL head.

    A reverse attack without its own ``loss``/``views`` gets the ones the head records
    (:func:`revlit.ssl.head_training`); a different loss than the recorded one is logged as a
    warning. Returns ``(bound defense, the SSL-loss probe, {"loss", "temperature", "view_mode"})``
    (the probe measures with the defense's loss, views, view count and chunk).
    """
    import logging

    from revlit.defenses.reverse import SETTINGS, ReversePurifier
    from revlit.losses import make_loss
    from revlit.ssl.head import head_training
    from revlit.ssl.views import SimCLRViews

    rec, said = head_training(head_info), head_training(head_info, defaults=False)
    loss, views = make_loss(rec["loss"], rec["temperature"]), SimCLRViews(mode=rec["view_mode"])
    defense = (defense if defense is not None else ReversePurifier()).bind(
        classifier, head, loss, views
    )
    loss, views = getattr(defense, "loss", loss), getattr(defense, "views", views)
    used = {"loss": getattr(loss, "name", None), "temperature": getattr(loss, "temperature", None)}
    if "loss" in said and (said["loss"], said.get("temperature", used["temperature"])) != tuple(
        used.values()
    ):
        logging.getLogger("revlit").warning(
            "the SSL head was trained with %s (T=%s) but the defense uses %s (T=%s)",
            said["loss"], said.get("temperature"), used["loss"], used["temperature"],
        )  # fmt: skip
    probe = SSLProbe(
        getattr(defense, "backbone", lambda: classifier)(), head, loss, views,
        getattr(defense, "n_views", SETTINGS["n_views"]),
        getattr(defense, "chunk_size", SETTINGS["chunk_size"]),
    )  # fmt: skip
    return defense, probe, {**used, "view_mode": getattr(views, "mode", None)}


def single_image_batches(n: int, batch_size: int, world_size: int = 1) -> list[int]:
    """Shard sizes whose last batch would hold one image (no negatives for the SSL loss), under
    Lightning's predict sampler (rank r gets r, r + W, ...) and its padded test sampler."""
    w = max(int(world_size), 1)
    counts = {len(range(r, n, w)) for r in range(w)} | {-(-n // w)}
    return sorted(c for c in counts if c % batch_size == 1)


def check_batches(n: int, batch_size: int, world_size: int = 1) -> None:
    """Refuse (ValueError, one line) ``n`` images in batches that would leave a batch of one."""
    if single_image_batches(n, batch_size, world_size):
        raise ValueError(
            f"with {n} images, batch size {batch_size} and {world_size} device(s) a batch of 1 "
            "image would occur, but the contrastive loss takes its negatives from the batch: "
            "choose another eval_batch_size or number of images"
        )
