"""AttackModule: PGD (Linf / L2 / L1) on test batches, for ``cli.py predict`` stored sets.

Orchestration only: the attack is :func:`revlit.attacks.pgd_attack`; the set is written by
:class:`revlit.callbacks.adv_writer.AdvSetWriter` (a trainer callback in the config).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from revlit.attacks.losses import get_loss
from revlit.attacks.norms import L1_TOPK_DEFAULT, Norm, example_generators
from revlit.attacks.pgd import pgd_attack, resolve_args
from revlit.callbacks.writers import finished_batch
from revlit.models.checkpoint import load_classifier
from revlit.utils import as_float

INFERENCE_MODE_MSG = (
    "AttackModule needs input gradients: run with --trainer.inference_mode false "
    "(Lightning's predict runs under torch.inference_mode otherwise)"
)


class AttackModule(pl.LightningModule):
    """Attack each predict batch with PGD and return the adversarial images.

    Args:
        classifier: any classifier spec of :func:`revlit.models.load_classifier`.
        norm: ``l_inf``, ``l_2`` or ``l_1`` (also ``linf``/``l2``/``l1``).
        eps: budget; a number or a fraction string ("8/255"); default 8/255, 0.5, 12 by norm.
        step_size: step; default ε/4 for every norm, see
            :func:`revlit.attacks.norms.default_step_size`.
        steps: PGD iterations per restart.
        restarts: random restarts (the worst case per example is kept).
        loss: ``ce``, ``cw`` or ``dlr``.
        seed: seed of the random starts; each example's noise comes from its own generator seeded
            with ``seed * 2**24 + test index``, so results do not depend on batching or DDP sharding.
        set_name: name of the stored set (folder under the writer's root).
        l1_topk: fraction of coordinates the sparse L1 step moves (top-k by |gradient|).
        random_start: start from a random point of the ball (else from the clean image).
        attack_iters: another name for ``steps`` (``--model.init_args.attack_iters 5``);
            overrides ``steps`` when given.
        overwrite: let the writer replace an existing stored set of this name.
    """

    def __init__(
        self,
        classifier: str | dict = "checkpoints/resnet20_at.pt",
        norm: str = "l_inf",
        eps: float | str | None = None,
        step_size: float | str | None = None,
        steps: int = 10,
        restarts: int = 1,
        loss: str = "ce",
        seed: int = 0,
        set_name: str | None = None,
        l1_topk: float = L1_TOPK_DEFAULT,
        random_start: bool = True,
        attack_iters: int | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        if attack_iters is not None:
            steps = attack_iters
        eps_f = None if eps is None else as_float(eps, "eps")
        step_f = None if step_size is None else as_float(step_size, "step_size")
        self.norm, self.eps, self.step_size = resolve_args(norm, eps_f, step_f, steps, restarts)
        get_loss(loss)  # validate early
        if not 0.0 < l1_topk <= 1.0:
            raise ValueError(f"l1_topk must be in (0, 1], got {l1_topk}")
        self.steps, self.restarts, self.loss_name = int(steps), int(restarts), str(loss).lower()
        self.seed, self.l1_topk, self.random_start = int(seed), float(l1_topk), bool(random_start)
        self.overwrite = bool(overwrite)
        self.save_hyperparameters()
        net, self.classifier_info = load_classifier(classifier)
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net.to(memory_format=torch.channels_last).eval()
        self.classifier_path = self.classifier_info["path"]  # the weights file, for any spec
        stem = self.classifier_path.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        self.set_name = set_name or f"{stem}_{self.norm.value}"

    # ---------------------------------------------------------------- description
    def attack_config(self) -> dict:
        """The attack's settings and the classifier's identity (for meta.json and records)."""
        return {
            "classifier": self.classifier_path,
            "classifier_sha256": self.classifier_info["sha256"],
            "classifier_arch": self.classifier_info["arch"],
            "norm": self.norm.value,
            "eps": self.eps,
            "step_size": self.step_size,
            "steps": self.steps,
            "restarts": self.restarts,
            "loss": self.loss_name,
            "seed": self.seed,
            "random_start": self.random_start,
            "l1_topk": self.l1_topk if self.norm is Norm.L1 else None,
            "seeding": "per-example generator: seed * 2**24 + test index (revlit.attacks.example_generators)",
        }

    def run_settings(self) -> dict:
        """What the outputs depend on (the attack and the classifier's weights, not its path)."""
        return {k: v for k, v in self.attack_config().items() if k != "classifier"}

    # -------------------------------------------------------------------- predict
    def setup(self, stage: str) -> None:
        trainer = getattr(self, "_trainer", None)
        loop = getattr(trainer, "predict_loop", None) if trainer is not None else None
        if stage == "predict" and getattr(loop, "inference_mode", False):
            raise ValueError(INFERENCE_MODE_MSG)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        if torch.is_inference_mode_enabled():
            raise ValueError(INFERENCE_MODE_MSG)
        x, y, idx = batch
        if (done := finished_batch(self._trainer, idx)) is not None:
            return done  # kept by a killed run of the same settings
        self.net.eval()
        with torch.no_grad():
            clean_pred = self.net(x).argmax(1)
        with torch.enable_grad():
            res = pgd_attack(
                self.net,
                x,
                y,
                norm=self.norm,
                eps=self.eps,
                step_size=self.step_size,
                steps=self.steps,
                restarts=self.restarts,
                loss=self.loss_name,
                random_start=self.random_start,
                generator=example_generators(self.seed, idx),
                l1_topk=self.l1_topk,
            )
        return {
            "index": idx.detach().cpu(),
            "label": y.detach().cpu(),
            "image": res.x_adv.detach().float().cpu().contiguous(),
            "clean_pred": clean_pred.cpu(),
            "adv_pred": res.pred.cpu(),
            "adv_loss": res.loss.float().cpu(),
        }
