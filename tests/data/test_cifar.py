"""load_cifar10: torchvision's layout read directly, md5 mismatches logged, one-line errors."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import torch

from revlit.data.cifar import (
    BATCH_DIR,
    DatasetInvalid,
    DatasetNotFound,
    find_batches,
    load_cifar10,
)
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
def test_root_or_batches_folder_and_md5_debug_line(tiny_cifar_dir, caplog, as_batches_folder):
    folder = tiny_cifar_dir / BATCH_DIR if as_batches_folder else tiny_cifar_dir
    assert find_batches(folder) == tiny_cifar_dir / BATCH_DIR
    with caplog.at_level(logging.DEBUG, logger="revlit"):
        x, y = load_cifar10(folder, train=False)
    assert len(y) == 40
    lines = [r.getMessage() for r in caplog.records if "md5" in r.getMessage()]
    assert len(lines) == 1 and "test_batch" in lines[0] and "loading it anyway" in lines[0]
    # nothing the user can act on: debug only
    assert [r.levelno for r in caplog.records if "md5" in r.getMessage()] == [logging.DEBUG]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="revlit"):
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
    with pytest.raises(DatasetInvalid, match="no data/labels"):
        load_cifar10(root, train=False)


class _RunsCode:
    """Unpickling this calls ``os.system``: the reader must refuse it without calling it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 5])
def test_batch_file_that_runs_code_is_refused_and_nothing_runs(tmp_path, protocol):
    root = write_tiny_cifar(tmp_path / "c", n_train=10, n_test=5)
    marker = tmp_path / "ran"
    crafted = {b"data": np.zeros((5, 3072), np.uint8), b"labels": [0] * 5, b"x": _RunsCode(marker)}
    (root / BATCH_DIR / "test_batch").write_bytes(pickle.dumps(crafted, protocol=protocol))
    with pytest.raises(DatasetInvalid, match="refusing global (posix|os)"):
        load_cifar10(root, train=False)
    assert not marker.exists()
    # the same file through an unrestricted unpickler does run the command (the test can fail)
    pickle.loads((root / BATCH_DIR / "test_batch").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    "batch, match",
    [
        ({b"data": np.zeros((5, 3072), np.int64), b"labels": [0] * 5}, "dtype|uint8"),
        ({b"data": np.zeros((5, 3071), np.uint8), b"labels": [0] * 5}, r"\(N, 3072\)"),
        ({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0, 1, 2, 3, 10]}, "0..9"),
        ({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0, 1, 2, 3, -1]}, "0..9"),
        ({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0] * 4}, "4 labels for 5"),
        ({b"data": np.zeros((5, 3072), object), b"labels": [0] * 5}, "dtype|uint8"),
        ([np.zeros((5, 3072), np.uint8)], "expected a dict"),
    ],
)
def test_malformed_batch_is_refused_in_one_line(tmp_path, batch, match):
    root = write_tiny_cifar(tmp_path / "c", n_train=10, n_test=5)
    (root / BATCH_DIR / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetInvalid, match=match) as e:
        load_cifar10(root, train=False)
    assert "\n" not in str(e.value)


def test_truncated_batch_is_refused(tmp_path):
    root = write_tiny_cifar(tmp_path / "c", n_train=10, n_test=5)
    f = root / BATCH_DIR / "data_batch_2"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DatasetInvalid, match="data_batch_2"):
        load_cifar10(root, train=True)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_of_a_plain_batch_loads(tmp_path, protocol):
    root = write_tiny_cifar(tmp_path / "c", n_train=10, n_test=5)
    x, y = tiny_images(5, seed=3)
    batch = {b"batch_label": b"t", b"labels": [int(v) for v in y], b"data": x.reshape(5, 3072)}
    (root / BATCH_DIR / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    xt, yt = load_cifar10(root, train=False)
    assert np.array_equal(xt.numpy(), x) and np.array_equal(yt.numpy(), y)
