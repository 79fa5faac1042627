"""revlit.io: atomic writes leave the old file or the new one, never a temporary or half a file."""

import json

import pytest
import torch

from revlit.io import atomic_path, atomic_save, atomic_write_json, sha256_file, tmp_sibling


def test_atomic_save_round_trip_and_no_temporary(tmp_path):
    p = atomic_save({"a": torch.arange(3)}, tmp_path / "sub" / "x.pt")
    assert torch.equal(torch.load(p, weights_only=True)["a"], torch.arange(3))
    assert sorted(f.name for f in p.parent.iterdir()) == ["x.pt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    p = atomic_write_json({"v": 1}, tmp_path / "r.json")
    before = sha256_file(p)
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_text('{"v": 2')  # half written, then the writer dies
        raise RuntimeError("killed")
    assert sha256_file(p) == before and json.loads(p.read_text()) == {"v": 1}
    assert not tmp_sibling(p).exists()


def test_tmp_sibling_keeps_the_suffix_last(tmp_path):
    assert tmp_sibling(tmp_path / "grid.png").name == "grid.tmp.png"
    assert tmp_sibling(tmp_path / "README").name == "README.tmp"
