"""Image grids: PNG (matplotlib, Agg) and TensorBoard, plus the attack's grid callback.

Generic helpers, reused by the defense:

- :func:`save_grid_png` ``(rows, titles, path)``: one row of images per tensor, a title per row.
- :func:`log_grid_tensorboard` ``(logger, tag, rows, step)``: the same grid as one TensorBoard image.
- :func:`perturbation_to_image`: a perturbation rescaled to be visible (0.5 = no change).

:class:`AdversarialGrid` collects the first ``n`` images a predict run sees (clean input, the
perturbation, the adversarial output) and writes ``grid.png`` next to the stored set (or into
``out_dir``) and the same grid to TensorBoard.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch

from revlit.io import atomic_path

log = logging.getLogger("revlit")


def _to_hwc(img: torch.Tensor):
    img = img.detach().float().cpu().clamp(0, 1)
    if img.dim() == 2:
        return img.numpy()
    if img.shape[0] == 1:
        return img[0].numpy()
    return img.permute(1, 2, 0).numpy()


def class_name(c: int) -> str:
    """The CIFAR-10 name of class ``c`` (its number outside 0..9)."""
    from revlit.data.cifar import CLASSES

    return CLASSES[c] if 0 <= c < len(CLASSES) else str(c)


def perturbation_to_image(delta: torch.Tensor) -> torch.Tensor:
    """Map a perturbation (N,C,H,W) to [0,1] per image: 0.5 + δ / (2·max|δ|) (0.5 where δ = 0)."""
    m = delta.detach().abs().reshape(len(delta), -1).amax(1).clamp_min(1e-12)
    return (0.5 + delta / (2 * m.view(-1, *([1] * (delta.dim() - 1))))).clamp(0, 1)


def save_grid_png(
    rows: Sequence[torch.Tensor],
    titles: Sequence[str] | None,
    path: str | os.PathLike,
    col_titles: Sequence[str] | None = None,
    scale: float = 1.2,
    captions: Sequence[Sequence[tuple[str, str]] | None] | None = None,
) -> Path:
    """Save a grid of images: ``rows[r][c]`` at row r, column c (tensors (N,C,H,W) in [0,1]).

    Rows may hold different numbers of images (missing cells stay blank). ``captions[r][c]`` =
    ``(text, colour)`` is written under cell (r, c) (``captions[r]`` = None: none on row r).
    Written to a temporary file then renamed. Returns the path.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in rows]
    if not rows:
        raise ValueError("save_grid_png needs at least one row")
    ncol = max(len(r) for r in rows)
    nrow = len(rows)
    fig, axes = plt.subplots(nrow, ncol, figsize=(scale * ncol + 1.2, scale * nrow), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(ncol):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(row):
                ax.imshow(
                    _to_hwc(row[c]),
                    interpolation="nearest",
                    cmap="gray" if row[c].shape[0] == 1 else None,
                )
            if c == 0 and titles is not None and r < len(titles):
                ax.set_ylabel(titles[r], fontsize=8)
            if r == 0 and col_titles is not None and c < len(col_titles):
                ax.set_title(col_titles[c], fontsize=7)
            cap = captions[r] if captions is not None and r < len(captions) else None
            if cap is not None and c < len(cap):
                ax.set_xlabel(cap[c][0], fontsize=7, color=cap[c][1], labelpad=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)


def grid_tensor(rows: Sequence[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """The rows as one (3, H', W') image tensor (torchvision's make_grid, one grid row per row)."""
    from torchvision.utils import make_grid

    ncol = max(len(r) for r in rows)
    cells = []
    for r in rows:
        r = r.detach().float().cpu().clamp(0, 1)
        if r.shape[1] == 1:
            r = r.expand(-1, 3, -1, -1)
        if len(r) < ncol:
            r = torch.cat([r, torch.ones(ncol - len(r), *r.shape[1:])])
        cells.append(r)
    return make_grid(torch.cat(cells), nrow=ncol, padding=pad, pad_value=1.0)


def log_grid_tensorboard(logger, tag: str, rows: Sequence[torch.Tensor], step: int = 0) -> bool:
    """Log the grid as an image to a TensorBoard logger (or SummaryWriter); False if it cannot."""
    exp = getattr(logger, "experiment", logger)
    if exp is None or not hasattr(exp, "add_image"):
        return False
    exp.add_image(tag, grid_tensor(rows), global_step=step)
    if hasattr(exp, "flush"):
        exp.flush()
    return True


class AdversarialGrid(pl.Callback):
    """Clean / perturbation / adversarial grid of the first ``n`` images of a predict run.

    Reads ``batch[0]`` (clean images) and ``outputs["image"]`` (adversarial images) on rank 0;
    columns are captioned ``label`` or ``label→adversarial prediction`` when the outputs hold
    ``label`` and ``adv_pred``.
    The PNG goes to ``out_dir`` if given, else next to the stored set of an
    :class:`revlit.callbacks.adv_writer.AdvSetWriter` in the trainer's callbacks
    (``<set>/grid.png``); the same grid is logged to TensorBoard under ``attack/<set name>``.

    Args:
        n: number of images (columns).
        out_dir: folder of the PNG (optional).
        filename: name of the PNG.
    """

    def __init__(self, n: int = 8, out_dir: str | None = None, filename: str = "grid.png") -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.out_dir, self.filename = n, out_dir, filename
        self.clean: list[torch.Tensor] = []
        self.adv: list[torch.Tensor] = []
        self.captions: list[str] = []
        self.path: Path | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        self.clean, self.adv, self.captions = [], [], []

    def _have(self) -> int:
        return sum(len(c) for c in self.clean)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.is_global_zero or self._have() >= self.n or not isinstance(outputs, dict):
            return
        if "image" not in outputs:
            return
        k = self.n - self._have()
        self.clean.append(batch[0][:k].detach().float().cpu())
        self.adv.append(outputs["image"][:k].detach().float().cpu())
        if "label" in outputs and "adv_pred" in outputs:
            for lab, pred in zip(outputs["label"][:k].tolist(), outputs["adv_pred"][:k].tolist()):
                self.captions.append(
                    class_name(lab) if lab == pred else f"{class_name(lab)}→{class_name(pred)}"
                )

    def _folder_and_name(self, trainer, pl_module) -> tuple[Path, str]:
        from revlit.callbacks.adv_writer import AdvSetWriter

        for cb in trainer.callbacks:
            if isinstance(cb, AdvSetWriter) and cb.folder is not None:
                return (Path(self.out_dir) if self.out_dir else cb.folder), cb.folder.name
        name = getattr(pl_module, "set_name", None) or "predict"
        return Path(self.out_dir or trainer.log_dir or "."), name

    def on_predict_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.clean:
            return
        clean, adv = torch.cat(self.clean), torch.cat(self.adv)
        rows = [clean, perturbation_to_image(adv - clean), adv]
        folder, name = self._folder_and_name(trainer, pl_module)
        norm = getattr(pl_module, "norm", None)
        eps = getattr(pl_module, "eps", None)
        label = f"{str(norm)} ε={eps:.4g}" if norm is not None and eps is not None else ""
        titles = ["clean", f"δ (rescaled) {label}".strip(), "adversarial"]
        cols = self.captions if len(self.captions) == len(clean) else None
        self.path = save_grid_png(rows, titles, folder / self.filename, col_titles=cols)
        log.info("wrote %s", self.path)
        try:
            log_grid_tensorboard(trainer.logger, f"attack/{name}", rows, step=0)
        except Exception as e:  # never fail a run over a picture
            log.warning("could not log the grid to TensorBoard: %s", e)
