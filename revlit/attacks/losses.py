"""Per-example attack losses (higher = more adversarial), framework-free.

- ``ce``: cross-entropy of the true label.
- ``cw``: Carlini-Wagner margin, max_{j≠y} z_j − z_y (> 0 exactly when misclassified).
- ``dlr``: Difference of Logits Ratio (Croce & Hein, ICML 2020, used by APGD):
  −(z_y − max_{j≠y} z_j) / (z_π1 − z_π3 + 1e-12), with z_π the logits sorted in decreasing order;
  invariant to shifting and rescaling the logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example, (N,)."""
    return F.cross_entropy(logits, y, reduction="none")


def _true_and_best_other(
    logits: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf"))
    return z_y, other.amax(1)


def cw_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin per example: max_{j≠y} z_j − z_y, (N,)."""
    z_y, z_o = _true_and_best_other(logits, y)
    return z_o - z_y


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DLR loss of Croce & Hein (2020) per example, (N,). Needs at least 3 classes."""
    if logits.shape[1] < 3:
        raise ValueError("the DLR loss needs at least 3 classes")
    z_y, z_o = _true_and_best_other(logits, y)
    top = logits.sort(dim=1, descending=True).values
    return (z_o - z_y) / (top[:, 0] - top[:, 2] + 1e-12)


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "cw": cw_loss, "dlr": dlr_loss}


def get_loss(name: str | LossFn) -> LossFn:
    """A loss by name (``ce``, ``cw``, ``dlr``) or a callable passed through.

    Raises:
        ValueError: one line naming the unknown loss and the known ones.
    """
    if callable(name):
        return name
    key = str(name).strip().lower()
    if key not in LOSSES:
        raise ValueError(f"unknown attack loss '{name}'; use one of {', '.join(LOSSES)}")
    return LOSSES[key]
