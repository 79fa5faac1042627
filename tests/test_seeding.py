"""Per-batch / per-example seeding: one definition, values fixed by the formula."""

from __future__ import annotations

import pytest
import torch

from revlit.seeding import (
    DIAG_SALT,
    SEED_STRIDE,
    batch_generator,
    batch_seed,
    diagnostic_generator,
    image_seed,
    per_image_generators,
)


def test_seeds_follow_the_documented_formula():
    assert SEED_STRIDE == 2**24
    assert batch_seed(3, 17) == 3 * 2**24 + 17
    assert image_seed(3, 17) == 3 * 2**24 + 17
    assert batch_seed(2**40, 5) == (2**40 * 2**24 + 5) % 2**63


def test_image_seed_refuses_negative_indices():
    with pytest.raises(ValueError):
        image_seed(0, -1)


def test_generators_draw_from_their_seed():
    a = torch.rand(4, generator=batch_generator(1, 8))
    assert torch.equal(a, torch.rand(4, generator=torch.Generator().manual_seed(batch_seed(1, 8))))
    d = torch.rand(4, generator=diagnostic_generator(1, 8))
    ref = torch.Generator().manual_seed(batch_seed(1, 8) ^ DIAG_SALT)
    assert torch.equal(d, torch.rand(4, generator=ref))
    assert not torch.equal(a, d)


def test_per_image_generators_do_not_depend_on_the_batch():
    full = [torch.rand(2, generator=g) for g in per_image_generators(0, torch.tensor([4, 9, 2]))]
    alone = torch.rand(2, generator=per_image_generators(0, [9])[0])
    assert torch.equal(full[1], alone)
    assert not torch.equal(full[0], full[1])


def test_the_attacks_use_the_same_per_example_generators():
    from revlit.attacks import example_generators

    a = torch.rand(3, generator=example_generators(5, [7])[0])
    assert torch.equal(a, torch.rand(3, generator=per_image_generators(5, [7])[0]))
