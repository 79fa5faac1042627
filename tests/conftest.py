"""Shared fixtures: ``tiny_cifar_dir`` and ``tiny_classifier_ckpt`` (see ``tests/helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import write_tiny_cifar, write_tiny_classifier


@pytest.fixture(autouse=True)
def _few_threads():
    """Keep every test on one thread: the machine's cores are shared with training jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_cifar_dir(tmp_path: Path) -> Path:
    """Root folder of a tiny CIFAR-10 (100 train, 40 test images) in torchvision's layout.

    The batches live in ``<root>/cifar-10-batches-py``; their md5s differ from torchvision's list.
    """
    return write_tiny_cifar(tmp_path / "cifar", n_train=100, n_test=40, seed=0)


@pytest.fixture
def tiny_classifier_ckpt(tmp_path: Path) -> Path:
    """Path to a revlit checkpoint of a seeded ``CifarResNet(depth=8, width=1)``."""
    return write_tiny_classifier(tmp_path / "tiny_classifier.pt")
