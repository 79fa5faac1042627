"""ClassifierModule: (adversarial) training and clean/robust testing of a classifier.

Orchestration only: the network is an init argument (``class_path`` in YAML), the adversaries
come from :mod:`revlit.attacks.training`.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics

from revlit.attacks.training import fgsm_rs, pgd_linf_train
from revlit.models.base import Classifier
from revlit.models.checkpoint import load_classifier
from revlit.utils import as_float

ADVERSARIAL = ("none", "fgsm_rs", "pgd")


class ClassifierModule(pl.LightningModule):
    """Train or test a CIFAR-10 classifier, optionally adversarially (Linf).

    Args:
        net: the classifier (a :class:`revlit.models.Classifier`); ignored when ``checkpoint``
            is given.
        checkpoint: a revlit classifier checkpoint to load instead (e.g. for ``cli.py test``).
        adversarial: ``none``, ``fgsm_rs`` (Wong et al. 2020) or ``pgd`` (Madry et al. 2018).
        eps: Linf budget of adversarial training and of the robust val/test metric ("8/255" ok).
        alpha: step of the training adversary (FGSM-RS: 10/255; PGD: 2/255).
        pgd_steps: steps of the PGD training adversary.
        lr: peak learning rate of the one-cycle schedule (SGD, Nesterov momentum 0.9).
        weight_decay: L2 weight decay.
        label_smoothing: cross-entropy label smoothing.
        val_robust_n: val images on which PGD-10 accuracy is measured each epoch (0 = off).
        test_pgd_steps: if > 0, ``test`` also reports PGD accuracy with this many steps.
    """

    def __init__(
        self,
        net: Classifier | None = None,
        checkpoint: str | None = None,
        adversarial: str = "none",
        eps: float | str = "8/255",
        alpha: float | str = "10/255",
        pgd_steps: int = 7,
        lr: float = 0.2,
        weight_decay: float = 5e-4,
        label_smoothing: float = 0.0,
        val_robust_n: int = 1000,
        test_pgd_steps: int = 0,
    ) -> None:
        super().__init__()
        if adversarial not in ADVERSARIAL:
            raise ValueError(
                f"adversarial must be one of {', '.join(ADVERSARIAL)}, got '{adversarial}'"
            )
        self.save_hyperparameters(ignore=["net"])
        self.checkpoint_info: dict | None = None
        if checkpoint is not None:
            net, self.checkpoint_info = load_classifier(checkpoint)
        if net is None:
            raise ValueError("ClassifierModule needs --model.net or --model.checkpoint")
        self.net = net.to(memory_format=torch.channels_last)
        self.adversarial = adversarial
        self.eps = as_float(eps, "eps")
        self.alpha = as_float(alpha, "alpha")
        self.pgd_steps = pgd_steps
        self.lr, self.weight_decay, self.label_smoothing = lr, weight_decay, label_smoothing
        self.val_robust_n, self.test_pgd_steps = val_robust_n, test_pgd_steps
        nc = getattr(net, "num_classes", 10)
        self.train_acc = torchmetrics.Accuracy("multiclass", num_classes=nc)
        self.val_acc = torchmetrics.Accuracy("multiclass", num_classes=nc)
        self.val_acc_pgd = torchmetrics.Accuracy("multiclass", num_classes=nc)
        self.test_acc = torchmetrics.Accuracy("multiclass", num_classes=nc)
        self.test_acc_pgd = torchmetrics.Accuracy("multiclass", num_classes=nc)
        self._val_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # ----------------------------------------------------------------- fit
    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        if self.adversarial == "fgsm_rs":
            x = fgsm_rs(self.net, x, y, self.eps, self.alpha)
        elif self.adversarial == "pgd":
            x = pgd_linf_train(self.net, x, y, self.eps, self.alpha, self.pgd_steps)
        logits = self.net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_seen = 0

    def _robust_acc(self, x, y, metric, steps: int) -> None:
        with torch.enable_grad():
            xa = pgd_linf_train(self.net, x, y, self.eps, 2 / 255, steps)
        metric(self.net(xa), y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self.net(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=False, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)
        if self._val_seen < self.val_robust_n:
            k = min(len(y), self.val_robust_n - self._val_seen)
            self._robust_acc(x[:k], y[:k], self.val_acc_pgd, 10)
            self.log("val/acc_pgd", self.val_acc_pgd, prog_bar=True)
            self._val_seen += k

    def test_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self.net(x)
        self.test_acc(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test/acc", self.test_acc)
        if self.test_pgd_steps > 0:
            self._robust_acc(x, y, self.test_acc_pgd, self.test_pgd_steps)
            self.log("test/acc_pgd", self.test_acc_pgd)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.net.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        opt = torch.optim.SGD(
            [
                {"params": decay, "weight_decay": self.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.lr,
            momentum=0.9,
            nesterov=True,
        )
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.lr, total_steps=max(total, 1), pct_start=0.3, anneal_strategy="linear"
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
