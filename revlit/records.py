"""The JSON result record: one object per evaluated (data split, defense) row.

A record says exactly what was measured, on what, with which code, so a number in a table can be
traced back and rerun::

    {
      "format": "revlit-result/1",
      "classifier": {"path", "sha256", "arch"},
      "head":       {"path", "sha256", "classifier_sha256"} | null,
      "data":       {"split", "source", "n", "test_subset", "first_index", "last_index"},
      "attack":     {"name", "kind", "norm", "eps", "step_size", "steps", "restarts", "loss",
                     "made_for_sha256", ...} (kind "none" for clean data),
      "defense":    {"method": "none"|"reverse"|"noise", ... settings, "batch_size", "seed",
                     "loss", "world_size"},
      "n", "accuracy", "loss", "ssl_loss_before", "ssl_loss_after",
      "seconds_per_image", "wall_seconds_per_image", "passes_per_image",
      "commit", "date"
    }

``accuracy`` is the fraction of the ``n`` examples classified correctly, ``loss`` the mean
cross-entropy; the SSL losses are per-image contrastive losses averaged over the split (before =
the input as given, after = the defended input, both measured on the same draw of views).
``first_index``/``last_index`` are the CIFAR-10 test indices covered; ``seconds_per_image`` is
compute time per image on one device; ``wall_seconds_per_image`` the run's wall time divided by n
(all ranks together).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from revlit.io import atomic_write_json, atomic_write_text

RECORD_FORMAT = "revlit-result/1"

#: top-level fields every record carries (values may be null only where noted in the docstring)
FIELDS = (
    "format",
    "classifier",
    "head",
    "data",
    "attack",
    "defense",
    "n",
    "accuracy",
    "loss",
    "ssl_loss_before",
    "ssl_loss_after",
    "seconds_per_image",
    "wall_seconds_per_image",
    "passes_per_image",
    "commit",
    "date",
)
#: required keys of the nested objects
NESTED = {
    "classifier": ("path", "sha256"),
    "head": ("path", "sha256"),
    "data": ("split", "n"),
    "attack": ("name", "kind"),
    "defense": ("method", "batch_size", "seed"),
}
#: attack settings copied from a stored set's meta.json, when present
ATTACK_KEYS = (
    "norm",
    "eps",
    "step_size",
    "steps",
    "restarts",
    "loss",
    "seed",
    "random_start",
    "l1_topk",
    "accuracy",
    "clean_accuracy",
    "commit",
    "date",
)
NUMBERS = ("accuracy", "loss", "ssl_loss_before", "ssl_loss_after", "seconds_per_image")


def now_iso() -> str:
    """UTC date and time, ISO 8601, seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def attack_from_meta(split: str, meta: dict | None) -> dict:
    """The ``attack`` object of a record from a data split's metadata.

    Args:
        split: ``"clean"`` or a stored set's name/path.
        meta: the stored set's ``meta.json`` (``None`` or ``{"name": "clean"}`` for clean data).

    Returns:
        ``{"name", "kind", ...}``: kind ``none`` for clean data; ``adaptive`` if the meta says
        the attack targeted the defense (``"adaptive": true``), else ``transfer`` (made against
        the undefended classifier, the setting of the stored sets); plus the attack's settings and
        the sha256 of the classifier it was made against.
    """
    meta = dict(meta or {})
    if split == "clean" or (meta.get("name") == "clean" and "norm" not in meta):
        return {"name": "none", "kind": "none"}
    out = {"name": meta.get("name", Path(split).name)}
    out["kind"] = "adaptive" if meta.get("adaptive") else "transfer"
    for k in ATTACK_KEYS:
        if k in meta:
            out[k] = meta[k]
    out["made_for_sha256"] = meta.get("classifier_sha256")
    return out


def _finite(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def make_record(
    *,
    classifier: dict,
    head: dict | None,
    data: dict,
    attack: dict,
    defense: dict,
    n: int,
    accuracy: float,
    loss: float,
    ssl_loss_before: float | None,
    ssl_loss_after: float | None,
    seconds_per_image: float,
    passes_per_image: float,
    wall_seconds_per_image: float | None = None,
    commit: str | None = None,
    date: str | None = None,
) -> dict:
    """Build and validate one record (see the module docstring for the fields).

    ``commit`` defaults to :func:`revlit.callbacks.export.git_commit`, ``date`` to now (UTC).

    Raises:
        ValueError: a field is missing or malformed (one line).
    """
    if commit is None:
        from revlit.io import git_commit

        commit = git_commit()
    rec = {
        "format": RECORD_FORMAT,
        "classifier": dict(classifier),
        "head": dict(head) if head is not None else None,
        "data": dict(data),
        "attack": dict(attack),
        "defense": dict(defense),
        "n": int(n),
        "accuracy": float(accuracy),
        "loss": float(loss),
        "ssl_loss_before": _finite(ssl_loss_before),
        "ssl_loss_after": _finite(ssl_loss_after),
        "seconds_per_image": float(seconds_per_image),
        "wall_seconds_per_image": _finite(wall_seconds_per_image),
        "passes_per_image": float(passes_per_image),
        "commit": commit,
        "date": date or now_iso(),
    }
    validate_record(rec)
    return rec


def validate_record(rec: dict) -> None:
    """Check that a record has every field and sane values.

    Raises:
        ValueError: one line naming the first problem.
    """
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be a dict, got {type(rec).__name__}")
    missing = [f for f in FIELDS if f not in rec]
    if missing:
        raise ValueError(f"record is missing field(s): {', '.join(missing)}")
    if rec["format"] != RECORD_FORMAT:
        raise ValueError(f"record format must be {RECORD_FORMAT}, got {rec['format']!r}")
    for key, sub in NESTED.items():
        obj = rec[key]
        if obj is None and key == "head":
            continue
        if not isinstance(obj, dict):
            raise ValueError(f"record field '{key}' must be an object, got {type(obj).__name__}")
        lacking = [s for s in sub if s not in obj]
        if lacking:
            raise ValueError(f"record field '{key}' lacks {', '.join(lacking)}")
    if not isinstance(rec["n"], int) or rec["n"] < 1:
        raise ValueError(f"record n must be a positive integer, got {rec['n']!r}")
    if not 0.0 <= rec["accuracy"] <= 1.0:
        raise ValueError(f"record accuracy must be in [0, 1], got {rec['accuracy']}")
    for k in NUMBERS:
        v = rec[k]
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise ValueError(f"record {k} must be a finite number, got {v!r}")
    if not rec["commit"] or not rec["date"]:
        raise ValueError("record needs a commit and a date")


def save_record(rec: dict, path: str | os.PathLike) -> Path:
    """Validate and write one record as pretty JSON (atomic rename). Returns the path."""
    validate_record(rec)
    return atomic_write_json(rec, path, sort_keys=True)


def load_record(path: str | os.PathLike) -> dict:
    """Read and validate one record."""
    rec = json.loads(Path(path).read_text())
    validate_record(rec)
    return rec


def save_jsonl(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write records one per line (validated), atomically."""
    recs = list(records)
    for r in recs:
        validate_record(r)
    return atomic_write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in recs), path)


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown_table(records: Sequence[dict]) -> str:
    """The records as a markdown table: one row per (split, defense)."""
    head = (
        "| split | attack | defense | n | accuracy | CE loss | SSL loss before | SSL loss after "
        "| s / image | passes / image |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in records:
        a = r["attack"]
        if a.get("kind") == "none":
            attack = "none"
        else:
            eps = a.get("eps")
            eps_s = (
                f" ε={eps * 255:.3g}/255"
                if a.get("norm") == "l_inf" and eps
                else (f" ε={eps:.3g}" if eps else "")
            )
            attack = f"{a.get('norm', '?')}{eps_s}, {a.get('steps', '?')} steps ({a['kind']})"
        d = r["defense"]
        if d["method"] == "reverse":
            deps = d.get("eps", 0)
            deps_s = f"{deps * 255:.3g}/255" if d.get("norm") == "l_inf" else f"{deps:.3g}"
            defense = (
                f"reverse ({d.get('norm')} {deps_s}, {d.get('steps')}×{d.get('n_views')} views)"
            )
        elif d["method"] == "noise":
            deps = d.get("eps", 0)
            deps_s = f"{deps * 255:.3g}/255" if d.get("norm") == "l_inf" else f"{deps:.3g}"
            defense = f"noise ({d.get('norm')} {deps_s})"
        else:
            defense = "none"
        rows.append(
            f"| {r['data']['split']} | {attack} | {defense} | {r['n']} | "
            f"{100 * r['accuracy']:.2f} % | {r['loss']:.4f} | {_fmt(r['ssl_loss_before'], '.4f')} | "
            f"{_fmt(r['ssl_loss_after'], '.4f')} | {r['seconds_per_image']:.4g} | "
            f"{r['passes_per_image']:.0f} |"
        )
    return head + "\n".join(rows) + "\n"
