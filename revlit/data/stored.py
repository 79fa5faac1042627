"""Stored adversarial test sets: a folder of float32 images, labels, test indices and meta.json.

Layout of ``data/pgd/<name>/``::

    images.pt    float32 (N, 3, 32, 32) in [0, 1], exactly the attack's output (no rounding)
    labels.pt    int64 (N,)   true labels
    indices.pt   int64 (N,)   CIFAR-10 test indices, ascending
    meta.json    how the set was made (classifier path + sha256, norm, eps, step, iterations,
                 restarts, loss, seed, n, accuracy, seconds, commit, date, ...) and the sha256 of
                 each tensor file

Written atomically: the new set is completed in a sibling temporary folder, then swapped in, so an
existing set is only replaced by a complete new one (a kill mid-swap is undone by the next
read or write, :func:`revlit.io.recover_dir`). Read with ``torch.load(weights_only=True)`` and
checked: images finite in [0, 1], labels in 0..9, indices distinct.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from revlit.io import recover_dir, replace_dir, sha256_file

STORED_FORMAT = "revlit-stored-set/1"
TENSOR_FILES = ("images.pt", "labels.pt", "indices.pt")
NUM_CLASSES = 10


class StoredSetError(ValueError):
    """A stored set is missing or corrupt (message is one line)."""


class StoredSetNotFound(StoredSetError, FileNotFoundError):
    """No stored set in the given folder (message is one line)."""


@dataclass
class StoredSet:
    """A loaded stored set: images (N,3,H,W) float32, labels (N,), indices (N,), metadata."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def check_rows(labels: torch.Tensor, indices: torch.Tensor, where: str) -> None:
    """Labels are integers in 0..9 and indices distinct non-negative integers (one-line error)."""
    if labels.is_floating_point() or indices.is_floating_point():
        raise StoredSetError(f"{where}: labels and indices must be integer tensors")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES):
        raise StoredSetError(f"{where}: labels must lie in 0..{NUM_CLASSES - 1}")
    if len(indices) and int(indices.min()) < 0:
        raise StoredSetError(f"{where}: test indices must be >= 0")
    if len(torch.unique(indices)) != len(indices):
        raise StoredSetError(f"{where}: test indices repeat (each image must appear once)")


def check_images(images: torch.Tensor, where: str) -> None:
    """Images are finite floats in [0, 1] (one-line error)."""
    if not images.is_floating_point():
        raise StoredSetError(f"{where}: images are {images.dtype}, expected float32")
    if not torch.isfinite(images).all():
        raise StoredSetError(f"{where}: images hold NaN/inf values")
    if len(images) and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
        raise StoredSetError(f"{where}: images lie outside [0, 1]")


def save_stored_set(
    folder: str | os.PathLike,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    meta: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a stored set to ``folder`` atomically (temp folder + rename) and return the folder.

    An existing set is replaced only by a complete new one, and only if ``overwrite`` or if both
    record the same ``meta["settings_key"]`` (the same attack on the same data) and the new set
    holds every image of the old one: reusing a name never silently loses a larger set.

    Args:
        images: float images in [0,1], (N,C,H,W); stored as float32, contiguous NCHW, unrounded.
        labels, indices: (N,) integer tensors (stored as int64): labels in 0..9, indices distinct.
        meta: JSON-serialisable metadata; ``format``, ``n`` and the files' sha256 are added.
        overwrite: replace whatever set is there.

    Raises:
        StoredSetError: mismatched lengths, bad labels or indices, non-JSON metadata, or an
            existing set that this one may not replace.
    """
    folder = Path(folder)
    if images.dim() != 4 or not (len(images) == len(labels) == len(indices)):
        raise StoredSetError(
            f"stored set needs images (N,C,H,W), labels (N,), indices (N,); got "
            f"{tuple(images.shape)}, {tuple(labels.shape)}, {tuple(indices.shape)}"
        )
    check_rows(labels, indices, f"stored set {folder}")
    recover_dir(folder)
    if folder.exists() and not overwrite:
        _check_replaceable(folder, indices, (meta or {}).get("settings_key"))
    tensors = {
        "images.pt": images.detach().cpu().to(torch.float32).contiguous(),
        "labels.pt": labels.detach().cpu().to(torch.int64).contiguous(),
        "indices.pt": indices.detach().cpu().to(torch.int64).contiguous(),
    }
    meta = dict(meta or {})
    meta["format"] = STORED_FORMAT
    meta["n"] = len(labels)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed writer
    try:
        tmp.mkdir()
        files = {}
        for name, t in tensors.items():
            torch.save(t, tmp / name)
            files[name] = sha256_file(tmp / name)
        meta["files_sha256"] = files
        try:
            text = json.dumps(meta, indent=2, sort_keys=True)
        except TypeError as e:
            raise StoredSetError(f"stored set metadata is not JSON-serialisable: {e}") from None
        (tmp / "meta.json").write_text(text + "\n")
        replace_dir(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _check_replaceable(folder: Path, indices: torch.Tensor, settings_key: str | None) -> None:
    try:
        old = json.loads((folder / "meta.json").read_text())
        old_idx = torch.load(folder / "indices.pt", map_location="cpu", weights_only=True)
    except Exception:
        old, old_idx = {}, None
    same = settings_key is not None and old.get("settings_key") == settings_key
    covers = old_idx is not None and bool(torch.isin(old_idx, indices.cpu()).all())
    if not (same and covers):
        why = "other settings" if not same else f"{len(old_idx)} images, more than the new set"
        raise StoredSetError(
            f"stored set {folder} already exists ({why}); pass overwrite to replace it, or choose "
            "another set name"
        )


def load_stored_set(folder: str | os.PathLike, verify: bool = True) -> StoredSet:
    """Load a stored set written by :func:`save_stored_set`.

    Args:
        folder: the set's folder (e.g. ``data/pgd/resnet20_at_l_inf``).
        verify: compare each tensor file with the sha256 recorded in meta.json.

    Raises:
        StoredSetNotFound: the folder or one of its files does not exist.
        StoredSetError: a file is corrupt, unsafe to unpickle, or inconsistent with the others.
    """
    folder = Path(folder)
    recover_dir(folder)
    if not folder.is_dir():
        raise StoredSetNotFound(f"stored set not found: {folder} (make it with `make attacks`)")
    missing = [f for f in (*TENSOR_FILES, "meta.json") if not (folder / f).is_file()]
    if missing:
        raise StoredSetNotFound(f"stored set {folder} is incomplete: missing {', '.join(missing)}")
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise StoredSetError(f"stored set {folder}: unreadable meta.json ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != STORED_FORMAT:
        raise StoredSetError(f"stored set {folder}: meta.json is not a {STORED_FORMAT} record")
    if verify:
        for name, sha in (meta.get("files_sha256") or {}).items():
            if name in TENSOR_FILES and sha256_file(folder / name) != sha:
                raise StoredSetError(
                    f"stored set {folder}: {name} does not match its sha256 in meta.json"
                )
    out = {}
    for name in TENSOR_FILES:
        try:
            t = torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors are long and multi-line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StoredSetError(f"stored set {folder}: cannot load {name} ({first})") from None
        if not isinstance(t, torch.Tensor):
            raise StoredSetError(f"stored set {folder}: {name} does not hold a tensor")
        out[name] = t
    images, labels, indices = out["images.pt"], out["labels.pt"], out["indices.pt"]
    n = len(labels)
    if images.dim() != 4 or len(images) != n or len(indices) != n or meta.get("n", n) != n:
        raise StoredSetError(
            f"stored set {folder}: inconsistent sizes (images {tuple(images.shape)}, "
            f"labels {n}, indices {len(indices)}, meta n {meta.get('n')})"
        )
    check_images(images, f"stored set {folder}")
    check_rows(labels, indices, f"stored set {folder}")
    return StoredSet(images, labels.long(), indices.long(), meta)


def check_stored_sets(
    names: list[str],
    pgd_root: str | os.PathLike,
    classifier_sha256: str | None = None,
    allow_mismatch: bool = False,
) -> dict[str, StoredSet]:
    """Load and check every requested stored set at once, before any model runs.

    Args:
        names: set names under ``pgd_root`` or folder paths (``"clean"`` is skipped).
        pgd_root: folder of the stored sets.
        classifier_sha256: the classifier the sets must have been made against (None: any).
        allow_mismatch: accept sets made against another classifier.

    Returns:
        ``{name: StoredSet}`` for every stored set.

    Raises:
        StoredSetNotFound / StoredSetError: one line naming the first missing, corrupt or foreign
            set and the fix.
    """
    out = {}
    for name in names:
        if name == "clean":
            continue
        folder = Path(name) if Path(name).exists() else Path(pgd_root) / name
        st = load_stored_set(folder)
        made_for = st.meta.get("classifier_sha256")
        if classifier_sha256 and made_for not in (None, classifier_sha256) and not allow_mismatch:
            raise StoredSetError(
                f"stored set '{name}' was made against classifier {str(made_for)[:12]}, not "
                f"{classifier_sha256[:12]}; remake it for this classifier or pass allow_mismatch"
            )
        out[name] = st
    return out
