"""Threat models: one ``Norm`` enum for Linf / L2 / L1 used everywhere in revlit.

Each norm has a steepest-ascent step and a projection onto (ε-ball ∩ [0,1] box).
Images are [0,1] floats, NCHW; perturbations have the same shape.
"""

from __future__ import annotations

from enum import Enum

import torch


class Norm(str, Enum):
    """The threat models of revlit; values are the seed's spellings (``--norm l_inf``)."""

    LINF = "l_inf"
    L2 = "l_2"
    L1 = "l_1"

    @classmethod
    def parse(cls, value: str | Norm) -> Norm:
        """Accept ``l_inf``/``linf``/``Linf``/``inf``, ``l_2``/``l2``, ``l_1``/``l1``.

        Raises:
            ValueError: one line naming the unknown norm and the known ones.
        """
        if isinstance(value, Norm):
            return value
        key = str(value).strip().lower().replace("-", "_")
        aliases = {
            "l_inf": cls.LINF, "linf": cls.LINF, "inf": cls.LINF,
            "l_2": cls.L2, "l2": cls.L2, "2": cls.L2,
            "l_1": cls.L1, "l1": cls.L1, "1": cls.L1,
        }  # fmt: skip
        if key not in aliases:
            raise ValueError(f"unknown norm '{value}'; use one of l_inf, l_2, l_1")
        return aliases[key]

    def __str__(self) -> str:
        return self.value


def linf_step(grad: torch.Tensor, step: float) -> torch.Tensor:
    """Signed-gradient ascent step of size ``step`` (Linf steepest ascent)."""
    return step * grad.sign()


def linf_project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project ``x_adv`` onto {‖x_adv − x‖∞ ≤ eps} ∩ [0,1]^d (exact: both are boxes)."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
