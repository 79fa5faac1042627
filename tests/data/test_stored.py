"""Stored adversarial sets: round trip, atomic replacement, one-line errors, classifier check."""

import json

import pytest
import torch

from revlit.data.datamodule import CIFAR10DataModule
from revlit.data.stored import (
    StoredSetError,
    StoredSetNotFound,
    load_stored_set,
    save_stored_set,
)


def _set(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g)
    images[0, 0, 0, 0] = 1 / 3  # not a multiple of 1/255: must survive unrounded
    labels = torch.randint(0, 10, (n,), generator=g)
    indices = torch.arange(n) * 7 + 3
    meta = {
        "classifier_sha256": "a" * 64,
        "norm": "l_inf",
        "eps": 8 / 255,
        "steps": 10,
        "note": "x",
    }
    return images, labels, indices, meta


def test_round_trip_is_bit_exact(tmp_path):
    images, labels, indices, meta = _set()
    cl = images.contiguous(memory_format=torch.channels_last)  # any layout goes in
    folder = save_stored_set(tmp_path / "s", cl, labels, indices, meta)
    st = load_stored_set(folder)
    assert st.images.dtype == torch.float32
    assert torch.equal(st.images, images)
    assert torch.equal(st.labels, labels) and torch.equal(st.indices, indices)
    for k, v in meta.items():
        assert st.meta[k] == v
    assert st.meta["n"] == 10 and len(st) == 10
    assert set(st.meta["files_sha256"]) == {"images.pt", "labels.pt", "indices.pt"}


def test_existing_set_is_replaced_only_by_a_complete_one(tmp_path):
    images, labels, indices, meta = _set()
    folder = save_stored_set(tmp_path / "s", images, labels, indices, meta)
    with pytest.raises(StoredSetError):  # fails half-way (metadata not JSON): old set stays
        save_stored_set(folder, images[:5], labels[:5], indices[:5], {"bad": object()})
    st = load_stored_set(folder)
    assert len(st) == 10 and torch.equal(st.images, images)
    save_stored_set(folder, images[:4], labels[:4], indices[:4], meta)
    assert len(load_stored_set(folder)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp folders left


def _one_line_error(exc_type, fn):
    with pytest.raises(exc_type) as e:
        fn()
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_missing_and_corrupt_sets_are_one_line_errors(tmp_path):
    _one_line_error(StoredSetNotFound, lambda: load_stored_set(tmp_path / "nope"))
    images, labels, indices, meta = _set()
    folder = save_stored_set(tmp_path / "s", images, labels, indices, meta)
    # truncated tensor file
    data = (folder / "images.pt").read_bytes()
    (folder / "images.pt").write_bytes(data[: len(data) // 2])
    msg = _one_line_error(StoredSetError, lambda: load_stored_set(folder))
    assert "images.pt" in msg
    _one_line_error(StoredSetError, lambda: load_stored_set(folder, verify=False))
    # a missing file
    (folder / "labels.pt").unlink()
    _one_line_error(StoredSetNotFound, lambda: load_stored_set(folder))
    # broken meta.json
    folder = save_stored_set(tmp_path / "t", images, labels, indices, meta)
    (folder / "meta.json").write_text("{not json")
    _one_line_error(StoredSetError, lambda: load_stored_set(folder))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_pickles_are_refused(tmp_path):
    images, labels, indices, meta = _set()
    folder = save_stored_set(tmp_path / "s", images, labels, indices, meta)
    torch.save({"x": _Evil()}, folder / "labels.pt")
    m = json.loads((folder / "meta.json").read_text())
    m.pop("files_sha256")
    (folder / "meta.json").write_text(json.dumps(m))
    msg = _one_line_error(StoredSetError, lambda: load_stored_set(folder))
    assert "labels.pt" in msg


def test_datamodule_serves_a_stored_set_and_refuses_another_classifier(tmp_path):
    images, labels, indices, meta = _set()
    save_stored_set(tmp_path / "pgd" / "myset", images, labels, indices, meta)
    dm = CIFAR10DataModule(eval_set="myset", pgd_root=str(tmp_path / "pgd"), eval_batch_size=4)
    dm.setup("test")
    x, y, idx = next(iter(dm.test_dataloader()))
    assert (
        torch.equal(x, images[:4]) and torch.equal(y, labels[:4]) and torch.equal(idx, indices[:4])
    )
    dm.check_classifier("a" * 64)  # the classifier it was made against
    with pytest.raises(ValueError, match="allow_mismatch"):
        dm.check_classifier("b" * 64)
    ok = CIFAR10DataModule(eval_set=str(tmp_path / "pgd" / "myset"), allow_mismatch=True)
    ok.setup("test")
    ok.check_classifier("b" * 64)
    missing = CIFAR10DataModule(eval_set="absent", pgd_root=str(tmp_path / "pgd"))
    with pytest.raises(FileNotFoundError):
        missing.setup("test")
