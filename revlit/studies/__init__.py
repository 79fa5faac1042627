"""revlit's studies of the reverse-attack defense (Mao et al., ICCV 2021), one module per study.

Run ``python -m revlit.studies <study> [--quick] [--n N]`` (see :mod:`revlit.studies.__main__`):

* :mod:`~revlit.studies.detection` (5): the input's SSL loss as an attack detector;
* :mod:`~revlit.studies.cost_frontier` (4): steps x views against backbone passes per image;
* :mod:`~revlit.studies.batch_size` (2a + 3): purification batch = negatives, and the
  batch-independent bank of clean negatives as a second curve;
* :mod:`~revlit.studies.head_batch` (2b): head-training batch at an equal budget;
* :mod:`~revlit.studies.loss_functions` (1): one head per SSL loss.

Each module exposes ``NAME``, ``TITLE``, ``add_args(parser)`` and ``run(args, ctx) -> summary``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STUDIES = ("detection", "cost_frontier", "batch_size", "head_batch", "loss_functions")


def get_study(name: str) -> ModuleType:
    """The module of study ``name``.

    Raises:
        ValueError: unknown study (one line naming the known ones).
    """
    if name not in STUDIES:
        raise ValueError(f"unknown study '{name}'; known: {', '.join(STUDIES)}")
    return importlib.import_module(f"revlit.studies.{name}")


__all__ = ["STUDIES", "get_study"]
