"""load_cifar10: torchvision's layout read directly, md5 mismatches logged, one-line errors."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch

from revlit.data.cifar import BATCH_DIR, DatasetNotFound, find_batches, load_cifar10
from tests.helpers import tiny_images, write_tiny_cifar


def test_loads_exactly_what_was_written(tiny_cifar_dir):
    x_tr, y_tr = load_cifar10(tiny_cifar_dir, train=True)
    x_te, y_te = load_cifar10(tiny_cifar_dir, train=False)
    assert x_tr.dtype == torch.uint8 and x_tr.shape == (100, 3, 32, 32)
    assert y_tr.dtype == torch.int64 and y_tr.shape == (100,)
    assert x_te.shape == (40, 3, 32, 32) and y_te.shape == (40,)
    ref_x, ref_y = tiny_images(100, seed=0)  # the five batches concatenated in order
    assert np.array_equal(x_tr.numpy(), ref_x) and np.array_equal(y_tr.numpy(), ref_y)
    ref_x, ref_y = tiny_images(40, seed=1)
    assert np.array_equal(x_te.numpy(), ref_x) and np.array_equal(y_te.numpy(), ref_y)


@pytest.mark.parametrize("as_batches_folder", [False, True])
def test_root_or_batches_folder_and_md5_line(tiny_cifar_dir, caplog, as_batches_folder):
    folder = tiny_cifar_dir / BATCH_DIR if as_batches_folder else tiny_cifar_dir
    assert find_batches(folder) == tiny_cifar_dir / BATCH_DIR
    with caplog.at_level(logging.INFO, logger="revlit"):
        x, y = load_cifar10(folder, train=False)
    assert len(y) == 40
    lines = [r.getMessage() for r in caplog.records if "md5" in r.getMessage()]
    assert len(lines) == 1 and "test_batch" in lines[0] and "loading it anyway" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="revlit"):
        load_cifar10(folder, train=False, check_md5=False)
    assert not [r for r in caplog.records if "md5" in r.getMessage()]


def test_missing_folder_names_folder_and_both_fixes(tmp_path):
    missing = tmp_path / "no_cifar_here"
    with pytest.raises(DatasetNotFound) as e:
        load_cifar10(missing, train=True)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "\n" not in msg
    assert str(missing) in msg
    assert "--data.data_dir" in msg and "REVLIT_DATA_DIR" in msg and "--data.download" in msg


def test_incomplete_folder_is_not_found(tmp_path):
    root = write_tiny_cifar(tmp_path / "c", n_train=10, n_test=5)
    (root / BATCH_DIR / "data_batch_3").unlink()
    assert find_batches(root) is None
    with pytest.raises(DatasetNotFound):
        load_cifar10(root, train=False)


def test_pickle_without_data_keys_is_refused(tmp_path):
    root = write_tiny_cifar(tmp_path / "c", n_train=10, n_test=5)
    with open(root / BATCH_DIR / "test_batch", "wb") as f:
        pickle.dump({b"images": np.zeros((5, 3072), np.uint8)}, f)
    with pytest.raises(DatasetNotFound, match="no data/labels"):
        load_cifar10(root, train=False)
