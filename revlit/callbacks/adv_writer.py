"""AdvSetWriter: write the AttackModule's outputs as a stored adversarial set (``data/pgd/<name>/``).

Each finished batch is kept as a part file, rank 0 merges them by test index (each index once, see
:class:`revlit.callbacks.writers.RankMergeWriter`) and saves the set with
:func:`revlit.data.stored.save_stored_set` (temporary folder + rename: an existing set is replaced
only by a complete new one). ``meta.json`` records the classifier (path + sha256), the attack
(norm, ε, step, iterations, restarts, loss, seed), n, clean and adversarial accuracy, the mean
attack loss, wall-clock seconds and seconds per image, the git commit and the date.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from pathlib import Path

import torch

from revlit.callbacks.writers import RankMergeWriter
from revlit.data.stored import StoredSetError, load_stored_set, save_stored_set
from revlit.io import canonical_hash, git_commit, recover_dir

log = logging.getLogger("revlit")


class AdvSetWriter(RankMergeWriter):
    """Write a stored adversarial set under ``root/name``.

    An existing set of that name is refused before any batch runs, unless it was made with the
    same settings (attack, classifier, data) and holds no more images than this run makes, or
    ``overwrite`` is set (here or as the AttackModule's ``overwrite``). Finished batches of a
    killed run with the same settings are reused (see :class:`RankMergeWriter`).

    Args:
        root: folder of the stored sets (``data/pgd``; the DataModule's ``pgd_root``).
        name: the set's name; default: the AttackModule's ``set_name``
            (``--model.init_args.set_name``).
        overwrite: replace an existing set of that name whatever it holds.
    """

    def __init__(
        self, root: str = "data/pgd", name: str | None = None, overwrite: bool = False
    ) -> None:
        super().__init__(output_dir=str(Path(root) / (name or "_unnamed")), overwrite=overwrite)
        self.root, self.name = Path(root), name
        self.t0: float | None = None
        self.folder: Path | None = None
        self.meta: dict | None = None
        self.expected_n: int | None = None

    def resolve_name(self, pl_module) -> str:
        name = self.name or getattr(pl_module, "set_name", None)
        if not name:
            raise ValueError(
                "AdvSetWriter needs a set name (writer init arg name or model set_name)"
            )
        if "/" in name or name.startswith("."):
            raise ValueError(f"set name must be a plain folder name, got '{name}'")
        return name

    def setup(self, trainer, pl_module, stage: str) -> None:
        name = self.resolve_name(pl_module)
        self.folder = self.root / name
        self.output_dir = self.folder
        dm = getattr(trainer, "datamodule", None)
        test_set = getattr(dm, "test_set", None)
        self.expected_n = len(test_set) if test_set is not None else None

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.overwrite = self.overwrite or bool(getattr(pl_module, "overwrite", False))
        super().on_predict_epoch_start(trainer, pl_module)

    def check_output(self, settings: dict | None) -> None:
        """Refuse, before any work, an existing set this run may not replace (one line)."""
        recover_dir(self.folder)
        if self.overwrite or not self.folder.exists():
            return
        try:
            old = load_stored_set(self.folder, verify=False)
        except StoredSetError:
            old = None
        same = old is not None and settings is not None
        same = same and old.meta.get("settings_key") == canonical_hash(settings)
        more = old is not None and self.expected_n is not None and len(old) > self.expected_n
        if not same or more:
            why = "other settings" if not same else f"{len(old)} images, more than this run's"
            raise ValueError(
                f"stored set {self.folder} already exists ({why}); pass "
                "--model.init_args.overwrite true to replace it, or another set_name"
            )

    def on_predict_start(self, trainer, pl_module) -> None:
        self.t0 = time.time()

    def finalize(self, merged: dict[str, torch.Tensor], trainer, pl_module) -> None:
        seconds = time.time() - (self.t0 or time.time())
        n = len(merged.get("index", []))
        if n == 0:
            raise ValueError("AdvSetWriter: the attack produced no images")
        labels = merged["label"]
        adv_acc = float((merged["adv_pred"] == labels).float().mean())
        clean_acc = float((merged["clean_pred"] == labels).float().mean())
        cfg = pl_module.attack_config() if hasattr(pl_module, "attack_config") else {}
        dm = getattr(trainer, "datamodule", None)
        meta = {
            "name": self.folder.name,
            **cfg,
            "n": n,
            "clean_accuracy": clean_acc,
            "accuracy": adv_acc,
            "adv_loss_mean": float(merged["adv_loss"].float().mean()),
            "seconds": round(seconds, 2),
            "seconds_per_image": seconds / n,
            "world_size": trainer.world_size,
            "source": {
                "eval_set": getattr(dm, "eval_set", None),
                "test_subset": getattr(dm, "test_subset", None),
            },
            "commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if self.settings is not None:
            meta["settings_key"] = canonical_hash(self.settings)
        save_stored_set(
            self.folder, merged["image"], labels, merged["index"], meta, overwrite=self.overwrite
        )
        self.meta = meta
        log.info(
            "stored %d adversarial images in %s: clean acc %.4f, adversarial acc %.4f (%.1f s, %.4f s/img)",
            n, self.folder, clean_acc, adv_acc, seconds, seconds / n,
        )  # fmt: skip
        logger = trainer.logger
        if logger is not None:
            try:
                logger.log_metrics(
                    {
                        "attack/clean_acc": clean_acc,
                        "attack/adv_acc": adv_acc,
                        "attack/s_per_img": seconds / n,
                    },
                    step=0,
                )
            except Exception as e:  # logging must never lose a written set
                log.warning("could not log attack metrics: %s", e)
