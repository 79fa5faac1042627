"""CIFAR10DataModule on a tiny synthetic CIFAR-10 folder (wrong md5s, torchvision layout)."""

from __future__ import annotations

import logging

import pytest
import torch

from revlit.data.cifar import BATCH_DIR, DatasetNotFound, load_cifar10
from revlit.data.datamodule import CIFAR10DataModule, random_crop_flip


def _dm(root, **kw) -> CIFAR10DataModule:
    kw.setdefault("val_size", 20)
    kw.setdefault("batch_size", 16)
    kw.setdefault("eval_batch_size", 16)
    return CIFAR10DataModule(data_dir=str(root), **kw)


@pytest.mark.parametrize("as_batches_folder", [False, True])
def test_loads_root_or_batches_folder_and_logs_md5(tiny_cifar_dir, caplog, as_batches_folder):
    folder = tiny_cifar_dir / BATCH_DIR if as_batches_folder else tiny_cifar_dir
    dm = _dm(folder)
    with caplog.at_level(logging.DEBUG, logger="revlit"):
        dm.setup("fit")
    assert len(dm.train_set) == 80 and len(dm.val_set) == 20 and len(dm.test_set) == 40
    md5_lines = [r.getMessage() for r in caplog.records if "md5 differs" in r.getMessage()]
    assert md5_lines and all(str(tiny_cifar_dir / BATCH_DIR) in m for m in md5_lines)
    x, y, idx = next(iter(dm.test_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (16, 3, 32, 32)
    assert torch.equal(idx, torch.arange(16))


def test_missing_folder_error(tmp_path):
    dm = _dm(tmp_path / "nothing")
    with pytest.raises(DatasetNotFound) as e:
        dm.setup("test")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nothing") in msg
    assert "--data.data_dir" in msg and "--data.download" in msg


def test_split_is_seeded_and_disjoint(tiny_cifar_dir):
    x_all, y_all = load_cifar10(tiny_cifar_dir, train=True)
    splits = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        dm = _dm(tiny_cifar_dir, split_seed=seed)
        dm.setup("fit")
        splits[name] = (dm.train_set.indices, dm.val_set.indices)
        tr, va = splits[name]
        assert set(tr.tolist()).isdisjoint(va.tolist())
        assert sorted(tr.tolist() + va.tolist()) == list(range(100))
        # Each row is the image and label of the index it claims.
        assert torch.equal(dm.val_set.images, x_all[va]) and torch.equal(
            dm.val_set.labels, y_all[va]
        )
        assert torch.equal(dm.train_set.images, x_all[tr])
    assert torch.equal(splits["a"][1], splits["b"][1])
    assert not torch.equal(splits["a"][1], splits["c"][1])


def test_test_subset_takes_first_n(tiny_cifar_dir):
    x_all, y_all = load_cifar10(tiny_cifar_dir, train=False)
    dm = _dm(tiny_cifar_dir, test_subset=7)
    dm.setup("test")
    assert len(dm.test_set) == 7
    assert torch.equal(dm.test_set.indices, torch.arange(7))
    assert torch.equal(dm.test_set.images, x_all[:7]) and torch.equal(dm.test_set.labels, y_all[:7])
    with pytest.raises(ValueError, match="test_subset"):
        _dm(tiny_cifar_dir, test_subset=0)


def test_batch_transfer_gives_unit_floats_channels_last(tiny_cifar_dir):
    dm = _dm(tiny_cifar_dir)
    dm.setup("test")
    xb, yb, ib = next(iter(dm.test_dataloader()))
    x, y, idx = dm.on_after_batch_transfer((xb, yb, ib), 0)
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x * 255, xb.float())
    assert torch.equal(y, yb) and torch.equal(idx, ib)


def test_random_crop_flip_is_a_shifted_window():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    out = random_crop_flip(x, pad=4, generator=g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        windows = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def test_check_classifier_refuses_other_classifiers_sets(tiny_cifar_dir, caplog):
    dm = _dm(tiny_cifar_dir)
    dm.eval_meta = {"classifier_sha256": "a" * 64}
    dm.check_classifier("a" * 64)  # same classifier: fine
    with pytest.raises(ValueError, match="allow_mismatch"):
        dm.check_classifier("b" * 64)
    dm.allow_mismatch = True
    with caplog.at_level(logging.WARNING, logger="revlit"):
        dm.check_classifier("b" * 64)
    assert any("allow_mismatch" in r.getMessage() for r in caplog.records)
