"""DefenseModule: classify test batches without and with a test-time defense, in one pass.

Orchestration only. The defense is :class:`revlit.defenses.ReversePurifier` (the reverse attack of
Mao et al., ICCV 2021) or :class:`revlit.defenses.RandomNoise` (its random-noise baseline); the
views, head and contrastive loss come from :mod:`revlit.ssl` and :mod:`revlit.losses`. For every
batch the module computes, per example: the prediction and cross-entropy of the classifier on the
input as given (no defense) and on the defended input, and the SSL loss before and after.

``predict`` returns those tensors (a :class:`revlit.callbacks.defense_writer.DefenseWriter` merges
the ranks and writes ``predictions.pt``/CSV/JSON records); ``test`` logs accuracy and losses with
and without the defense through torchmetrics.

Seeding: each batch gets its own CPU generator seeded from ``(seed, first test index of the
batch)``; the random start and every step's views are drawn from it. The contrastive loss takes
its negatives from the batch, so a result depends on the batch's composition (and hence on the
per-device batch size), but not on which rank or in which order a batch is processed.
"""

from __future__ import annotations

import logging
import re
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics

from revlit.defenses import RandomNoise, ReversePurifier, check_images
from revlit.defenses.reverse import RELU_FLOAT_MB
from revlit.losses import ContrastiveLoss
from revlit.models.checkpoint import load_classifier
from revlit.seeding import DIAG_SALT, batch_seed
from revlit.ssl.head import load_head
from revlit.ssl.views import SimCLRViews
from revlit.utils import as_float

log = logging.getLogger("revlit")

DEFENSES = ("reverse", "noise", "none")
INFERENCE_MODE_MSG = (
    "DefenseModule needs input gradients (the reverse attack), but the Trainer runs {stage} under "
    "torch.inference_mode: pass --trainer.inference_mode false (revlit's CLI default)"
)


def single_image_batches(n: int, batch_size: int, world_size: int = 1) -> list[int]:
    """Ranks whose last batch would hold exactly one image (no negatives for the SSL loss).

    Covers both samplers Lightning uses under DDP: predict shards without padding (rank r gets
    r, r + W, ...), test pads every shard to ceil(n / W).
    """
    w = max(int(world_size), 1)
    counts = {len(range(r, n, w)) for r in range(w)} | {-(-n // w)}
    return sorted(c for c in counts if c % batch_size == 1)


def _head_record(info: dict) -> dict:
    """Loss name, temperature and views mode the head was trained with, if its meta says so."""
    meta = info.get("meta") or {}
    out: dict = {}
    loss = meta.get("loss")
    if isinstance(loss, dict):  # e.g. {"name": ..., "temperature": ...}
        out["loss"] = loss.get("name")
        out["temperature"] = loss.get("temperature")
    elif isinstance(loss, str):
        out["loss"] = loss
    for key in ("temperature", "loss_temperature"):
        if out.get("temperature") is None and meta.get(key) is not None:
            out["temperature"] = meta[key]
    views = meta.get("views")
    mode = meta.get("view_mode", meta.get("views_mode"))
    if mode is None and isinstance(views, dict):
        mode = views.get("mode")
    if mode is None and isinstance(views, str):  # repr(SimCLRViews): "...mode=shared)"
        found = re.search(r"mode=['\"]?(shared|per_sample)", views)
        mode = found.group(1) if found else None
    if mode is not None:
        out["view_mode"] = mode
    return {k: v for k, v in out.items() if v is not None}


class DefenseModule(pl.LightningModule):
    """Evaluate a classifier without and with a test-time defense (``predict`` and ``test``).

    Args:
        classifier: revlit classifier checkpoint (:func:`revlit.models.load_classifier`).
        head: SSL head checkpoint trained on that classifier (:func:`revlit.ssl.load_head`).
        defense: ``reverse`` (the reverse attack), ``noise`` (uniform noise of the same budget)
            or ``none`` (only the undefended numbers).
        norm: ball of the defense, ``l_inf`` (default) or ``l_2``.
        eps: ε_r (default 16/255); a number or a fraction string.
        step_size: step of the reverse attack (default 2/255).
        steps: steps of the reverse attack (default 40).
        n_views: views per image per step (default 4).
        view_mode: ``shared`` or ``per_sample`` (:class:`revlit.ssl.SimCLRViews`); default: what
            the head checkpoint records, else ``shared`` (the authors' batch-tensor views).
        select: ``last`` iterate (the authors' choice) or ``best`` (lowest recorded loss).
        random_start: uniform random start in the ball.
        loss: contrastive loss (``nt_xent``, ``nt_xent_multi``, ``alignment``); default: what the
            head checkpoint records, else ``nt_xent``. It must be the loss the head was trained with.
        temperature: its temperature; default: the head's record, else 0.2.
        chunk_size: the backbone runs over at most this many views at a time.
        fold_bn: purify through a BatchNorm-folded copy of the classifier (faster, same function
            to float rounding, not pixel-identical; see :class:`ReversePurifier`).
        recompute: bound a step's memory by ``chunk_size`` views instead of the batch (one extra
            backbone forward per step; same computation).
        lean: memory-lean input gradients (:mod:`revlit.models.lean`; default on): the backbone
            keeps 1-byte ReLU masks instead of its float activations between the forward and the
            backward pass; bitwise the same gradients, so the same repaired images.
        relu_float_mb: with ``lean``, MiB of ReLU outputs a step keeps as floats before it
            switches to masks (faster, 4x the memory of a mask; the same gradients).
        seed: run seed; each batch's generator is seeded from (seed, first test index).
        allow_mismatch: accept a head trained on another classifier, and a stored set made
            against another classifier.
        viz_images: images kept from each rank's first batch for the defense grid (0 = none).
    """

    def __init__(
        self,
        classifier: str,
        head: str,
        defense: str = "reverse",
        norm: str = "l_inf",
        eps: float | str = "16/255",
        step_size: float | str = "2/255",
        steps: int = 40,
        n_views: int = 4,
        view_mode: str | None = None,
        select: str = "last",
        random_start: bool = True,
        loss: str | None = None,
        temperature: float | None = None,
        chunk_size: int = 256,
        fold_bn: bool = False,
        recompute: bool = False,
        lean: bool = True,
        relu_float_mb: float = RELU_FLOAT_MB,
        seed: int = 0,
        allow_mismatch: bool = False,
        viz_images: int = 8,
    ) -> None:
        super().__init__()
        if defense not in DEFENSES:
            raise ValueError(f"defense must be one of {', '.join(DEFENSES)}, got '{defense}'")
        self.save_hyperparameters()
        self.defense, self.seed, self.allow_mismatch = defense, int(seed), bool(allow_mismatch)
        self.viz_images = int(viz_images)
        net, self.classifier_info = load_classifier(classifier)
        head_net, self.head_info = load_head(
            head, classifier_sha256=self.classifier_info["sha256"], allow_mismatch=allow_mismatch
        )
        if self.head_info.get("classifier_sha256") != self.classifier_info["sha256"]:
            log.warning("SSL head %s was trained on another classifier (allow_mismatch)", head)
        rec = _head_record(self.head_info)
        loss = loss or rec.get("loss", "nt_xent")
        temperature = float(temperature if temperature is not None else rec.get("temperature", 0.2))
        if "loss" in rec and (rec["loss"], rec.get("temperature", temperature)) != (
            loss,
            temperature,
        ):
            log.warning(
                "the SSL head was trained with %s (T=%s) but the defense uses %s (T=%s)",
                rec["loss"], rec.get("temperature"), loss, temperature,
            )  # fmt: skip
        view_mode = view_mode or rec.get("view_mode", "shared")
        for p in list(net.parameters()) + list(head_net.parameters()):
            p.requires_grad_(False)
        self.net = net.to(memory_format=torch.channels_last).eval()
        self.head = head_net.eval()
        self.views = SimCLRViews(mode=view_mode)
        self.ssl = ContrastiveLoss(loss, temperature)
        self.loss_name, self.temperature, self.view_mode = loss, temperature, view_mode
        self.purifier = ReversePurifier(
            self.net,
            self.head,
            self.ssl,
            self.views,
            norm=norm,
            eps=eps,
            step_size=step_size,
            steps=steps,
            n_views=n_views,
            select=select,
            random_start=random_start,
            chunk_size=chunk_size,
            fold_bn=fold_bn,
            recompute=recompute,
            lean=lean,
            relu_float_mb=relu_float_mb,
        )
        self.noise = RandomNoise(norm=norm, eps=as_float(eps, "eps"))
        nc = getattr(net, "num_classes", 10)
        self.acc = torchmetrics.Accuracy("multiclass", num_classes=nc)
        self.acc_def = torchmetrics.Accuracy("multiclass", num_classes=nc)
        self.ce = torchmetrics.MeanMetric()
        self.ce_def = torchmetrics.MeanMetric()
        self.ssl_before = torchmetrics.MeanMetric()
        self.ssl_after = torchmetrics.MeanMetric()
        self.viz: dict[str, torch.Tensor] | None = None
        #: this rank's per-image SSL losses (before, after) of the current run, for histograms
        self.ssl_seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._images, self._t0 = 0, None

    # ------------------------------------------------------------------ description
    def defense_settings(self) -> dict:
        """Settings of the defense for records (method, ball, steps, views, loss, seed, cost)."""
        base = {
            "loss": self.loss_name,
            "temperature": self.temperature,
            "view_mode": self.view_mode,
            "seed": self.seed,
            "seeding": "per batch: seed * 2**24 + first test index of the batch",
        }
        if self.defense == "reverse":
            return {**self.purifier.settings(), **base}
        if self.defense == "noise":
            return {**self.noise.settings(), **base}
        return {"method": "none", **base}

    def passes_per_image(self, defense: str | None = None) -> int:
        """Backbone passes a defended prediction costs per image (forward and backward count 1).

        ``none``/``noise``: 1 forward. ``reverse``: (steps + 1)·n_views forward + steps·n_views
        input-gradient backward passes over views, + 1 forward to classify. The diagnostic SSL
        losses (before and after, n_views forward passes each) are not counted.
        """
        defense = defense or self.defense
        if defense == "reverse":
            return sum(self.purifier.view_passes().values()) + 1
        return 1

    # ------------------------------------------------------------------ checks
    def _check_grad_mode(self, stage: str) -> None:
        loop = getattr(self.trainer, f"{stage}_loop", None)
        if getattr(loop, "inference_mode", False) or torch.is_inference_mode_enabled():
            if self.defense == "reverse":
                raise ValueError(INFERENCE_MODE_MSG.format(stage=stage))

    def setup(self, stage: str) -> None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return
        if stage in ("predict", "test"):
            self._check_grad_mode(stage)
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "check_classifier"):
            dm.check_classifier(self.classifier_info["sha256"])
        ds, bs = getattr(dm, "test_set", None), getattr(dm, "eval_batch_size", None)
        if stage in ("predict", "test") and ds is not None and bs:
            bad = single_image_batches(len(ds), int(bs), trainer.world_size)
            if bad:
                raise ValueError(
                    f"with {len(ds)} images, batch size {bs} and {trainer.world_size} device(s) a "
                    "batch of 1 image would occur, but the contrastive loss takes its negatives "
                    "from the batch: choose another eval_batch_size or number of images"
                )

    def on_predict_start(self) -> None:
        self._check_grad_mode("predict")
        self._images, self._t0, self.viz, self.ssl_seen = 0, time.perf_counter(), None, []

    def on_test_start(self) -> None:
        self._check_grad_mode("test")
        self._images, self._t0, self.viz, self.ssl_seen = 0, time.perf_counter(), None, []

    # ------------------------------------------------------------------ the work
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _classify(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = self.net(x.contiguous(memory_format=torch.channels_last)).float()
        return logits.argmax(1), F.cross_entropy(logits, y, reduction="none")

    def defend_batch(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> dict:
        """Per-example results of one batch without and with the defense (tensors, first dim N).

        Keys: ``index``, ``label``, ``pred``/``loss`` (no defense: prediction and cross-entropy),
        ``pred_def``/``loss_def`` (defended), ``ssl_before``/``ssl_after`` (per-image contrastive
        loss of the input and of the defended input, PAIRED: both on the same draw of views, from a
        generator of their own, so their difference is not view noise; diagnostic, not counted in
        the defense's cost),
        ``delta_linf``/``delta_l2`` (size of the defense's change), ``sec_none``/``sec_def``
        (compute seconds per image of the undefended and the defended prediction), and for the
        reverse attack ``ssl_steps`` (N, steps + 1) and ``selected_step`` (N,).

        Raises:
            ValueError: NaN/inf or out-of-range images.
        """
        check_images(x, "input images")
        if idx.numel() == 0:
            raise ValueError("empty batch")
        seed = batch_seed(self.seed, int(idx[0]))
        gen = torch.Generator().manual_seed(seed)  # the defense's start and views

        def diag_gen() -> torch.Generator:  # the before/after measurement's views (paired)
            return torch.Generator().manual_seed(seed ^ DIAG_SALT)

        t0 = time.perf_counter()
        pred, ce = self._classify(x, y)
        t1 = time.perf_counter()
        ssl_before = self.purifier.ssl_loss(x, diag_gen())
        t2 = time.perf_counter()
        out: dict[str, torch.Tensor] = {}
        if self.defense == "reverse":
            x_def, steps_loss = self.purifier.purify(x, gen)
            out["ssl_steps"] = steps_loss
            out["selected_step"] = self.purifier.selected_step
        elif self.defense == "noise":
            x_def = self.noise.purify(x, gen)
        else:
            x_def = x
        pred_def, ce_def = self._classify(x_def, y)
        t3 = time.perf_counter()
        if self.defense == "none":
            ssl_after = ssl_before
        else:  # diagnostic only: not part of the defense's cost
            ssl_after = self.purifier.ssl_loss(x_def, diag_gen())
        n = len(y)
        delta = (x_def - x).reshape(n, -1).float()
        if self.viz_images > 0 and self.viz is None:
            k = min(self.viz_images, n)
            self.viz = {
                "x": x[:k].detach().float().cpu(),
                "x_def": x_def[:k].detach().float().cpu(),
                "index": idx[:k].detach().cpu(),
            }
        full = torch.full((n,), 1.0, dtype=torch.float64, device=x.device)
        sec_def = (t3 - t2) if self.defense != "none" else (t1 - t0)
        out.update(
            {
                "index": idx,
                "label": y,
                "pred": pred,
                "loss": ce,
                "pred_def": pred_def,
                "loss_def": ce_def,
                "ssl_before": ssl_before,
                "ssl_after": ssl_after,
                "delta_linf": delta.abs().amax(1),
                "delta_l2": delta.norm(dim=1),
                "sec_none": full * ((t1 - t0) / n),
                "sec_def": full * (sec_def / n),
            }
        )
        self._images += n
        self.ssl_seen.append((ssl_before.detach().cpu(), ssl_after.detach().cpu()))
        return {k: v.detach() for k, v in out.items()}

    def images_per_second(self) -> float:
        """Images this rank has processed per second since predict/test started."""
        if self._t0 is None or self._images == 0:
            return 0.0
        return self._images / max(time.perf_counter() - self._t0, 1e-9)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        x, y, idx = batch
        return {k: v.cpu() for k, v in self.defend_batch(x, y, idx).items()}

    def on_predict_batch_end(self, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        bar = getattr(self.trainer, "progress_bar_callback", None)
        try:
            pbar = bar.predict_progress_bar if bar is not None else None
        except (AttributeError, TypeError):  # no tqdm bar (disabled, or another bar)
            pbar = None
        if pbar is not None and hasattr(pbar, "set_postfix"):
            pbar.set_postfix({"img/s": f"{self.images_per_second():.1f}"}, refresh=False)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y, idx = batch
        out = self.defend_batch(x, y, idx)
        self.acc(out["pred"], y)
        self.acc_def(out["pred_def"], y)
        self.ce(out["loss"])
        self.ce_def(out["loss_def"])
        self.ssl_before(out["ssl_before"])
        self.ssl_after(out["ssl_after"])
        tag = self.defense
        self.log("test/acc", self.acc, sync_dist=True)
        self.log("test/loss", self.ce, sync_dist=True)
        self.log(f"test/acc_{tag}", self.acc_def, prog_bar=True, sync_dist=True)
        self.log(f"test/loss_{tag}", self.ce_def, sync_dist=True)
        self.log("test/ssl_before", self.ssl_before, sync_dist=True)
        self.log(f"test/ssl_after_{tag}", self.ssl_after, sync_dist=True)
        self.log("img_per_s", self.images_per_second(), prog_bar=True, on_step=True, on_epoch=False)
