"""Checkpoint I/O for classifiers and heads: plain dicts of tensors, loaded with weights_only.

A revlit checkpoint is ``{"format": str, "arch": str, "arch_kwargs": dict, "state_dict": dict,
"meta": dict}`` containing only tensors, strings, numbers, lists and dicts, so
``torch.load(..., weights_only=True)`` loads it and a pickled object that would run code is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse NaN or infinite values in any floating tensor of ``tensors`` (a state dict).

    Raises:
        CheckpointError: one line naming ``what`` and the first offending tensor.
    """
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{what} has {bad} NaN/inf value(s) in '{name}': the weights are broken; "
                "retrain or re-export it"
            )


def save_classifier(
    model: nn.Module,
    path: str | os.PathLike,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    meta: dict | None = None,
) -> str:
    """Write a classifier checkpoint and return its sha256.

    ``arch``/``arch_kwargs`` default to ``model.arch_spec()`` (a :class:`Classifier`); ``arch``
    must be a registered name (:mod:`revlit.models.registry`), so the file loads again.
    """
    from revlit.models.registry import is_registered

    if arch is None:
        arch, arch_kwargs = model.arch_spec()
    if not is_registered(arch):
        raise CheckpointError(f"cannot save a classifier of unregistered architecture '{arch}'")
    p = Path(path)
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


def load_classifier(spec: str | os.PathLike | dict) -> tuple[nn.Module, dict]:
    """Load a classifier: the one entry point for every way of naming one.

    ``spec`` is a revlit checkpoint file, or a spec of :func:`revlit.models.external.load_external`
    (``{"class_path": ..., "init_args": ..., "weights": ...}``, ``"pkg.mod.Net:weights.pt"``,
    ``"robustbench:<name>[:Linf|L2]"``). A revlit checkpoint's architecture is looked up by name in
    :mod:`revlit.models.registry` (the file cannot choose code); a class path comes only from the
    user. Every classifier's weights must be finite.

    Returns:
        ``(model, info)`` where the model is in eval mode and ``info`` holds ``arch``,
        ``arch_kwargs``, ``meta``, ``path`` and ``sha256`` (of the weights file).

    Raises:
        CheckpointError: one line: missing or unsafe file, unregistered architecture, weights
            that do not fit it, NaN/inf weights.
    """
    from revlit.models.external import is_external_spec, load_external

    if is_external_spec(spec):
        model, info = load_external(spec)
    else:
        model, info = _load_revlit_classifier(spec)
    check_finite(model.state_dict(), f"classifier {info.get('path', spec)}")
    return model, info


def _load_revlit_classifier(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    from revlit.models.registry import build, is_registered

    obj = safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(
            f"{path} is not a revlit classifier checkpoint (expected format {CLASSIFIER_FORMAT})"
        )
    arch, kwargs, state = obj.get("arch"), obj.get("arch_kwargs", {}), obj.get("state_dict")
    if not is_registered(arch):
        raise CheckpointError(
            f"{path} names architecture {str(arch)[:80]!r}, which is not registered in "
            "revlit.models.registry; a user model needs an explicit class path and weights"
        )
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise CheckpointError(f"{path}: arch_kwargs must be a dict of named arguments")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict must be a dict of tensors")
    try:
        model = build(arch, **kwargs)
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as e:
        # load_state_dict's text is a header line, then one line per problem: show the first
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        detail = next((ln for ln in lines if not ln.startswith("Error(s)")), type(e).__name__)
        raise CheckpointError(f"{path}: weights do not fit {arch} ({detail[:160]})") from None
    model.eval()
    info = {
        "arch": arch,
        "arch_kwargs": kwargs,
        "meta": obj.get("meta", {}),
        "path": str(path),
        "sha256": sha256_file(path),
    }
    return model, info
