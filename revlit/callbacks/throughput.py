"""Images per second in Lightning's progress bar (predict, test, validate).

The cost of the defense is per image, so the bar shows ``img/s`` (this rank's images since the
stage started) next to Lightning's own batches per second.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl


class ImagesPerSecond(pl.Callback):
    """Adds ``img/s`` to the progress bar of predict, test and validation runs."""

    def __init__(self) -> None:
        self.images, self.t0 = 0, None

    def rate(self) -> float:
        """Images per second since the stage started (0 before the first batch)."""
        if self.t0 is None or self.images == 0:
            return 0.0
        return self.images / max(time.perf_counter() - self.t0, 1e-9)

    def _start(self, *_) -> None:
        self.images, self.t0 = 0, time.perf_counter()

    def _batch_end(self, stage: str, trainer, batch) -> None:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.images += len(x) if hasattr(x, "__len__") else 0
        bar = getattr(trainer, "progress_bar_callback", None)
        try:
            pbar = getattr(bar, f"{stage}_progress_bar", None) if bar is not None else None
        except (AttributeError, TypeError):  # a bar that is not tqdm, or not started
            pbar = None
        if pbar is not None and hasattr(pbar, "set_postfix"):
            pbar.set_postfix({"img/s": f"{self.rate():.1f}"}, refresh=False)

    on_predict_start = on_test_start = on_validation_start = _start

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0):
        self._batch_end("predict", trainer, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0):
        self._batch_end("test", trainer, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0):
        self._batch_end("val", trainer, batch)
