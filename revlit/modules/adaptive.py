"""AdaptiveModule: attack the *defended* classifier itself (``cli.py predict``), one table per run.

Orchestration only. The deployed defense (``defense``: a :class:`revlit.defenses.ReversePurifier`,
Mao et al., ICCV 2021) and the attacks (``attacks``: :mod:`revlit.attacks.cascade` specs) are
typed init arguments that YAML selects with ``class_path``/``init_args``; each test batch of CLEAN
images runs :func:`revlit.attacks.cascade.adaptive_batch` (attacks cheapest first, each only on
points not yet broken; optional ε sweep and convergence check). The
:class:`revlit.callbacks.adaptive_report.AdaptiveReport` writer keeps finished batches (a killed
run resumes), merges the ranks once and writes the report (table, records, plots).

Seeding: each batch's generators come from ``(seed, first test index of the batch, attack)``; the
transfer PGD's from ``(seed, test index)``, as the stored attack sets. The purifier's contrastive
loss takes its negatives from the batch, so results depend on the batch size.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from revlit.attacks.cascade import (
    BPDAEOT,
    DefenseAwarePGD,
    Target,
    Transfer,
    adaptive_batch,
    default_attacks,
)
from revlit.attacks.norms import Norm, check_eps
from revlit.attacks.pgd import resolve_args
from revlit.callbacks.adaptive_report import describe
from revlit.callbacks.writers import finished_batch
from revlit.defenses import ReversePurifier, check_images
from revlit.defenses.bank import load_bank
from revlit.defenses.evaluate import bind_defense, check_batches
from revlit.losses import make_loss
from revlit.models.checkpoint import load_classifier
from revlit.ssl.head import head_training, load_head
from revlit.utils import as_float

INFERENCE_MODE_MSG = (
    "AdaptiveModule needs input gradients, but the Trainer runs test under torch.inference_mode: "
    "pass --trainer.inference_mode false (revlit's CLI default)"
)


class AdaptiveModule(pl.LightningModule):
    """Adaptive evaluation of a purification defense (``cli.py predict``).

    Args:
        classifier: any classifier spec of :func:`revlit.models.load_classifier` (a checkpoint,
            a user module ``{class_path, init_args, weights}``, ``robustbench:<name>``).
        head: SSL head checkpoint trained on that classifier.
        bank: a bank of clean negatives (:mod:`revlit.defenses.bank`): the purifier contrasts each
            image with it instead of its batch-mates (batch-independent); ``None``: in-batch.
        defense: the DEPLOYED purifier (default: ``ReversePurifier()``, 40 steps × 4 views, ε_r =
            16/255); bound here to the classifier, head, loss and views the head was trained with.
        attacks: attack specs (default :func:`revlit.attacks.cascade.default_attacks`), run
            cheapest first.
        norm, eps: the attacks' threat model (``l_inf`` or ``l_2``; default 8/255).
        draws: r, fresh deployed draws judging each attack's final points.
        cascade: attack only points no earlier attack broke (``False``: every attack on every image).
        sweep_eps: ε values of the gradient-masking sweep (empty: none).
        sweep_attack: the sweep's attack (default: the cheapest adaptive attack).
        convergence: also run the adaptive attacks with iterations, EOT draws m, restarts and
            evaluation draws r doubled, one at a time.
        seed: run seed. allow_mismatch: accept a head trained on another classifier.
    """

    def __init__(
        self,
        classifier: str | dict = "checkpoints/resnet20_at.pt",
        head: str = "checkpoints/resnet20_at_head.pt",
        bank: str | None = None,
        defense: ReversePurifier | None = None,
        attacks: list[Transfer | BPDAEOT | DefenseAwarePGD] | None = None,
        norm: str = "l_inf",
        eps: float | str = "8/255",
        draws: int = 3,
        cascade: bool = True,
        sweep_eps: list[float | str] | None = None,
        sweep_attack: BPDAEOT | DefenseAwarePGD | None = None,
        convergence: bool = False,
        seed: int = 0,
        allow_mismatch: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["defense", "attacks", "sweep_attack"])
        norm_, eps_, _ = resolve_args(norm, as_float(eps, "eps"), None, 1, 1)
        if norm_ is Norm.L1:
            raise ValueError("the adaptive evaluation supports l_inf and l_2 (APGD), not l_1")
        if int(draws) != draws or draws < 1:
            raise ValueError(f"draws must be an integer >= 1, got {draws}")
        self.attacks = default_attacks() if attacks is None else list(attacks)
        names = [a.name for a in self.attacks]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"attacks must be a non-empty list of distinct attacks: {names}")
        self.sweep_eps = [check_eps(as_float(e, "sweep_eps")) for e in sweep_eps or []]
        self.sweep_attack, self.cascade, self.convergence = sweep_attack, cascade, convergence
        net, self.classifier_info = load_classifier(classifier)
        head_net, self.head_info = load_head(
            head, classifier_sha256=self.classifier_info["sha256"], allow_mismatch=allow_mismatch
        )
        self.net = net.to(memory_format=torch.channels_last).eval().requires_grad_(False)
        self.head = head_net.eval().requires_grad_(False)
        defense = defense if defense is not None else ReversePurifier()
        if bank:  # the bank's negatives instead of the batch's (the form the head was trained with)
            rec, neg = head_training(self.head_info), load_bank(bank, self.head_info["sha256"])[0]
            defense.loss = make_loss(rec["loss"], rec["temperature"], neg)
        self.defense, _, self.ssl_setting = bind_defense(defense, self.net, self.head,
                                                         self.head_info)  # fmt: skip
        self.target = Target(
            self.net, self.defense, norm_, eps_, int(draws), self.defense.chunk_size, int(seed),
            bind=lambda inner: bind_defense(inner, self.net, self.head, self.head_info)[0],
        )  # fmt: skip

    def run_settings(self) -> dict:
        """What the outputs depend on (finished batches are reused only under the same)."""
        return describe(self)

    def setup(self, stage: str) -> None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or stage != "predict":
            return
        if getattr(trainer.predict_loop, "inference_mode", False):
            raise ValueError(INFERENCE_MODE_MSG)
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and getattr(dm, "eval_set", "clean") != "clean":
            raise ValueError(
                "AdaptiveModule attacks clean test images; use --data.init_args.eval_set clean"
            )
        ds, bs = getattr(dm, "test_set", None), getattr(dm, "eval_batch_size", None)
        if ds is not None and bs:
            check_batches(len(ds), int(bs), trainer.world_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        if torch.is_inference_mode_enabled():
            raise ValueError(INFERENCE_MODE_MSG)
        x, y, idx = batch
        if (done := finished_batch(self.trainer, idx)) is not None:
            return done
        check_images(x, "input images")
        return adaptive_batch(self.attacks, self.target, x, y, idx, self.cascade, self.sweep_eps,
                              self.sweep_attack, self.convergence)  # fmt: skip
