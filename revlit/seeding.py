"""Per-batch and per-example seeding: the one place a run's seed becomes CPU generators.

A result must not depend on which device or in which order a batch is processed, so every
random draw (an attack's or a purifier's random start, the SimCLR views of every step) comes from
a CPU ``torch.Generator`` seeded from the run's seed and a CIFAR-10 test index (< 2**24):

- per batch (the reverse attack with in-batch negatives): ``seed * 2**24 + first test index of
  the batch`` (:func:`batch_seed`, :func:`batch_generator`);
- per example (attacks, the bank purifier): ``seed * 2**24 + test index`` (:func:`image_seed`,
  :func:`per_image_generators`), so an example's draw does not depend on its batch-mates;
- the paired before/after SSL-loss measurement of a defended batch draws its views from
  ``batch_seed ^ DIAG_SALT`` (:func:`diagnostic_generator`), never from the defense's generator.

Generators live on the CPU; draws are moved to the images' device afterwards, so a seed gives the
same numbers on every device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: seed = seed * SEED_STRIDE + index; CIFAR-10 test indices are < 2**24
SEED_STRIDE = 1 << 24
#: the paired before/after SSL-loss measurement draws its views from batch_seed ^ DIAG_SALT
DIAG_SALT = 0x5EED5EED
#: how records describe the per-batch seeding
BATCH_SEEDING = "per batch: seed * 2**24 + first test index of the batch"
_MOD = 1 << 63


def batch_seed(seed: int, first_index: int) -> int:
    """The seed of a batch's generator, from the run's seed and the batch's first test index."""
    return (int(seed) * SEED_STRIDE + int(first_index)) % _MOD


def image_seed(seed: int, index: int) -> int:
    """The seed of one example's generator, from the run's seed and its test index (>= 0)."""
    if int(index) < 0:
        raise ValueError(f"image indices must be >= 0, got {index}")
    return (int(seed) * SEED_STRIDE + int(index)) % _MOD


def batch_generator(seed: int, first_index: int) -> torch.Generator:
    """A CPU generator seeded with :func:`batch_seed`."""
    return torch.Generator().manual_seed(batch_seed(seed, first_index))


def diagnostic_generator(seed: int, first_index: int) -> torch.Generator:
    """The generator of a batch's paired before/after SSL-loss views (``batch_seed ^ DIAG_SALT``)."""
    return torch.Generator().manual_seed(batch_seed(seed, first_index) ^ DIAG_SALT)


def per_image_generators(seed: int, indices: Sequence[int] | torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per example, seeded from ``(seed, index)`` (:func:`image_seed`).

    Passed as ``generator`` to an attack, :meth:`revlit.defenses.ReversePurifier.purify`, the
    views or ``random_init``, example i's randomness is drawn from generator i alone, so it does
    not depend on the batch it is in nor on how DDP shards the test set.
    """
    if isinstance(indices, torch.Tensor):
        indices = indices.reshape(-1).tolist()
    return [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices]


__all__ = [
    "BATCH_SEEDING",
    "DIAG_SALT",
    "SEED_STRIDE",
    "batch_generator",
    "batch_seed",
    "diagnostic_generator",
    "image_seed",
    "per_image_generators",
]
