"""The random-noise baseline of the reverse-attack defense, and input checks shared by the defenses.

Mao et al. ("Adversarial Attacks are Reversible with Natural Supervision", ICCV 2021) compare the
reverse attack with adding *random* noise of the same budget: if a random vector of the same size
repaired attacked images as well as δ_r does, the self-supervised signal would not be doing the
work. :class:`RandomNoise` is that baseline. Its noise is :func:`revlit.attacks.norms.random_init`
(uniform in the ε-ball, then clipped to [0, 1]), the same draw as the reverse attack's random start.

Images are [0, 1] float tensors, NCHW. Randomness comes only from the given CPU
``torch.Generator`` (moved to the images' device afterwards), so a seed gives the same noise on any
device.
"""

from __future__ import annotations

import torch

from revlit.attacks.norms import Norm, random_init
from revlit.utils import as_float

SUPPORTED_NORMS = (Norm.LINF, Norm.L2)


def check_images(x: torch.Tensor, name: str = "images") -> None:
    """Refuse anything that is not a batch of finite images in [0, 1].

    Args:
        x: expected float (N, C, H, W) with every value in [0, 1].
        name: how the error message names the tensor.

    Raises:
        ValueError: one line saying what is wrong (shape, dtype, NaN/inf, or range).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be float in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name} contain {bad} NaN or infinite values; refusing to defend them")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")


def parse_norm(norm: Norm | str) -> Norm:
    """:meth:`Norm.parse` restricted to the norms the purifiers support (Linf and L2)."""
    norm = Norm.parse(norm)
    if norm not in SUPPORTED_NORMS:
        raise ValueError(f"the defense supports norms l_inf and l_2, got {norm.value}")
    return norm


class RandomNoise:
    """Random-noise baseline: ``clip(x + u, 0, 1)`` with u uniform in the ε-ball of ``norm``.

    Mao et al. (ICCV 2021) report that random noise of the reverse attack's budget does not
    restore robust accuracy; running it next to the reverse attack checks that claim here.

    Args:
        norm: ``l_inf`` (default) or ``l_2``; a :class:`Norm` or its spelling.
        eps: budget, as a number or a fraction string ("16/255", the reverse attack's default).
    """

    def __init__(self, norm: Norm | str = Norm.LINF, eps: float | str = 16 / 255) -> None:
        self.norm = parse_norm(norm)
        self.eps = as_float(eps, "eps")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")

    def __repr__(self) -> str:
        return f"RandomNoise(norm={self.norm.value}, eps={self.eps:.6g})"

    def settings(self) -> dict:
        """The settings as a JSON-friendly dict (for result records)."""
        return {"method": "noise", "norm": self.norm.value, "eps": self.eps}

    @torch.no_grad()
    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noisy images ``clip(x + u, 0, 1)``, u uniform in the ε-ball (same shape as ``x``).

        Args:
            x: images in [0, 1], float, (N, C, H, W).
            generator: source of randomness.

        Raises:
            ValueError: ``x`` is not finite float images in [0, 1].
        """
        check_images(x)
        return random_init(self.norm, x, self.eps, generator)
