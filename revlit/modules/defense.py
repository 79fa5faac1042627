"""DefenseModule: classify test batches without and with an injected test-time defense.

Orchestration only: loads the classifier and its SSL head, binds the YAML-selected
:class:`revlit.defenses.Defense` (:class:`~revlit.defenses.ReversePurifier`, the reverse attack of
Mao et al., ICCV 2021; ``RandomNoise``; ``NoDefense``) and runs the one defended-evaluation loop,
:func:`revlit.defenses.evaluate.defend_batch`, in ``predict`` (rows for the DefenseWriter) and
``test`` (torchmetrics). Seeding: :mod:`revlit.seeding`; results depend on the per-device batch
size (the negatives), not on rank or order.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
import torchmetrics

from revlit.callbacks.writers import finished_batch
from revlit.defenses import Defense
from revlit.defenses.evaluate import bind_defense, check_batches, defend_batch
from revlit.models.checkpoint import load_classifier
from revlit.seeding import BATCH_SEEDING
from revlit.ssl.head import load_head

log = logging.getLogger("revlit")
INFERENCE_MODE_MSG = (
    "DefenseModule needs input gradients (the reverse attack), but the Trainer runs {stage} under "
    "torch.inference_mode: pass --trainer.inference_mode false (revlit's CLI default)"
)


class DefenseModule(pl.LightningModule):
    """Evaluate a classifier without and with a test-time defense (``predict`` and ``test``).

    Args:
        classifier: any classifier spec of :func:`revlit.models.load_classifier`.
        head: SSL head checkpoint trained on that classifier (:func:`revlit.ssl.load_head`).
        defense: the defense and its settings; default ``ReversePurifier()`` at its defaults.
            A reverse attack without its own ``loss``/``views`` gets the head's recorded ones.
        seed: run seed; each batch's generator is seeded from (seed, first test index).
        allow_mismatch: accept a head trained on another classifier, and a stored set made
            against another classifier.
        viz_images: images kept from each rank's first batch for the defense grid (0 = none).
    """

    def __init__(
        self,
        classifier: str | dict,
        head: str,
        defense: Defense | None = None,
        seed: int = 0,
        allow_mismatch: bool = False,
        viz_images: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["defense"])
        self.seed, self.viz_images = int(seed), int(viz_images)
        net, self.classifier_info = load_classifier(classifier)
        head_net, self.head_info = load_head(
            head, self.classifier_info["sha256"], allow_mismatch=allow_mismatch
        )
        if self.head_info.get("classifier_sha256") != self.classifier_info["sha256"]:
            log.warning("SSL head %s was trained on another classifier (allow_mismatch)", head)
        self.net = net.requires_grad_(False).to(memory_format=torch.channels_last).eval()
        self.head = head_net.requires_grad_(False).eval()
        self.defense, self.probe, self.ssl_setting = bind_defense(
            defense, self.net, self.head, self.head_info
        )
        nc = getattr(net, "num_classes", 10)
        self.acc, self.acc_def = (torchmetrics.Accuracy("multiclass", num_classes=nc) for _ in "ab")
        self.ce, self.ce_def, self.ssl_before, self.ssl_after = (
            torchmetrics.MeanMetric() for _ in "abcd"
        )
        #: this rank's first batch (images, labels, predictions) for the defense grid
        self.viz: dict[str, torch.Tensor] | None = None
        #: this rank's per-image SSL losses (before, after) of the current run, for histograms
        self.ssl_seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def defense_settings(self) -> dict:
        """Settings of the defense for records (method, ball, steps, views, loss, seed)."""
        return {**self.defense.settings(), **self.ssl_setting, "seed": self.seed,
                "seeding": BATCH_SEEDING, "trainer_precision": getattr(self._trainer, "precision", None)}  # fmt: skip

    def passes_per_image(self, method: str | None = None) -> int:
        """Backbone passes per image of the defended prediction (``"none"``: the plain one)."""
        return 1 if method == "none" else self.defense.passes_per_image()

    def setup(self, stage: str) -> None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or stage not in ("predict", "test"):
            return
        self._check_grad_mode(stage)
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "check_classifier"):
            dm.check_classifier(self.classifier_info["sha256"])
        ds, bs = getattr(dm, "test_set", None), getattr(dm, "eval_batch_size", None)
        if ds is not None and bs:
            check_batches(len(ds), int(bs), trainer.world_size)

    def _check_grad_mode(self, stage: str) -> None:
        loop = getattr(self.trainer, f"{stage}_loop", None)
        inference = getattr(loop, "inference_mode", False) or torch.is_inference_mode_enabled()
        if inference and self.defense.needs_grad:
            raise ValueError(INFERENCE_MODE_MSG.format(stage=stage))

    def _start(self, stage: str) -> None:
        self._check_grad_mode(stage)
        self.viz, self.ssl_seen = None, []

    def on_predict_start(self) -> None:
        self._start("predict")

    def on_test_start(self) -> None:
        self._start("test")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def defend_batch(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> dict:
        """Per-example results of one batch (see :class:`revlit.defenses.evaluate.BatchResult`)."""
        res = defend_batch(self.net, self.defense, x, y, idx, self.seed, self.probe)
        out = res.rows
        if self.viz_images > 0 and self.viz is None:
            k = min(self.viz_images, len(y))
            keep = {"x": x, "x_def": res.images[self.defense.steps], "index": idx, "label": y}
            keep |= {"pred": out["pred"], "pred_def": out["pred_def"]}
            self.viz = {key: v[:k].detach().cpu() for key, v in keep.items()}
        self.ssl_seen.append((out["ssl_before"].cpu(), out["ssl_after"].cpu()))
        return out

    def run_settings(self) -> dict:
        """What the outputs depend on, the key of finished batches kept for resume."""
        shas = {"classifier": self.classifier_info["sha256"], "head": self.head_info["sha256"]}
        return {**self.defense_settings(), "sha256": shas}

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        if (done := finished_batch(self._trainer, batch[2])) is not None:
            return done  # kept by a killed run of the same settings
        return {k: v.cpu() for k, v in self.defend_batch(*batch).items()}

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        out, tag = self.defend_batch(*batch), self.defense.method
        for name, metric, key in (
            ("acc", self.acc, "pred"), (f"acc_{tag}", self.acc_def, "pred_def"),
            ("loss", self.ce, "loss"), (f"loss_{tag}", self.ce_def, "loss_def"),
            ("ssl_before", self.ssl_before, "ssl_before"),
            (f"ssl_after_{tag}", self.ssl_after, "ssl_after"),
        ):  # fmt: skip
            metric(out[key], out["label"]) if key.startswith("pred") else metric(out[key])
            self.log(f"test/{name}", metric, prog_bar=name == f"acc_{tag}", sync_dist=True)
