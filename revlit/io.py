"""File writing and provenance: atomic writes, file hashes, the code's commit.

Every file revlit writes goes through :func:`atomic_path`: the content is written to a temporary
sibling and renamed over the destination only when complete, so a crash or a kill leaves either
the old file or the new one, never half a file. Framework-free (no Lightning import).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def tmp_sibling(path: str | os.PathLike) -> Path:
    """The temporary name used while writing ``path``: ``name.tmp.suffix`` in the same folder.

    The suffix is kept last so writers that infer the format from it (matplotlib) still work, and
    the name is fixed so a file left by a killed writer is overwritten by the next attempt.
    """
    p = Path(path)
    return p.with_name(f"{p.stem}.tmp{p.suffix}" if p.suffix else f"{p.name}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it over ``path`` (parents created).

    On an exception the temporary file is removed and ``path`` is left as it was.

    Example::

        with atomic_path("out/grid.png") as tmp:
            fig.savefig(tmp)
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(p)
    try:
        yield tmp
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file; returns the path."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(obj: Any, path: str | os.PathLike, indent: int | None = 2, **kw) -> Path:
    """Write ``obj`` as JSON (plus a final newline) through a temporary file; returns the path."""
    return atomic_write_text(json.dumps(obj, indent=indent, **kw) + "\n", path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str:
    """The current git commit (short, ``-dirty`` if tracked files changed), or ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return (
            out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _old_sibling(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def recover_dir(folder: str | os.PathLike) -> None:
    """Finish or undo a :func:`replace_dir` that a kill interrupted.

    If ``folder`` is missing but its backup ``.<name>.old`` exists, the backup is put back;
    if both exist (the kill came while the backup was being deleted), the backup is deleted.
    """
    folder = Path(folder)
    old = _old_sibling(folder)
    if not old.exists():
        return
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, folder)


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Move the complete folder ``src`` to ``dst``, replacing what is there; returns ``dst``.

    ``dst`` is renamed to ``.<name>.old`` first and deleted after the move, so at every moment
    either the old or the new folder is in place (or recoverable by :func:`recover_dir`).
    ``src`` and ``dst`` must be on the same filesystem.
    """
    src, dst = Path(src), Path(dst)
    recover_dir(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = _old_sibling(dst)
    if dst.exists():
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except OSError:
        if old.exists():
            os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return dst


def canonical_hash(obj: Any) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys; tensors and paths as text)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
