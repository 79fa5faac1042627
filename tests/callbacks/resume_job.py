"""A small resumable job for the fault-injection tests: run in-process, or as a process to kill.

``python -m tests.callbacks.resume_job attack WORKDIR`` writes the stored set
``WORKDIR/pgd/killme`` (PGD on the tiny classifier and tiny CIFAR-10 of ``WORKDIR``);
``python -m tests.callbacks.resume_job evaluate WORKDIR`` writes ``WORKDIR/results/run``
through :class:`revlit.callbacks.writers.RankMergeWriter` with :class:`ToyDefense`;
``python -m tests.callbacks.resume_job defense WORKDIR`` writes ``WORKDIR/results/defense`` with
the DefenseModule (a short reverse attack) and its DefenseWriter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

N, BATCH, STEPS = 24, 4, 12


class ToyDefense(pl.LightningModule):
    """A defense-shaped module: per-batch randomness seeded by the batch's first test index and
    outputs that depend on the whole batch (as the purifier's negatives do)."""

    def __init__(self, classifier: str, seed: int = 0) -> None:
        super().__init__()
        from revlit.models import load_classifier

        self.net, self.info = load_classifier(classifier)
        self.seed = seed

    def run_settings(self) -> dict:
        return {"classifier_sha256": self.info["sha256"], "seed": self.seed, "method": "toy"}

    def predict_step(self, batch, batch_idx):
        from revlit.callbacks.writers import finished_batch

        x, y, idx = batch
        if (done := finished_batch(self._trainer, idx)) is not None:
            return done
        g = torch.Generator().manual_seed(self.seed * 100_003 + int(idx[0]))
        out = x
        for _ in range(STEPS):  # some work per batch, so a kill can land between batches
            noise = torch.rand(x.shape, generator=g) * 0.01
            out = (out + noise - out.mean(0, keepdim=True) * 0.01).clamp(0, 1)
            with torch.no_grad():
                logits = self.net(out)
        return {"index": idx, "label": y, "pred": logits.argmax(1), "logits": logits}


def trainer(callbacks) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def run(kind: str, workdir: str | Path) -> Path:
    """Run the job to completion; return the folder it writes."""
    from revlit.callbacks.adv_writer import AdvSetWriter
    from revlit.callbacks.writers import RankMergeWriter
    from revlit.data.datamodule import CIFAR10DataModule
    from revlit.modules.attack import AttackModule

    wd = Path(workdir)
    torch.set_num_threads(1)
    dm = CIFAR10DataModule(
        data_dir=str(wd / "cifar"), eval_set="clean", test_subset=N, eval_batch_size=BATCH
    )
    clf = str(wd / "clf.pt")
    if kind == "attack":
        module = AttackModule(classifier=clf, steps=STEPS, set_name="killme")
        writer = AdvSetWriter(root=str(wd / "pgd"))
        trainer([writer]).predict(module, datamodule=dm, return_predictions=False)
        return wd / "pgd" / "killme"
    if kind == "defense":
        from revlit.callbacks.defense_writer import DefenseWriter
        from revlit.defenses import ReversePurifier
        from revlit.modules.defense import DefenseModule

        purifier = ReversePurifier(steps=STEPS // 4, n_views=2)
        module = DefenseModule(clf, str(wd / "head.pt"), defense=purifier, seed=0)
        writer = DefenseWriter(str(wd / "results" / "defense"), resume=True)
        trainer([writer]).predict(module, datamodule=dm, return_predictions=False)
        return wd / "results" / "defense"
    writer = RankMergeWriter(str(wd / "results" / "run"), resume=True)
    trainer([writer]).predict(ToyDefense(clf), datamodule=dm, return_predictions=False)
    return wd / "results" / "run"


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
