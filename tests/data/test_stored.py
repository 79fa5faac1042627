"""Stored adversarial sets: round trip, atomic replacement, one-line errors, classifier check."""

import json
import os
import re

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
        save_stored_set(
            folder, images[:5], labels[:5], indices[:5], {"bad": object()}, overwrite=True
        )
    st = load_stored_set(folder)
    assert len(st) == 10 and torch.equal(st.images, images)
    save_stored_set(folder, images[:4], labels[:4], indices[:4], meta, overwrite=True)
    assert len(load_stored_set(folder)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp folders left


def _tree_hash(folder):
    from revlit.io import sha256_file

    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def test_reusing_a_name_never_silently_replaces_a_set(tmp_path):
    images, labels, indices, meta = _set()
    meta = {**meta, "settings_key": "k1"}
    folder = save_stored_set(tmp_path / "s", images, labels, indices, meta)
    before = _tree_hash(folder)
    # a smaller set of the same settings, another attack, or an unlabelled writer: refused
    for m, n in (({**meta}, 4), ({**meta, "settings_key": "k2"}, 10), ({"note": "x"}, 10)):
        with pytest.raises(StoredSetError, match="already exists.*overwrite") as e:
            save_stored_set(folder, images[:n], labels[:n], indices[:n], m)
        assert "\n" not in str(e.value)
        assert _tree_hash(folder) == before
    # the same settings covering every image: replaced (a re-run or an extension)
    more = _set(n=12)
    save_stored_set(folder, more[0], more[1], torch.arange(12) * 7 + 3, meta)
    assert len(load_stored_set(folder)) == 12


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda im, lab, idx: (im, lab + 10, idx), r"labels must lie in 0..9"),
        (lambda im, lab, idx: (im, lab - 11, idx), r"labels must lie in 0..9"),
        (lambda im, lab, idx: (im, lab, torch.zeros_like(idx)), "indices repeat"),
        (lambda im, lab, idx: (im, lab, idx - 100), "indices must be >= 0"),
        (lambda im, lab, idx: (im, lab.float(), idx), "integer tensors"),
    ],
)
def test_bad_rows_are_refused_at_save_and_at_load(tmp_path, change, match):
    images, labels, indices, meta = _set()
    im, lab, idx = change(images, labels, indices)
    _one_line_error(StoredSetError, lambda: save_stored_set(tmp_path / "a", im, lab, idx, meta))
    assert not (tmp_path / "a").exists()
    # a set written by another tool (files replaced behind meta.json's back) is refused at load
    folder = save_stored_set(tmp_path / "b", images, labels, indices, meta)
    torch.save(lab, folder / "labels.pt")
    torch.save(idx, folder / "indices.pt")
    msg = _one_line_error(StoredSetError, lambda: load_stored_set(folder, verify=False))
    assert re.search(match, msg), msg


@pytest.mark.parametrize("bad, match", [(float("nan"), "NaN"), (1.5, r"outside \[0, 1\]")])
def test_bad_images_are_refused_at_load(tmp_path, bad, match):
    images, labels, indices, meta = _set()
    folder = save_stored_set(tmp_path / "s", images, labels, indices, meta)
    images[3, 1, 2, 2] = bad
    torch.save(images, folder / "images.pt")
    msg = _one_line_error(StoredSetError, lambda: load_stored_set(folder, verify=False))
    assert re.search(match, msg), msg


def test_a_kill_in_the_middle_of_a_swap_is_recovered(tmp_path):
    images, labels, indices, meta = _set()
    folder = save_stored_set(tmp_path / "s", images, labels, indices, meta)
    before = _tree_hash(folder)
    # killed after the old set was renamed away, before the new one was moved in
    os.replace(folder, tmp_path / ".s.old")
    assert len(load_stored_set(folder)) == 10 and _tree_hash(folder) == before
    # killed while the old set was being deleted: the half-deleted backup is cleaned up
    (tmp_path / ".s.old").mkdir()
    (tmp_path / ".s.old" / "labels.pt").write_bytes(b"half")
    (tmp_path / ".s.tmp").mkdir()  # and a temporary folder of a killed writer
    more = _set(n=12)
    save_stored_set(folder, *more[:2], torch.arange(12), meta, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


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


def test_check_stored_sets_finds_every_problem_before_any_work(tmp_path):
    from revlit.data.stored import check_stored_sets

    images, labels, indices, meta = _set()
    save_stored_set(tmp_path / "a", images, labels, indices, meta)
    save_stored_set(
        tmp_path / "b", images, labels, indices, {**meta, "classifier_sha256": "b" * 64}
    )
    got = check_stored_sets(["clean", "a"], tmp_path, "a" * 64)
    assert list(got) == ["a"] and len(got["a"]) == 10
    msg = _one_line_error(StoredSetError, lambda: check_stored_sets(["a", "b"], tmp_path, "a" * 64))
    assert "'b'" in msg and "allow_mismatch" in msg
    assert len(check_stored_sets(["b"], tmp_path, "a" * 64, allow_mismatch=True)) == 1
    msg = _one_line_error(StoredSetNotFound, lambda: check_stored_sets(["a", "zz"], tmp_path))
    assert "zz" in msg
