"""ExportClassifier: write the best classifier as a weights-only revlit checkpoint during fit."""

from __future__ import annotations

import json
import logging
import time

import pytorch_lightning as pl

from revlit.io import git_commit
from revlit.models.checkpoint import save_classifier

log = logging.getLogger("revlit")


class ExportClassifier(pl.Callback):
    """After each validation, export ``pl_module.net`` if ``monitor`` improved.

    Args:
        path: output file (e.g. ``checkpoints/resnet20_at.pt``).
        monitor: logged metric to select on (e.g. ``val/acc_pgd`` for robust training).
        mode: ``max`` or ``min``.
    """

    def __init__(self, path: str, monitor: str = "val/acc", mode: str = "max") -> None:
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
        sha = save_classifier(pl_module.net, self.path, meta=meta)
        log.info("exported %s (%s=%.4f, sha256 %s)", self.path, self.monitor, value, sha[:12])
