"""Prediction writers: finished batches kept as parts, merged once on rank 0, ordered by test index.

``predict_step`` of every revlit module returns a dict of tensors whose first dimension is the
batch and which holds an ``"index"`` entry (the CIFAR-10 test index of each row). Under DDP each
rank sees a different shard (and Lightning's sampler may repeat a few indices to even the shards).
:class:`RankMergeWriter`

* refuses an existing result folder before any batch runs, unless ``overwrite`` (replace it when
  the new one is complete) or ``resume`` (keep it if it was made with the same settings);
* keeps every finished batch as a part file (:class:`revlit.parts.PartStore`) keyed by the run's
  settings (``pl_module.run_settings()`` plus the data's identity) and the batch's indices, in
  ``.<name>.partial/parts`` beside the result folder; a module whose ``predict_step`` starts with
  :func:`finished_batch` skips every batch a killed run of the same settings finished;
* waits for all ranks, and rank 0 merges the parts this run used (sorted by index, each index once),
  hands them to :meth:`RankMergeWriter.finalize`, which writes into a staging folder, and moves
  that folder into place whole (:func:`revlit.io.replace_dir`): a folder that looks complete is
  complete, and a kill at any moment leaves the previous result or the new one.

Assumes all ranks share a filesystem (one node).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from revlit.io import atomic_save, atomic_write_json, canonical_hash, recover_dir, replace_dir
from revlit.parts import PartStore

RUN_FILE = "run.json"  # in a finished result folder: the settings and their hash


def concat_outputs(outputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate a list of per-batch output dicts along the batch dimension."""
    outputs = [o for o in outputs if o]
    if not outputs:
        return {}
    keys = outputs[0].keys()
    return {k: torch.cat([o[k].detach().cpu() for o in outputs]) for k in keys}


def merge_by_index(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Merge per-rank dicts: sort rows by ``index`` and keep the first row of each index."""
    merged = concat_outputs(parts)
    if not merged:
        return merged
    idx = merged["index"]
    order = torch.argsort(idx, stable=True)
    sorted_idx = idx[order]
    keep = torch.ones_like(sorted_idx, dtype=torch.bool)
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]
    sel = order[keep]
    return {k: v[sel] for k, v in merged.items()}


def run_settings(trainer, pl_module) -> dict | None:
    """What a run's outputs depend on: the module's ``run_settings()`` and the data's identity.

    None when the module does not describe its settings (its batches are then never reused).
    """
    describe = getattr(pl_module, "run_settings", None)
    if describe is None:
        return None
    dm = getattr(trainer, "datamodule", None)
    data = dm.data_identity() if hasattr(dm, "data_identity") else None
    # the trainer's precision (e.g. bf16-mixed autocast) changes the outputs too
    return {"module": describe(), "data": data, "precision": str(getattr(trainer, "precision", ""))}


def finished_batch(trainer, index: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The outputs of a batch a :class:`RankMergeWriter` of this trainer already holds, or None.

    Modules call it first in ``predict_step``: ``if (done := finished_batch(self.trainer, idx))
    is not None: return done``.
    """
    for cb in getattr(trainer, "callbacks", None) or ():
        if isinstance(cb, RankMergeWriter) and cb.store is not None:
            return cb.lookup(index)
    return None


class RankMergeWriter(BasePredictionWriter):
    """Base writer: parts per finished batch, one merge on rank 0, then :meth:`finalize`.

    Args:
        output_dir: folder of this run's results, written whole when the run completes.
        overwrite: replace an existing result folder (it stays in place until the new one is
            complete).
        resume: accept an existing result folder made with the same settings (its rows are
            reused, nothing is recomputed); refused if it was made with other settings.
    """

    def __init__(self, output_dir: str, overwrite: bool = False, resume: bool = False) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.output_dir = Path(output_dir)
        self.overwrite, self.resume = bool(overwrite), bool(resume)
        self.merged: dict[str, torch.Tensor] | None = None
        self.store: PartStore | None = None
        self.settings: dict | None = None
        self._previous: dict[str, torch.Tensor] | None = None
        self._used: list[str] = []

    # ------------------------------------------------------------------ folders
    def staging_dir(self) -> Path:
        """``.<name>.partial`` beside the result folder: parts and the result being written."""
        return self.output_dir.with_name(f".{self.output_dir.name}.partial")

    def check_output(self, settings: dict | None) -> None:
        """Refuse an existing result folder unless ``overwrite``/``resume`` (one-line error)."""
        recover_dir(self.output_dir)
        out = self.output_dir
        if not out.exists() or self.overwrite:
            return
        if not self.resume:
            raise ValueError(
                f"output folder {out} already exists: pass overwrite (replace it) or resume "
                "(keep it if made with the same settings), or choose another folder"
            )
        made = _read_run(out)
        if settings is None or made.get("key") != canonical_hash(settings):
            raise ValueError(
                f"output folder {out} was made with other settings; cannot resume it: pass "
                "overwrite to replace it, or choose another folder"
            )
        self._previous = self.previous_outputs(out)

    def previous_outputs(self, folder: Path) -> dict[str, torch.Tensor] | None:
        """The merged rows of a finished result folder (to serve on resume), or None."""
        p = folder / "predictions.pt"
        return torch.load(p, map_location="cpu", weights_only=True) if p.is_file() else None

    # ------------------------------------------------------------------ hooks
    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.settings = run_settings(trainer, pl_module)
        self._previous, self._used, self.merged = None, [], None
        self.check_output(self.settings)
        # without settings nothing may be reused: one key, emptied first
        self.store = PartStore(self.staging_dir() / "parts", self.settings or {"settings": None})
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.store.prune()  # parts of other settings are never reused
            if self.settings is None:
                self.store.clear()
        trainer.strategy.barrier()

    def lookup(self, index: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """A finished batch: from this settings' parts, or from the result folder on resume."""
        out = self.store.get(index) if self.store is not None else None
        if out is None and self._previous is not None:
            prev = self._previous
            pos = torch.searchsorted(prev["index"], index.cpu().long())
            pos = pos.clamp(max=len(prev["index"]) - 1)
            if torch.equal(prev["index"][pos], index.cpu().long()):
                out = {k: v[pos] for k, v in prev.items()}
        return out

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not prediction or self.store is None:
            return
        path = self.store._path(prediction["index"])
        if not path.is_file():
            self.store.put(prediction)
        self._used.append(path.name)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        folder = self.store.folder
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._used, folder / f"used-rank{rank}.json")
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            names = []
            for r in range(world):
                names += json.loads((folder / f"used-rank{r}.json").read_text())
            parts = [
                torch.load(folder / n, map_location="cpu", weights_only=True)["outputs"]
                for n in dict.fromkeys(names)
            ]
            self.merged = merge_by_index(parts)
            self._write_result(self.merged, trainer, pl_module)
            shutil.rmtree(self.staging_dir(), ignore_errors=True)
        trainer.strategy.barrier()

    def _write_result(self, merged, trainer, pl_module) -> None:
        final, stage = self.output_dir, self.staging_dir() / "result"
        shutil.rmtree(stage, ignore_errors=True)
        self.output_dir = stage  # finalize writes into the staging folder
        try:
            self.finalize(merged, trainer, pl_module)
            if stage.exists():
                if self.settings is not None:
                    run = {"key": canonical_hash(self.settings), "settings": self.settings}
                    atomic_write_json(run, stage / RUN_FILE, default=str)
                replace_dir(stage, final)
        finally:
            self.output_dir = final

    def finalize(self, merged: dict[str, torch.Tensor], trainer, pl_module) -> None:
        """Write the merged outputs into ``self.output_dir`` (rank 0 only; the folder is moved
        into place when this returns). Default: ``predictions.pt``."""
        atomic_save(merged, self.output_dir / "predictions.pt")


def _read_run(folder: Path) -> dict:
    try:
        return json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
