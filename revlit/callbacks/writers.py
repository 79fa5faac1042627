"""Prediction writers: one part file per rank, merged once on rank 0, ordered by test index.

``predict_step`` of every revlit module returns a dict of tensors whose first dimension is the
batch and which holds an ``"index"`` entry (the CIFAR-10 test index of each row). Under DDP each
rank sees a different shard (and Lightning's sampler may repeat a few indices to even the shards);
:class:`RankMergeWriter` writes each rank's rows to ``<output_dir>/.parts/part-rank<r>.pt``, waits
for all ranks, and rank 0 concatenates the parts, sorts by index, keeps each index once and hands
the merged dict to :meth:`RankMergeWriter.finalize`. Assumes all ranks share a filesystem (one node).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from revlit.io import atomic_save


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


def _flatten(predictions) -> list[dict]:
    # Lightning gives a list of batch outputs, or a list of such lists (one per dataloader).
    if predictions and isinstance(predictions[0], list):
        return [o for dl in predictions for o in dl]
    return list(predictions or [])


class RankMergeWriter(BasePredictionWriter):
    """Base writer: per-rank part files, one merge on rank 0, then :meth:`finalize`.

    Args:
        output_dir: folder of this run's outputs; parts go to ``output_dir/.parts``.
    """

    def __init__(self, output_dir: str) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)
        self.merged: dict[str, torch.Tensor] | None = None

    def part_dir(self) -> Path:
        return self.output_dir / ".parts"

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        parts_dir = self.part_dir()
        if trainer.is_global_zero and parts_dir.exists():
            shutil.rmtree(parts_dir)
        trainer.strategy.barrier()
        atomic_save(concat_outputs(_flatten(predictions)), parts_dir / f"part-rank{rank}.pt")
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            parts = [
                torch.load(parts_dir / f"part-rank{r}.pt", weights_only=True) for r in range(world)
            ]
            self.merged = merge_by_index(parts)
            self.finalize(self.merged, trainer, pl_module)
            shutil.rmtree(parts_dir, ignore_errors=True)
        trainer.strategy.barrier()

    def finalize(self, merged: dict[str, torch.Tensor], trainer, pl_module) -> None:
        """Write the merged outputs (rank 0 only). Default: ``output_dir/predictions.pt``."""
        atomic_save(merged, self.output_dir / "predictions.pt")
