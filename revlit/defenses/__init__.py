"""Test-time defenses: the reverse attack of Mao et al. (ICCV 2021) and its random-noise baseline.

Framework-free (no Lightning): plain classes usable from a notebook with any ``nn.Module``. Each is
a :class:`Defense`: settings at construction, networks attached by ``bind``, ``defend(x, gen)``.
"""

from revlit.defenses.base import EPS_R, Defense, NoDefense, check_images
from revlit.defenses.noise import RandomNoise
from revlit.defenses.reverse import SETTINGS, ReversePurifier

__all__ = [
    "EPS_R",
    "SETTINGS",
    "Defense",
    "NoDefense",
    "RandomNoise",
    "ReversePurifier",
    "check_images",
]
