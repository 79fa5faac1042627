"""AdvSSLLoss: the SSL loss of clean test images beside that of their attacked versions, per epoch."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch

from revlit.ssl import mean_ssl_loss

log = logging.getLogger("revlit")

#: offset of the comparison's view seeds from the module's ``views_seed``
ADV_SEED_OFFSET = 104729


class AdvSSLLoss(pl.Callback):
    """Log ``val/ssl_clean``, ``val/ssl_adv`` and ``val/ssl_adv_minus_clean`` at each validation end.

    Mao et al. (ICCV 2021) reverse attacks because an attack raises the self-supervised loss: this
    measures that gap for the head being trained, as the mean SSL loss of the first ``k`` images of
    a stored adversarial set and of the same clean test images (float [0, 1] NCHW), in the same
    batches with the same view seeds (``views_seed + ADV_SEED_OFFSET + batch``), head and
    classifier in eval mode (:func:`revlit.ssl.mean_ssl_loss`).

    Args:
        adv_set: a stored set: a name under ``pgd_root`` or a path.
        k: number of images of the set to evaluate.
        batch_size: batch size of the evaluation (the contrastive negatives come from it).
        pgd_root: where stored sets live.
        allow_mismatch: use a set made against another classifier (with a warning).
    """

    def __init__(
        self,
        adv_set: str,
        k: int = 512,
        batch_size: int = 256,
        pgd_root: str = "data/pgd",
        allow_mismatch: bool = False,
    ) -> None:
        if k < 2 or batch_size < 2:
            raise ValueError(
                "adv_k and adv_batch_size must be >= 2 (negatives come from the batch)"
            )
        self.adv_set, self.k, self.batch_size = adv_set, k, batch_size
        self.pgd_root, self.allow_mismatch = pgd_root, allow_mismatch
        self.images: tuple[torch.Tensor, torch.Tensor] | None = None  # (clean, adversarial)

    def load(self, classifier_info: dict, data_dir: str | None = None) -> None:
        """Read the set and the clean test images at its indices; refuse another classifier's set."""
        from revlit.studies.common import load_splits

        p = Path(self.adv_set)
        folder = str(p if p.exists() else Path(self.pgd_root) / self.adv_set)
        splits = load_splits(
            ["clean", folder], self.k, classifier_info, data_dir=data_dir, allow_mismatch=True
        )
        made_for, sha = splits[folder].meta.get("classifier_sha256"), classifier_info["sha256"]
        if made_for is not None and made_for != sha:
            msg = (
                f"stored set '{self.adv_set}' was made against classifier {made_for[:12]}, "
                f"not {sha[:12]}"
            )
            if not self.allow_mismatch:
                raise ValueError(
                    msg + "; pass --model.init_args.allow_mismatch true to use it anyway"
                )
            log.warning("%s (allowed by allow_mismatch)", msg)
        self.images = (splits["clean"].x, splits[folder].x)

    def losses(self, pl_module) -> tuple[float, float]:
        """Mean SSL loss of the clean images and of their attacked versions."""
        m = pl_module
        if self.images is None:
            self.load(m.classifier_info)
        parts = (m.classifier, m.head, m.views, m.loss)
        seed = m.views_seed + ADV_SEED_OFFSET
        clean, adv = (
            mean_ssl_loss(*parts, x, m.n_views, self.batch_size, seed, m.chunk, m.device)
            for x in self.images
        )
        return clean, adv

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.images is None:
            self.load(pl_module.classifier_info, getattr(trainer.datamodule, "data_dir", None))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        c, a = self.losses(pl_module)
        pl_module.log_dict({"val/ssl_clean": c, "val/ssl_adv": a, "val/ssl_adv_minus_clean": a - c})
