"""Pictures of the defense: an input / reverse vector / repaired grid and SSL-loss histograms.

Per evaluated split (Mao et al., ICCV 2021, show both kinds of figure):

- ``defense_grid.png``: one column per image, titled with its true label; rows = the input (e.g.
  attacked) images with the classifier's prediction, the reverse vector δ_r rescaled to be visible
  (0.5 grey = no change, per image ``0.5 + δ / (2 max|δ|)``), the repaired images with the
  prediction after the defense; a prediction is green when right, red when wrong;
- ``ssl_hist.png``: histograms of the per-image SSL loss before and after the defense;
- the same grid and both histograms in TensorBoard (``add_image`` / ``add_histogram``) under
  ``defense/<split>/<method>``.

The images come from the first batch of rank 0 (``DefenseModule.viz``); the histogram from the
merged predictions of a :class:`revlit.callbacks.defense_writer.DefenseWriter` when one is in the
trainer (predict), else from every rank's values gathered at the end of the epoch (test).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch

from revlit.callbacks.visualize import (
    class_name,
    log_grid_tensorboard,
    perturbation_to_image,
    save_grid_png,
)
from revlit.io import atomic_path

log = logging.getLogger("revlit")


def save_ssl_histogram(
    before: torch.Tensor,
    after: torch.Tensor,
    path: str | os.PathLike,
    title: str = "",
    bins: int = 40,
) -> Path:
    """Overlaid histograms of per-image SSL losses before and after the defense (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    b = before.detach().double().cpu().reshape(-1).numpy()
    a = after.detach().double().cpu().reshape(-1).numpy()
    lo, hi = float(min(b.min(), a.min())), float(max(b.max(), a.max()))
    if hi <= lo:
        hi = lo + 1e-6
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(b, bins=bins, range=(lo, hi), alpha=0.55, label=f"before (mean {b.mean():.3f})")
    ax.hist(a, bins=bins, range=(lo, hi), alpha=0.55, label=f"after (mean {a.mean():.3f})")
    ax.set_xlabel("per-image SSL loss")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)


RIGHT, WRONG = "#1a7f37", "#cf222e"


def defense_rows(x: torch.Tensor, x_def: torch.Tensor) -> tuple[list[torch.Tensor], list[str]]:
    """Grid rows (input, visible reverse vector, repaired) and their titles."""
    return [x, perturbation_to_image(x_def - x), x_def], ["input", "δ (rescaled)", "defended"]


def prediction_captions(
    label: torch.Tensor, pred: torch.Tensor, pred_def: torch.Tensor
) -> tuple[list[str], list[list[tuple[str, str]] | None]]:
    """Column titles (true label) and per-row captions (prediction before / after, green when
    right, red when wrong) for the rows of :func:`defense_rows`."""

    def row(p: torch.Tensor) -> list[tuple[str, str]]:
        return [
            (f"pred {class_name(int(q))}", RIGHT if int(q) == int(t) else WRONG)
            for q, t in zip(p, label)
        ]

    titles = [f"true {class_name(int(t))}" for t in label]
    return titles, [row(pred), None, row(pred_def)]


class DefenseViz(pl.Callback):
    """Write the defense grid and the SSL-loss histograms of a predict or test run (rank 0).

    Args:
        out_dir: folder of the PNGs; default: the DefenseWriter's output folder, else the
            logger's log_dir, else ``results/defense``.
        bins: histogram bins.
    """

    def __init__(self, out_dir: str | None = None, bins: int = 40) -> None:
        self.out_dir, self.bins = out_dir, bins
        self.paths: list[Path] = []

    def _out_dir(self, trainer) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        for cb in trainer.callbacks:
            if hasattr(cb, "output_dir") and hasattr(cb, "records"):
                return Path(cb.output_dir)
        log_dir = getattr(trainer, "log_dir", None)
        return Path(log_dir) if log_dir else Path("results/defense")

    @staticmethod
    def _split(trainer) -> str:
        dm = getattr(trainer, "datamodule", None)
        return Path(str(getattr(dm, "eval_set", "data"))).name

    def _write(self, trainer, pl_module, before, after) -> None:
        out = self._out_dir(trainer)
        split = self._split(trainer)
        method = getattr(getattr(pl_module, "defense", None), "method", "defense")
        tag = f"defense/{split}/{method}"
        exp = getattr(trainer.logger, "experiment", None) if trainer.logger else None
        viz = getattr(pl_module, "viz", None)
        if viz is not None and method != "none":
            rows, titles = defense_rows(viz["x"], viz["x_def"])
            cols, caps = (None, None)
            if all(k in viz for k in ("label", "pred", "pred_def")):
                cols, caps = prediction_captions(viz["label"], viz["pred"], viz["pred_def"])
            png = out / "defense_grid.png"
            self.paths.append(save_grid_png(rows, titles, png, col_titles=cols, captions=caps))
            if trainer.logger is not None:
                log_grid_tensorboard(trainer.logger, f"{tag}/grid", rows, step=0)
        if before is not None and before.numel() > 0:
            title = f"{split}: SSL loss before / after {method}"
            self.paths.append(
                save_ssl_histogram(before, after, out / "ssl_hist.png", title, self.bins)
            )
            if exp is not None and hasattr(exp, "add_histogram"):
                exp.add_histogram(f"{tag}/ssl_before", before.float(), 0)
                exp.add_histogram(f"{tag}/ssl_after", after.float(), 0)
                if hasattr(exp, "flush"):
                    exp.flush()

    @staticmethod
    def _local(pl_module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        seen = getattr(pl_module, "ssl_seen", None) or []
        if not seen:
            return None, None
        return torch.cat([b for b, _ in seen]), torch.cat([a for _, a in seen])

    def on_predict_start(self, trainer, pl_module) -> None:
        self.paths = []

    def on_predict_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        merged = None
        for cb in trainer.callbacks:
            if getattr(cb, "merged", None) is not None and "ssl_before" in cb.merged:
                merged = cb.merged
        if merged is not None:
            before, after = merged["ssl_before"], merged["ssl_after"]
        else:
            before, after = self._local(pl_module)
        self._write(trainer, pl_module, before, after)

    def on_test_start(self, trainer, pl_module) -> None:
        self.paths = []

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        before, after = self._local(pl_module)
        if before is None:
            return
        if trainer.world_size > 1:  # collective: every rank takes part (shards are equal-sized)
            before = pl_module.all_gather(before.to(pl_module.device)).reshape(-1).cpu()
            after = pl_module.all_gather(after.to(pl_module.device)).reshape(-1).cpu()
        if trainer.is_global_zero:
            self._write(trainer, pl_module, before, after)
