"""SSLHeadModule: train the self-supervised head of Mao et al. (ICCV 2021) on a frozen classifier.

Orchestration only: head, loss and views are init arguments (``class_path`` in YAML), the algorithm
is :func:`revlit.ssl.ssl_loss`, export and the clean-vs-adversarial loss are callbacks the module
adds to the trainer. The classifier is frozen and kept in EVAL mode for the whole fit (``train`` is
overridden), so its weights and BatchNorm statistics are those of the checkpoint the exported head
is tied to (by sha256).
"""

from __future__ import annotations

import logging
import math
import time

import pytorch_lightning as pl
import torch

from revlit.callbacks.export import ExportHead
from revlit.callbacks.ssl_adv import AdvSSLLoss
from revlit.losses import ContrastiveLoss
from revlit.models.checkpoint import load_classifier
from revlit.ssl import SimCLRViews, SSLHead, ssl_loss

log = logging.getLogger("revlit")


class SSLHeadModule(pl.LightningModule):
    """Fit an :class:`SSLHead` with a contrastive loss on views of clean training images.

    Args:
        classifier: a revlit classifier checkpoint, a user module (``{class_path, init_args,
            weights}``) or ``robustbench:<name>`` (:func:`revlit.models.load_classifier`).
        head, loss, views: default ``SSLHead(classifier.feature_dim)`` (256 hidden, 16 out),
            ``ContrastiveLoss()`` (NT-Xent, t = 0.2), ``SimCLRViews()`` (the authors').
        n_views: views per image during training and validation (authors: 2).
        lr, weight_decay: Adam's (authors: lr 1e-4).
        export_path: head checkpoint written whenever the mean val loss improves
            (:class:`~revlit.callbacks.export.ExportHead`); ``None`` = no export.
        adv_set, adv_k, adv_batch_size, pgd_root, allow_mismatch: log the SSL loss of the first
            ``adv_k`` images of a stored adversarial set beside that of the same clean images
            (:class:`~revlit.callbacks.ssl_adv.AdvSSLLoss`); ``adv_set=None`` = not logged.
        views_seed: seed of the training views (offset by the rank) and of the validation views
            (identical every epoch, so val losses are comparable between epochs).
        chunk: run the backbone over chunks of at most this many views.

    Logged: ``train/loss``, ``train/epoch_seconds``, ``val/loss``, ``val/chance`` (``ln(B*V - 1)``,
    the loss of an uninformative embedding for a val batch of B images and V views).
    """

    def __init__(
        self,
        classifier: str | dict,
        head: SSLHead | None = None,
        loss: ContrastiveLoss | None = None,
        views: SimCLRViews | None = None,
        n_views: int = 2,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        export_path: str | None = None,
        adv_set: str | None = None,
        adv_k: int = 512,
        adv_batch_size: int = 256,
        pgd_root: str = "data/pgd",
        allow_mismatch: bool = False,
        views_seed: int = 0,
        chunk: int | None = 512,
    ) -> None:
        super().__init__()
        if n_views < 2:
            raise ValueError(f"n_views must be >= 2, got {n_views}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.save_hyperparameters(ignore=["head", "loss", "views"])
        self.side = [ExportHead(export_path)] if export_path else []
        if adv_set is not None:
            self.side.append(AdvSSLLoss(adv_set, adv_k, adv_batch_size, pgd_root, allow_mismatch))
        net, self.classifier_info = load_classifier(classifier)
        self.classifier = net.requires_grad_(False).to(memory_format=torch.channels_last).eval()
        feature_dim = int(self.classifier.feature_dim)
        self.head = head if head is not None else SSLHead(feature_dim)
        if getattr(self.head, "in_dim", feature_dim) != feature_dim:
            raise ValueError(
                f"head in_dim {self.head.in_dim} does not match the classifier's feature_dim "
                f"{feature_dim}"
            )
        self.loss = loss if loss is not None else ContrastiveLoss()
        if getattr(self.loss, "name", None) == "alignment":
            log.warning(
                "training a head with the negative-free alignment loss alone collapses "
                "(a constant embedding has loss 0); use nt_xent or nt_xent_multi"
            )
        self.views = views if views is not None else SimCLRViews()
        self.n_views, self.lr, self.weight_decay = n_views, lr, weight_decay
        self.views_seed, self.chunk = views_seed, chunk
        self._train_gen = torch.Generator().manual_seed(views_seed)
        self._val_gen = torch.Generator()
        self.val_batch: int | None = None  # size of the first val batch (for val/chance)
        self.val_chance: float | None = None

    def train(self, mode: bool = True):
        """Lightning calls ``model.train()``: only the head may switch; the classifier stays eval."""
        super().train(mode)
        self.classifier.eval()
        return self

    def configure_callbacks(self):
        return self.side

    def on_fit_start(self) -> None:
        self._train_gen.manual_seed(self.views_seed + 1_000_003 * self.global_rank)

    def on_train_epoch_start(self) -> None:
        self.classifier.eval()
        self._epoch_t0 = time.time()

    def on_train_epoch_end(self) -> None:
        self.log("train/epoch_seconds", time.time() - self._epoch_t0)

    def _loss(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        parts = (self.classifier, self.head, self.views, self.loss)
        return ssl_loss(*parts, x, self.n_views, gen, "mean", self.chunk)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        if x.shape[0] < 2:  # a last batch of one image has no negatives
            return None
        loss = self._loss(x, self._train_gen)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_gen.manual_seed(self.views_seed + 7919)

    def validation_step(self, batch, batch_idx):
        x = batch[0]
        if x.shape[0] < 2:
            return None
        self.val_batch = self.val_batch or int(x.shape[0])
        loss = self._loss(x, self._val_gen)
        self.log("val/loss", loss, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking and self.val_batch:
            self.val_chance = math.log(self.val_batch * self.n_views - 1)
            self.log("val/chance", self.val_chance)

    def configure_optimizers(self):
        return torch.optim.Adam(self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
