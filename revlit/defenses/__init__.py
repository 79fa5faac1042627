"""Test-time defenses: the reverse attack of Mao et al. (ICCV 2021) and its random-noise baseline.

Framework-free (no Lightning): plain classes usable from a notebook with any ``nn.Module``.
"""

from revlit.defenses.noise import RandomNoise, check_images
from revlit.defenses.reverse import ReversePurifier

__all__ = [
    "RandomNoise",
    "ReversePurifier",
    "check_images",
]
