"""Plain helpers shared by the tests: a tiny synthetic CIFAR-10 folder and a tiny classifier.

Importable from any test as ``from tests.helpers import write_tiny_cifar, write_tiny_classifier``;
``tests/conftest.py`` wraps both as the fixtures ``tiny_cifar_dir`` and ``tiny_classifier_ckpt``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

BATCH_DIR = "cifar-10-batches-py"
LABEL_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def tiny_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic 32x32 RGB images (uint8, (n, 3, 32, 32)) and labels (int64, (n,)).

    Every class has its own mean colour and a coarse pattern, plus noise, so a small network can
    learn the task in a few steps; labels cycle through all 10 classes (then shuffled).
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    palette = np.random.default_rng(1234).uniform(40, 215, size=(10, 3))  # fixed across seeds
    yy, xx = np.mgrid[0:32, 0:32]
    imgs = np.empty((n, 3, 32, 32), dtype=np.float64)
    for i, c in enumerate(labels):
        stripes = 30.0 * np.sin((xx * (c % 5 + 1) + yy * (c // 5)) * np.pi / 8)
        imgs[i] = palette[c][:, None, None] + stripes[None] + rng.normal(0, 20, (3, 32, 32))
    return np.clip(imgs, 0, 255).round().astype(np.uint8), labels


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_tiny_cifar(
    root: str | os.PathLike, n_train: int = 100, n_test: int = 40, seed: int = 0
) -> Path:
    """Write a tiny CIFAR-10 in torchvision's layout: ``root/cifar-10-batches-py/``.

    The batch pickles (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) hold ``b'data'``
    (uint8, (n, 3072), CHW row-major like the real files), ``b'labels'`` (list of int) and
    ``b'batch_label'``, plus ``batches.meta``; their md5s differ from torchvision's list.
    The ``n_train`` training images are spread over the five training batches.

    Args:
        root: torchvision's ``root`` folder (created if missing).
        n_train: training images in total (>= 5).
        n_test: test images.
        seed: seed of the synthetic images.

    Returns:
        ``Path(root)`` (the batches are in ``root / "cifar-10-batches-py"``).
    """
    if n_train < 5 or n_test < 1:
        raise ValueError(f"need n_train >= 5 and n_test >= 1, got {n_train}, {n_test}")
    root = Path(root)
    folder = root / BATCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr = tiny_images(n_train, seed)
    x_te, y_te = tiny_images(n_test, seed + 1)
    for b, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _dump(
            folder / f"data_batch_{b}",
            {
                b"batch_label": f"training batch {b} of 5".encode(),
                b"labels": [int(v) for v in y_tr[part]],
                b"data": x_tr[part].reshape(len(part), 3072),
            },
        )
    _dump(
        folder / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": [int(v) for v in y_te],
            b"data": x_te.reshape(n_test, 3072),
        },
    )
    _dump(
        folder / "batches.meta",
        {"label_names": LABEL_NAMES, "num_cases_per_batch": n_train // 5, "num_vis": 3072},
    )
    return root


def tiny_classifier(seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``CifarResNet(depth=8, width=1)`` in eval mode (seeded)."""
    from revlit.models.resnet import CifarResNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CifarResNet(depth=8, width=1)
    return model.eval()


def write_tiny_classifier(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save a seeded ``CifarResNet(depth=8, width=1)`` with ``save_classifier``; return ``path``.

    Its BatchNorm running statistics are non-trivial (one train-mode pass over noise), so a
    loader that drops buffers gives different logits.
    """
    from revlit.models.checkpoint import save_classifier

    model = tiny_classifier(seed)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 1)
        model.train()(torch.rand(16, 3, 32, 32))
    model.eval()
    save_classifier(model, path, meta={"note": "tiny test classifier", "seed": seed})
    return Path(path)


class TinyMLP(nn.Module):
    """A small smooth nonlinear classifier on 3x4x4 images (fast)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.l1, self.l2 = nn.Linear(48, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x.flatten(1) * 4 - 2)))
