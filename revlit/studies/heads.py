"""Heads trained by the studies (1: one per loss; 2b: one per training batch), at an equal budget.

Each head is trained by :class:`revlit.modules.ssl_head.SSLHeadModule` (the same module and
defaults as ``configs/ssl/resnet20_at.yaml``: frozen eval classifier, head 64 -> 256 -> BN -> ReLU
-> 16, 2 SimCLR views in ``shared`` mode, Adam) under a Lightning ``Trainer`` for
``budget // batch_size`` steps, so every head sees the same number of training images with the
same seed. Heads are cached under ``<out>/heads/<key>.pt`` (a normal head checkpoint tied to the
classifier's sha256, its spec in ``meta["spec"]``) and reused by later runs with the same spec.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from revlit.models.checkpoint import CheckpointError
from revlit.ssl.head import load_head


@dataclass
class HeadSpec:
    """How a study head is trained (``budget`` = training images seen, batch x steps)."""

    loss: str = "nt_xent"
    batch_size: int = 256
    budget: int = 61_440
    lr: float = 1e-3
    seed: int = 0
    temperature: float = 0.2
    n_views: int = 2
    hidden_dim: int = 256
    out_dim: int = 16
    view_mode: str = "shared"

    @property
    def steps(self) -> int:
        return max(1, self.budget // self.batch_size)

    def key(self) -> str:
        return (
            f"{self.loss}_b{self.batch_size}_img{self.budget}_lr{self.lr:g}_s{self.seed}"
            f"_h{self.hidden_dim}x{self.out_dim}_v{self.n_views}{self.view_mode[0]}"
        )


def train_head(
    spec: HeadSpec,
    classifier: str,
    heads_dir: str | Path,
    data_dir: str | None = None,
    val_size: int = 5000,
    log=None,
) -> tuple[torch.nn.Module, dict]:
    """Train (or reuse) the head of ``spec`` on the frozen ``classifier``; return ``load_head``'s pair.

    Args:
        spec: loss, batch, budget, lr, seed, ...
        classifier: classifier checkpoint path.
        heads_dir: cache folder.
        data_dir: CIFAR-10 folder (default ``$REVLIT_DATA_DIR``).
        val_size: training images held out (as the DataModule's default split; never evaluated).
        log: callable for one-line progress messages.
    """
    import pytorch_lightning as pl

    from revlit.data.datamodule import CIFAR10DataModule
    from revlit.losses import ContrastiveLoss
    from revlit.modules.ssl_head import SSLHeadModule
    from revlit.ssl.head import SSLHead, save_head
    from revlit.ssl.views import SimCLRViews

    path = Path(heads_dir) / f"{spec.key()}.pt"
    want = asdict(spec)
    if path.is_file():
        try:
            from revlit.models.checkpoint import sha256_file

            head, info = load_head(path, sha256_file(classifier))
            if info["meta"].get("spec") == want:
                if log:
                    log(f"head {spec.key()}: reusing {path}")
                return head, info
        except CheckpointError:
            pass
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "revlit"):
        logging.getLogger(name).setLevel(logging.WARNING)
    pl.seed_everything(spec.seed, verbose=False)
    module = SSLHeadModule(
        classifier=classifier,
        head=SSLHead(_feature_dim(classifier), spec.hidden_dim, spec.out_dim),
        loss=ContrastiveLoss(spec.loss, spec.temperature),
        views=SimCLRViews(mode=spec.view_mode),
        n_views=spec.n_views,
        lr=spec.lr,
        views_seed=spec.seed,
        export_path=None,
    )
    dm = CIFAR10DataModule(
        data_dir=data_dir, batch_size=spec.batch_size, augment=False, val_size=val_size
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=spec.steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if log:
        log(f"head {spec.key()}: training {spec.steps} steps of {spec.batch_size}")
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - t0
    last = trainer.callback_metrics.get("train/loss")
    meta = {
        "stage": "study_head",
        "spec": want,
        "loss": spec.loss,
        "temperature": spec.temperature,
        "n_views": spec.n_views,
        "views": repr(module.views),
        "batch_size": spec.batch_size,
        "steps": int(trainer.global_step),
        "train_loss_last": None if last is None else float(last),
        "seconds": round(seconds, 1),
        "classifier_path": str(classifier),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_head(module.head, path, module.classifier_info["sha256"], meta)
    if log:
        log(f"head {spec.key()}: {trainer.global_step} steps in {seconds:.0f} s")
    return load_head(path, module.classifier_info["sha256"])


def _feature_dim(classifier: str) -> int:
    from revlit.models.checkpoint import load_classifier

    net, _ = load_classifier(classifier)
    return int(net.feature_dim)
