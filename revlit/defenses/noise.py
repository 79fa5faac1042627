"""The random-noise baseline of the reverse-attack defense.

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
from revlit.defenses.base import EPS_R, Defense, check_images, parse_norm
from revlit.utils import as_float


class RandomNoise(Defense):
    """Random-noise baseline: ``clip(x + u, 0, 1)`` with u uniform in the ε-ball of ``norm``.

    Mao et al. (ICCV 2021) report that random noise of the reverse attack's budget does not
    restore robust accuracy; running it next to the reverse attack checks that claim here.

    Args:
        norm: ``l_inf`` (default) or ``l_2``; a :class:`Norm` or its spelling.
        eps: budget, as a number or a fraction string such as "16/255" (default: the reverse
            attack's ε_r, :data:`revlit.defenses.base.EPS_R`).
    """

    method = "noise"

    def __init__(self, norm: Norm | str = Norm.LINF, eps: float | str = EPS_R) -> None:
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

    def defend(self, x, generator=None, trace=None):
        return {0: self.purify(x, generator)}, {}
