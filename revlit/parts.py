"""Finished batches kept on disk, so a killed run resumes where it stopped.

A run (an attack-set generation, a defended evaluation, an adaptive evaluation) computes its
outputs batch by batch, each batch a dict of tensors whose first dimension is the batch and which
holds an ``"index"`` entry (CIFAR-10 test indices). :class:`PartStore` keeps each finished batch
as one file named by a hash of

* the run's *settings* (everything that changes the outputs: the method's parameters, the seed,
  the classifier's and head's sha256, the data's identity), and
* the indices the batch covers,

and returns it when the same batch of the same settings is asked for again. Parts of other
settings live in other folders and are never read (and are deleted by :meth:`PartStore.prune`).
A batch's outputs must depend only on the settings and the batch (revlit seeds every batch from
the run seed and its first test index), so a resumed run ends with the outputs of an
uninterrupted one. Framework-free; files are written atomically (:func:`revlit.io.atomic_save`).

Typical use (one process; under DDP every rank does the same, parts never collide)::

    store = PartStore(run_dir / "parts", settings)
    for x, y, idx in batches:
        out = store.get(idx)
        if out is None:
            out = compute(x, y, idx)
            store.put(out)
    merged = merge_by_index(store.load_all())  # then write the results, then store.clear()
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from revlit.io import atomic_save, atomic_write_json, canonical_hash

PART_FORMAT = "revlit-part/1"


class PartStore:
    """Finished batches of one run's settings under ``root/<settings hash>/``.

    Args:
        root: folder of the run's parts (created on the first :meth:`put`).
        settings: JSON-like dict of everything the outputs depend on.
    """

    def __init__(self, root: str | os.PathLike, settings: dict) -> None:
        self.root = Path(root)
        self.settings = settings
        self.key = canonical_hash(settings)
        self.folder = self.root / self.key[:20]

    def _path(self, index: torch.Tensor) -> Path:
        h = hashlib.sha256(self.key.encode())
        h.update(index.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
        return self.folder / f"{h.hexdigest()[:32]}.pt"

    def get(self, index: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The stored outputs of the batch covering exactly ``index``, or None."""
        path = self._path(index)
        if not path.is_file():
            return None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a part that cannot be read is recomputed
            path.unlink(missing_ok=True)
            return None
        ok = (
            isinstance(obj, dict)
            and obj.get("format") == PART_FORMAT
            and obj.get("key") == self.key
            and torch.equal(obj["outputs"]["index"].cpu(), index.detach().cpu().long())
        )
        return obj["outputs"] if ok else None

    def put(self, outputs: dict[str, torch.Tensor]) -> Path:
        """Keep one finished batch (``outputs["index"]`` names the rows); returns its file."""
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.settings, self.folder / "settings.json", default=str)
        cpu = {k: v.detach().cpu() for k, v in outputs.items()}
        path = self._path(cpu["index"])
        atomic_save({"format": PART_FORMAT, "key": self.key, "outputs": cpu}, path)
        return path

    def load_all(self) -> list[dict[str, torch.Tensor]]:
        """Every stored batch of these settings (any order)."""
        if not self.folder.is_dir():
            return []
        out = []
        for p in sorted(self.folder.glob("*.pt")):
            if ".tmp" in p.name:
                continue
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True)
            except Exception:
                continue
            if isinstance(obj, dict) and obj.get("key") == self.key:
                out.append(obj["outputs"])
        return out

    def prune(self) -> None:
        """Delete the parts of any other settings under ``root`` (never reused)."""
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d != self.folder:
                    shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink()

    def clear(self) -> None:
        """Delete ``root`` with all its parts (after the results are written)."""
        shutil.rmtree(self.root, ignore_errors=True)
