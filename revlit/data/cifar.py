"""CIFAR-10 on disk: torchvision's layout read directly from the pickles (no md5 gate).

The folder may be the ``cifar-10-batches-py`` folder itself or its parent (torchvision's ``root``).
A copy whose md5s differ from torchvision's list (e.g. one without the ``filenames`` key) is still
loaded, with one log line saying so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("revlit")

BATCH_DIR = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
# torchvision.datasets.CIFAR10.train_list / test_list
TORCHVISION_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


class DatasetNotFound(FileNotFoundError):
    """CIFAR-10 is not in the data folder (message is one line)."""


def default_data_dir() -> str:
    """``$REVLIT_DATA_DIR`` if set, else ``data/``."""
    return os.environ.get("REVLIT_DATA_DIR") or "data"


def find_batches(data_dir: str | os.PathLike) -> Path | None:
    """The folder holding the CIFAR-10 batch pickles, or None."""
    root = Path(data_dir)
    for cand in (root / BATCH_DIR, root):
        if all((cand / f).is_file() for f in TRAIN_FILES + TEST_FILES):
            return cand
    return None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


class DatasetInvalid(ValueError):
    """A CIFAR-10 file is not what CIFAR-10 holds (message is one line); nothing in it ran."""


def _dtype(obj, align=False, copy=True):
    # numpy pickles an array's dtype as numpy.dtype("u1", False, True) + BUILD; CIFAR-10 holds
    # only uint8 pixels (Python 2's pickles give the code as bytes)
    if obj not in ("u1", b"u1"):
        raise pickle.UnpicklingError(f"dtype {obj!r} (CIFAR-10 pixels are uint8)")
    return np.dtype("u1", align, copy)


def _reconstruct(subtype, shape, dtype_code):
    # numpy.core.multiarray._reconstruct(ndarray, (0,), b"b"): an empty ndarray that BUILD fills
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy arrays")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _frombuffer(buf, dtype, shape, order):
    # protocol-5 pickles of numpy arrays: numpy._core.numeric._frombuffer(bytes, dtype, ...)
    if not isinstance(dtype, np.dtype) or dtype != np.uint8 or order not in ("C", "F"):
        raise pickle.UnpicklingError("only uint8 arrays")
    return np.frombuffer(buf, dtype).reshape(shape, order=order)


def _latin1(text, encoding):
    # Python 3's protocol-2 pickles write bytes as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("only latin1-encoded bytes")
    return text.encode("latin1")


#: the only globals a CIFAR-10 batch file may name, each mapped to a checking stand-in
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, bytes, numbers and uint8 numpy arrays; refuses any other
    global, so a crafted file cannot name a function to run."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}") from None


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``, checked.

    Raises:
        DatasetInvalid: the file names any code, or is not a dict with ``data`` uint8 (N, 3072)
            and ``labels`` N integers in 0..9 (N = 10,000 in the real files).
    """
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DatasetInvalid(f"{path} is not a CIFAR-10 batch file ({first})") from None
    if not isinstance(d, dict):
        raise DatasetInvalid(f"{path} is not a CIFAR-10 batch (expected a dict)")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DatasetInvalid(f"{path} is not a CIFAR-10 batch (no data/labels keys)")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DatasetInvalid(f"{path}: data must be a uint8 (N, 3072) array")
    if data.shape[1] != 3 * 32 * 32 or data.shape[0] < 1:
        raise DatasetInvalid(f"{path}: data is {data.shape}, expected (N, 3072)")
    if not isinstance(labels, list) or not all(
        type(v) is int and 0 <= v < len(CLASSES) for v in labels
    ):
        raise DatasetInvalid(f"{path}: labels must be a list of integers in 0..9")
    if len(labels) != len(data):
        raise DatasetInvalid(f"{path}: {len(labels)} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, np.int64)


def load_cifar10(
    data_dir: str | os.PathLike, train: bool, download: bool = False, check_md5: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a CIFAR-10 split as uint8 images (N, 3, 32, 32) and int64 labels (N,).

    Args:
        data_dir: torchvision's root (holding ``cifar-10-batches-py``) or that folder itself.
        train: the 50,000 training images if True, else the 10,000 test images.
        download: if the folder lacks CIFAR-10, let torchvision download it there.
        check_md5: compare against torchvision's md5 list and log one line if they differ.

    Raises:
        DatasetNotFound: one line naming the folder and the two ways to fix it.
        DatasetInvalid: a file is not a CIFAR-10 batch (one line); nothing in it is executed.
    """
    folder = find_batches(data_dir)
    if folder is None and download:
        from torchvision.datasets import CIFAR10

        CIFAR10(root=str(data_dir), train=True, download=True)
        folder = find_batches(data_dir)
    if folder is None:
        raise DatasetNotFound(
            f"CIFAR-10 not found in '{Path(data_dir).resolve()}': point --data.data_dir "
            f"(or $REVLIT_DATA_DIR) at a folder holding {BATCH_DIR}/, or pass "
            "--data.download true to download it there"
        )
    files = TRAIN_FILES if train else TEST_FILES
    if check_md5:
        bad = [f for f in files if _md5(folder / f) != TORCHVISION_MD5[f]]
        if bad:
            log.debug(
                "CIFAR-10 in %s: md5 differs from torchvision's list for %s; loading it anyway",
                folder,
                ", ".join(bad),
            )
    xs, ys = zip(*(_read_batch(folder / f) for f in files))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
