"""SSLHeadModule: train the self-supervised head of Mao et al. (ICCV 2021) on a frozen classifier.

Orchestration only: the head, the loss and the views are init arguments (``class_path`` in YAML);
the algorithm is :func:`revlit.ssl.ssl_loss`. The classifier is loaded by
:func:`revlit.models.load_classifier` (a revlit checkpoint, a user module or a RobustBench model),
frozen (``requires_grad=False``) and kept in EVAL mode for the whole fit -- Lightning's
``model.train()`` cannot flip it (``train`` is overridden) -- so its weights and BatchNorm
statistics are exactly those of the checkpoint the head is tied to (by sha256) when it is exported.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from revlit.losses import ContrastiveLoss
from revlit.models.checkpoint import load_classifier
from revlit.ssl import SimCLRViews, SSLHead, save_head, ssl_loss

log = logging.getLogger("revlit")


class SSLHeadModule(pl.LightningModule):
    """Fit an :class:`SSLHead` with a contrastive loss on views of clean training images.

    Args:
        classifier: a revlit classifier checkpoint, a user module (``{class_path, init_args,
            weights}``) or ``robustbench:<name>`` (:func:`revlit.models.load_classifier`);
            frozen, eval mode throughout.
        head: the head; default ``SSLHead(classifier.feature_dim)`` (256 hidden, 16 out), the
            feature size read from the loaded classifier.
        loss: the SSL loss; default ``ContrastiveLoss("nt_xent", temperature=0.2)`` (authors').
        views: the view generator; default ``SimCLRViews()`` (authors' views, ``shared`` mode).
        n_views: views per image during training and validation (authors: 2).
        lr: Adam learning rate (authors: 1e-4).
        weight_decay: Adam weight decay.
        export_path: head checkpoint written (with the classifier's sha256) at the end of every
            validation epoch whose mean val loss improved; ``None`` = no export.
        adv_set: a stored adversarial set (name under ``pgd_root`` or a path). At each validation
            end the mean SSL loss of its first ``adv_k`` images is logged next to the loss of the
            same clean test images, with the same batches and the same view seeds
            (``val/ssl_clean``, ``val/ssl_adv``, ``val/ssl_adv_minus_clean``).
        adv_k: number of images of ``adv_set`` to evaluate.
        adv_batch_size: batch size of that evaluation (the contrastive negatives come from it).
        pgd_root: where stored sets live.
        allow_mismatch: use an ``adv_set`` made against another classifier.
        views_seed: seed of the training views (offset by the rank) and of the validation views
            (identical every epoch, so val losses are comparable between epochs).
        chunk: run the backbone over chunks of at most this many views (CPU page-fault guard).

    Logged: ``train/loss``, ``val/loss``, ``val/chance`` (``ln(B*V - 1)``, the loss of an
    uninformative embedding for a val batch of B images and V views) and the adv_set metrics.
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
        if adv_k < 2 or adv_batch_size < 2:
            raise ValueError(
                "adv_k and adv_batch_size must be >= 2 (negatives come from the batch)"
            )
        self.save_hyperparameters(ignore=["head", "loss", "views"])
        net, self.classifier_info = load_classifier(classifier)
        net.requires_grad_(False)
        self.classifier = net.to(memory_format=torch.channels_last).eval()
        self.classifier_sha256: str = self.classifier_info["sha256"]
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
        self.export_path, self.adv_set, self.adv_k = export_path, adv_set, adv_k
        self.adv_batch_size, self.pgd_root, self.allow_mismatch = (
            adv_batch_size,
            pgd_root,
            allow_mismatch,
        )
        self.views_seed, self.chunk = views_seed, chunk
        self._train_gen = torch.Generator().manual_seed(views_seed)
        self._val_gen = torch.Generator()
        self._val_sum = 0.0
        self._val_n = 0
        self._val_batch: int | None = None
        self.best_val: float | None = None
        self._adv: tuple[torch.Tensor, torch.Tensor] | None = None
        self._epoch_t0 = time.time()

    # ---------------------------------------------------------------- frozen classifier
    def train(self, mode: bool = True):
        """Lightning calls ``model.train()``: only the head may switch; the classifier stays eval."""
        super().train(mode)
        self.classifier.eval()
        return self

    def on_train_epoch_start(self) -> None:
        self.classifier.eval()
        self._epoch_t0 = time.time()

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.classifier.training:  # pragma: no cover - guarded by train(); belt and braces
            self.classifier.eval()

    def on_train_epoch_end(self) -> None:
        self.log("train/epoch_seconds", time.time() - self._epoch_t0)

    # ---------------------------------------------------------------- setup
    def on_fit_start(self) -> None:
        self._train_gen.manual_seed(self.views_seed + 1_000_003 * self.global_rank)
        if self.adv_set is not None and self._adv is None:
            self._adv = self._load_adv()

    def _load_adv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, adversarial) float images of the first ``adv_k`` images of ``adv_set``."""
        from revlit.data.cifar import default_data_dir, load_cifar10
        from revlit.data.stored import load_stored_set

        p = Path(self.adv_set)
        folder = p if p.exists() else Path(self.pgd_root) / self.adv_set
        st = load_stored_set(folder)
        made_for = st.meta.get("classifier_sha256")
        if made_for is not None and made_for != self.classifier_sha256:
            msg = (
                f"stored set '{self.adv_set}' was made against classifier {made_for[:12]}, "
                f"not {self.classifier_sha256[:12]}"
            )
            if not self.allow_mismatch:
                raise ValueError(
                    msg + "; pass --model.init_args.allow_mismatch true to use it anyway"
                )
            log.warning("%s (allowed by allow_mismatch)", msg)
        k = min(self.adv_k, len(st))
        adv = st.images[:k].float()
        idx = st.indices[:k].long()
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_dir = getattr(dm, "data_dir", None) or default_data_dir()
        x_test, _ = load_cifar10(data_dir, train=False)
        clean = x_test[idx].float().div_(255.0)
        return clean, adv

    # ---------------------------------------------------------------- steps
    def _loss(self, x: torch.Tensor, gen: torch.Generator, reduction: str = "mean") -> torch.Tensor:
        return ssl_loss(
            self.classifier,
            self.head,
            self.views,
            self.loss,
            x,
            self.n_views,
            gen,
            reduction,
            self.chunk,
        )

    def training_step(self, batch, batch_idx):
        x = batch[0]
        if x.shape[0] < 2:  # a last batch of one image has no negatives
            return None
        loss = self._loss(x, self._train_gen)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_gen.manual_seed(self.views_seed + 7919)
        self._val_sum, self._val_n = 0.0, 0

    def validation_step(self, batch, batch_idx):
        x = batch[0]
        if x.shape[0] < 2:
            return None
        if self._val_batch is None:
            self._val_batch = int(x.shape[0])
        loss = self._loss(x, self._val_gen)
        self._val_sum += float(loss) * x.shape[0]
        self._val_n += int(x.shape[0])
        self.log("val/loss", loss, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        return loss

    @torch.no_grad()
    def adv_losses(self) -> tuple[float, float]:
        """Mean SSL loss of the first ``adv_k`` clean test images and of their attacked versions.

        Same batches and the same view seed for both, so the difference is due to the attack.
        """
        if self._adv is None:
            self._adv = self._load_adv()
        clean, adv = self._adv
        totals = []
        for xs in (clean, adv):
            gen = torch.Generator()
            s, n = 0.0, 0
            for j, xb in enumerate(xs.split(self.adv_batch_size)):
                if len(xb) < 2:
                    continue
                gen.manual_seed(self.views_seed + 104729 + j)
                xb = xb.to(self.device).contiguous(memory_format=torch.channels_last)
                s += float(self._loss(xb, gen)) * len(xb)
                n += len(xb)
            totals.append(s / max(n, 1))
        return totals[0], totals[1]

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        stats = torch.tensor(
            [self._val_sum, float(self._val_n)], dtype=torch.float64, device=self.device
        )
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        if stats[1] <= 0:
            return
        val = float(stats[0] / stats[1])
        chance = math.log(self._val_batch * self.n_views - 1) if self._val_batch else float("nan")
        self.log("val/chance", chance)
        if self.adv_set is not None:
            c, a = self.adv_losses()
            self.log_dict({"val/ssl_clean": c, "val/ssl_adv": a, "val/ssl_adv_minus_clean": a - c})
        improved = self.best_val is None or val < self.best_val
        if improved:
            self.best_val = val
        if improved and self.export_path and self.trainer.is_global_zero:
            self._export(val, chance)

    def _export(self, val: float, chance: float) -> None:
        from revlit.io import git_commit

        dm = getattr(self.trainer, "datamodule", None)
        meta = {
            "stage": "ssl_head",
            "epoch": int(self.current_epoch),
            "global_step": int(self.global_step),
            "val_loss": val,
            "val_chance": chance,
            "val_batch": self._val_batch,
            "loss": getattr(self.loss, "name", type(self.loss).__name__),
            "temperature": getattr(self.loss, "temperature", None),
            "n_views": self.n_views,
            "views": repr(self.views),
            "lr": self.lr,
            "batch_size": getattr(dm, "batch_size", None),
            "classifier_path": self.classifier_info["path"],
            "commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        sha = save_head(self.head, self.export_path, self.classifier_sha256, meta)
        log.info(
            "exported SSL head to %s (val loss %.4f, sha256 %s)", self.export_path, val, sha[:12]
        )

    def configure_optimizers(self):
        return torch.optim.Adam(self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
