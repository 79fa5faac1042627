"""Export the best network of a fit: the classifier (ExportClassifier) or the SSL head (ExportHead)."""

from __future__ import annotations

import json
import logging
import time

import pytorch_lightning as pl

from revlit.io import git_commit
from revlit.models.checkpoint import save_classifier
from revlit.ssl import save_head

log = logging.getLogger("revlit")


class ExportBest(pl.Callback):
    """After each validation (not the sanity check), on global rank zero, if ``monitor`` improved,
    write ``path`` with :meth:`save`.

    Args:
        path: output file.
        monitor: logged metric to select on.
        mode: ``max`` or ``min``.
    """

    def __init__(self, path: str, monitor: str, mode: str) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be max or min, got '{mode}'")
        self.path, self.monitor, self.mode = path, monitor, mode
        self.best: float | None = None
        self.t0 = time.time()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.t0 = time.time()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        better = self.best is None or (
            value > self.best if self.mode == "max" else value < self.best
        )
        if not better:
            return
        self.best = value
        sha = self.save(trainer, pl_module, value)
        log.info("exported %s (%s=%.4f, sha256 %s)", self.path, self.monitor, value, sha[:12])

    def save(self, trainer, pl_module, value: float) -> str:
        """Write ``self.path``; return the file's sha256."""
        raise NotImplementedError


class ExportClassifier(ExportBest):
    """Export ``pl_module.net`` as a weights-only revlit classifier checkpoint.

    Args:
        path: output file (e.g. ``checkpoints/resnet20_at.pt``).
        monitor: logged metric to select on (e.g. ``val/acc_pgd`` for robust training).
        mode: ``max`` or ``min``.
    """

    def __init__(self, path: str, monitor: str = "val/acc", mode: str = "max") -> None:
        super().__init__(path, monitor, mode)

    def save(self, trainer, pl_module, value: float) -> str:
        metrics = {k: round(float(v), 5) for k, v in trainer.callback_metrics.items() if "/" in k}
        meta = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "monitor": self.monitor,
            "metrics": json.dumps(metrics, sort_keys=True),
            "train_seconds": round(time.time() - self.t0, 1),
            "commit": git_commit(),
            "hparams": json.dumps(dict(pl_module.hparams), sort_keys=True, default=str),
        }
        return save_classifier(pl_module.net, self.path, meta=meta)


class ExportHead(ExportBest):
    """Export the SSL head of :class:`revlit.modules.ssl_head.SSLHeadModule`, tied to the sha256
    of its classifier (:func:`revlit.ssl.save_head`), with its training settings in ``meta``.

    Args:
        path: output file (e.g. ``checkpoints/resnet20_at_head.pt``).
        monitor: logged metric to select on (the mean validation SSL loss).
        mode: ``max`` or ``min``.
    """

    def __init__(self, path: str, monitor: str = "val/loss", mode: str = "min") -> None:
        super().__init__(path, monitor, mode)

    def save(self, trainer, pl_module, value: float) -> str:
        m = pl_module
        meta = {
            "stage": "ssl_head",
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "val_loss": value,
            "val_chance": m.val_chance,
            "val_batch": m.val_batch,
            "loss": getattr(m.loss, "name", type(m.loss).__name__),
            "temperature": getattr(m.loss, "temperature", None),
            "n_views": m.n_views,
            "views": repr(m.views),
            "lr": m.lr,
            "batch_size": getattr(getattr(trainer, "datamodule", None), "batch_size", None),
            "classifier_path": m.classifier_info["path"],
            "commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return save_head(m.head, self.path, m.classifier_info["sha256"], meta)
