"""DefenseWriter: merge the DefenseModule's per-rank predictions into one run folder + records.

Writes (rank 0, once, after the ranks' part files are merged and ordered by test index)::

    <output_dir>/predictions.pt     dict of tensors (index, label, pred, loss, pred_def, ...)
    <output_dir>/predictions.csv    one row per test image
    <output_dir>/record_none.json   the undefended row (see revlit.records)
    <output_dir>/record_<defense>.json   the defended row (reverse or noise)
    <output_dir>/records.jsonl      both rows, one per line

Each test index appears once: DDP's sampler repeats a few examples to even the shards and the merge
keeps one copy (:func:`revlit.callbacks.writers.merge_by_index`).
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path

import torch

from revlit.callbacks.writers import RankMergeWriter
from revlit.io import atomic_path, atomic_save
from revlit.records import attack_from_meta, make_record, save_jsonl, save_record

log = logging.getLogger("revlit")

CSV_COLUMNS = (
    "index",
    "label",
    "pred",
    "loss",
    "pred_def",
    "loss_def",
    "ssl_before",
    "ssl_after",
    "delta_linf",
    "delta_l2",
    "selected_step",
)


def write_csv(merged: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """The per-example columns of ``merged`` that exist, as CSV (atomic rename)."""
    cols = [c for c in CSV_COLUMNS if c in merged]
    data = [merged[c].tolist() for c in cols]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row in zip(*data):
            w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    return Path(path)


def records_from_predictions(
    merged: dict[str, torch.Tensor],
    module,
    datamodule=None,
    wall_seconds: float | None = None,
    world_size: int = 1,
) -> list[dict]:
    """The result records (undefended row, then the defended row) of a merged predict run.

    Args:
        merged: the DefenseModule's merged outputs (one row per test index).
        module: the :class:`revlit.modules.defense.DefenseModule` that produced them.
        datamodule: the data module (for the split's name, metadata, subset and batch size).
        wall_seconds: wall-clock seconds of the whole predict run (all ranks in parallel).
        world_size: number of ranks.
    """
    n = int(merged["index"].numel())
    if n == 0:
        raise ValueError("the defense produced no predictions")
    split = str(getattr(datamodule, "eval_set", "unknown"))
    meta = getattr(datamodule, "eval_meta", None)
    bs = getattr(datamodule, "eval_batch_size", None)
    data = {
        "split": split,
        "source": "CIFAR-10 test set" if split == "clean" else "stored set",
        "n": n,
        "test_subset": getattr(datamodule, "test_subset", None),
        "first_index": int(merged["index"].min()),
        "last_index": int(merged["index"].max()),
    }
    attack = attack_from_meta(split, meta)
    ci, hi = module.classifier_info, module.head_info
    classifier = {"path": ci["path"], "sha256": ci["sha256"], "arch": ci.get("arch")}
    head = {
        "path": hi["path"],
        "sha256": hi["sha256"],
        "classifier_sha256": hi.get("classifier_sha256"),
    }
    label = merged["label"]
    wall = wall_seconds / n if wall_seconds is not None else None
    common = {"batch_size": bs, "world_size": world_size}

    def mean(key: str) -> float:
        return float(merged[key].double().mean())

    rows = [
        make_record(
            classifier=classifier,
            head=head,
            data=data,
            attack=attack,
            defense={**module.defense_settings(), "method": "none", **common},
            n=n,
            accuracy=float((merged["pred"] == label).double().mean()),
            loss=mean("loss"),
            ssl_loss_before=mean("ssl_before"),
            ssl_loss_after=mean("ssl_before"),
            seconds_per_image=mean("sec_none"),
            wall_seconds_per_image=wall,
            passes_per_image=module.passes_per_image("none"),
        )
    ]
    if module.defense.method != "none":
        rows.append(
            make_record(
                classifier=classifier,
                head=head,
                data=data,
                attack=attack,
                defense={**module.defense_settings(), **common},
                n=n,
                accuracy=float((merged["pred_def"] == label).double().mean()),
                loss=mean("loss_def"),
                ssl_loss_before=mean("ssl_before"),
                ssl_loss_after=mean("ssl_after"),
                seconds_per_image=mean("sec_def"),
                wall_seconds_per_image=wall,
                passes_per_image=module.passes_per_image(),
            )
        )
    return rows


class DefenseWriter(RankMergeWriter):
    """Per-rank parts, one merge by test index, then predictions + CSV + JSON records.

    Args:
        output_dir: the run's folder, e.g. ``results/<run>``; default ``results/<logger name>``
            (revlit's CLI names the logger after ``--run_name``), else ``results/defense``.
        write_csv: also write ``predictions.csv``.
        overwrite, resume: see :class:`revlit.callbacks.writers.RankMergeWriter`.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        write_csv: bool = True,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        super().__init__(output_dir or "results/defense", overwrite, resume)
        self.explicit_dir = output_dir is not None
        self.result_dir = self.output_dir  # where the result lands (finalize writes a staging copy)
        self.write_csv = write_csv
        self.records: list[dict] = []
        self.t0: float | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        name = getattr(trainer.logger, "name", None) if trainer.logger is not None else None
        if not self.explicit_dir and name:
            self.output_dir = Path("results") / str(name)

    def on_predict_start(self, trainer, pl_module) -> None:
        self.t0, self.records, self.merged = time.perf_counter(), [], None
        self.result_dir = self.output_dir

    def finalize(self, merged: dict[str, torch.Tensor], trainer, pl_module) -> None:
        wall = time.perf_counter() - self.t0 if self.t0 is not None else None
        out = self.output_dir
        atomic_save(merged, out / "predictions.pt")
        if self.write_csv:
            write_csv(merged, out / "predictions.csv")
        dm = getattr(trainer, "datamodule", None)
        self.records = records_from_predictions(merged, pl_module, dm, wall, trainer.world_size)
        for rec in self.records:
            save_record(rec, out / f"record_{rec['defense']['method']}.json")
        save_jsonl(self.records, out / "records.jsonl")
        for rec in self.records:
            log.info(
                "%s, defense %s: accuracy %.4f, CE %.4f, SSL %.4f -> %.4f (n=%d, %.4g s/img)",
                rec["data"]["split"], rec["defense"]["method"], rec["accuracy"], rec["loss"],
                rec["ssl_loss_before"], rec["ssl_loss_after"], rec["n"], rec["seconds_per_image"],
            )  # fmt: skip
        if wall:
            log.info(
                "wrote %s (%d images, %.1f images/s over the run)",
                self.result_dir,
                len(merged["index"]),
                len(merged["index"]) / wall,
            )
