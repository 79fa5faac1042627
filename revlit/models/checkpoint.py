"""Checkpoint I/O for classifiers and heads: plain dicts of tensors, loaded with weights_only.

A revlit checkpoint is ``{"format": str, "arch": str, "arch_kwargs": dict, "state_dict": dict,
"meta": dict}`` containing only tensors, strings, numbers, lists and dicts, so
``torch.load(..., weights_only=True)`` loads it and a pickled object that would run code is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from revlit.io import atomic_save, sha256_file

CLASSIFIER_FORMAT = "revlit-classifier/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe or of the wrong kind (message is one line)."""


def safe_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True, map_location='cpu')`` with one-line errors.

    Raises:
        CheckpointError: the file does not exist, or holds objects that ``weights_only`` refuses
            (e.g. a pickled class whose unpickling would run code).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError with a long multi-line text
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing to load {p}: not a weights-only checkpoint ({first})"
        ) from None


def save_classifier(
    model: nn.Module,
    path: str | os.PathLike,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    meta: dict | None = None,
) -> str:
    """Write a classifier checkpoint and return its sha256.

    ``arch``/``arch_kwargs`` default to ``model.arch_spec()`` (a :class:`Classifier`).
    """
    if arch is None:
        arch, arch_kwargs = model.arch_spec()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    obj = {
        "format": CLASSIFIER_FORMAT,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "state_dict": state,
        "meta": dict(meta or {}),
    }
    atomic_save(obj, p)
    return sha256_file(p)


def load_classifier(path: str | os.PathLike | dict) -> tuple[nn.Module, dict]:
    """Load a classifier: a revlit checkpoint, or a user module / RobustBench model spec.

    ``path`` is a revlit checkpoint file, or a spec of :func:`revlit.models.external.load_external`
    (``{"class_path": ..., "init_args": ..., "weights": ...}``, ``"pkg.mod.Net:weights.pt"``,
    ``"robustbench:<name>[:Linf|L2]"``).

    Returns:
        ``(model, info)`` where the model is in eval mode and ``info`` holds ``arch``,
        ``arch_kwargs``, ``meta``, ``path`` and ``sha256`` (of the weights file).
    """
    from revlit.models.external import is_external_spec, load_external
    from revlit.models.registry import build

    if is_external_spec(path):
        return load_external(path)
    obj = safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(
            f"{path} is not a revlit classifier checkpoint (expected format {CLASSIFIER_FORMAT})"
        )
    model = build(obj["arch"], **obj["arch_kwargs"])
    model.load_state_dict(obj["state_dict"])
    model.eval()
    info = {
        "arch": obj["arch"],
        "arch_kwargs": obj["arch_kwargs"],
        "meta": obj.get("meta", {}),
        "path": str(path),
        "sha256": sha256_file(path),
    }
    return model, info
