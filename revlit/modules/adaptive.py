"""AdaptiveModule: attack the *defended* classifier itself (issue 9), one table per run.

Orchestration only. The attacks are :mod:`revlit.attacks.adaptive` (defense-aware PGD, BPDA + EOT
inside PGD and APGD, a fixed-seed target) and :mod:`revlit.attacks.apgd`; the defense is
:class:`revlit.defenses.ReversePurifier` (Mao et al., ICCV 2021); the table, intervals, ε-sweep
plot, convergence check and verdict are :mod:`revlit.adaptive_report`.

``cli.py test --config configs/adaptive/<preset>.yaml``: every test batch of CLEAN images runs the
rows (``transfer_pgd``, ``transfer_apgd``, ``defense_aware``, ``bpda_pgd``, ``bpda_apgd_ce``,
``bpda_apgd_dlr``, and the second target ``bpda_fixed_seed``), then the ε sweep and the
convergence variants. Each attack's final points are evaluated with ``draws`` fresh draws of the
DEPLOYED purifier; the attacks themselves may run a cheaper purifier (``attack_purifier_steps``,
``attack_purifier_views``), and each record says which was which. Under DDP each rank writes its
per-example outputs to ``<output_dir>/.parts`` and rank 0 merges them by test index once, then
writes ``table.md``, ``summary.json``, ``record_<row>.json``, ``records.jsonl``,
``eps_sweep.png`` and ``outputs.pt``, and prints the table.

Seeding: each batch's generators are seeded from ``(seed, first test index of the batch, row)``;
the transfer PGD uses per-example generators exactly as :class:`revlit.modules.attack.AttackModule`
(so its points equal the stored set ``resnet20_at_l_inf`` for the same classifier and seed). The
purifier's contrastive loss takes negatives from the batch, so results depend on the batch size.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from revlit import adaptive_report as report
from revlit.attacks.adaptive import (
    bpda_eot_attack,
    counting_passes,
    defense_aware_pgd,
    evaluate_defense,
    fixed_seed,
)
from revlit.attacks.apgd import apgd_attack
from revlit.attacks.norms import Norm, check_eps
from revlit.attacks.pgd import pgd_attack, resolve_args
from revlit.callbacks.writers import concat_outputs, merge_by_index
from revlit.defenses import ReversePurifier, check_images
from revlit.io import atomic_save
from revlit.losses import ContrastiveLoss
from revlit.models.checkpoint import load_classifier
from revlit.modules.attack import example_generators
from revlit.modules.defense import _head_record, batch_seed, single_image_batches
from revlit.records import make_record, save_jsonl, save_record
from revlit.ssl.head import load_head, ssl_loss
from revlit.ssl.views import SimCLRViews
from revlit.utils import as_float

log = logging.getLogger("revlit")

ALL_ROWS = report.ROWS + report.EXTRA_ROWS
DEFAULT_SWEEP = ("0", "2/255", "4/255", "8/255", "16/255", "32/255")
#: BPDA rows: (inner attack, loss)
BPDA = {
    "bpda_pgd": ("pgd", "ce"),
    "bpda_apgd_ce": ("apgd", "ce"),
    "bpda_apgd_dlr": ("apgd", "dlr"),
    "bpda_fixed_seed": ("apgd", "ce"),
}
#: convergence variants of ``bpda_apgd_ce``: name -> (row key, steps ×, eot ×, restarts ×)
CONVERGENCE = {
    "iterations": ("conv_steps", 2, 1, 1),
    "eot_samples": ("conv_eot", 1, 2, 1),
    "restarts": ("conv_restarts", 1, 1, 2),
}
INFERENCE_MODE_MSG = (
    "AdaptiveModule needs input gradients, but the Trainer runs test under torch.inference_mode: "
    "pass --trainer.inference_mode false (revlit's CLI default)"
)


class AdaptiveModule(pl.LightningModule):
    """Adaptive evaluation of the reverse-attack defense (``cli.py test``).

    Args:
        classifier: revlit classifier checkpoint.
        head: SSL head checkpoint trained on that classifier.
        norm: threat model of the attacks, ``l_inf`` (default) or ``l_2``.
        eps: attack budget ("8/255").
        rows: which rows to run (default: all of ``transfer_pgd``, ``transfer_apgd``,
            ``defense_aware``, ``bpda_pgd``, ``bpda_apgd_ce``, ``bpda_apgd_dlr``,
            ``bpda_fixed_seed``).
        transfer_pgd_steps: iterations of the transfer PGD (10, like the stored sets).
        static_apgd_steps: iterations of the static APGD-CE and APGD-DLR (100).
        steps: iterations of the adaptive attacks (defense-aware PGD, BPDA + EOT PGD / APGD).
        restarts: restarts of the APGD and adaptive attacks.
        eot: m, purifier draws averaged per BPDA gradient.
        draws: r, fresh deployed-purifier draws evaluating each attack's final points.
        lam: λ of the defense-aware objective CE − λ·L_ssl.
        ssl_views: views of L_ssl in the defense-aware objective (2).
        purifier_eps, purifier_step_size, purifier_steps, purifier_views: the DEPLOYED reverse
            attack (16/255, 2/255, 40 steps, 4 views).
        attack_purifier_steps, attack_purifier_views: the purifier inside the BPDA attacks
            (``null``: the deployed one). Same ε_r and step as deployed.
        view_mode, select, loss, temperature: as :class:`revlit.modules.defense.DefenseModule`
            (defaults from the head checkpoint's meta).
        sweep_eps: ε values of the gradient-masking sweep (BPDA + EOT APGD-CE); empty = no sweep.
        sweep_steps: iterations of the sweep attack (``null``: ``steps``).
        convergence: also run ``bpda_apgd_ce`` with doubled iterations, EOT samples and restarts.
        seed: run seed.
        chunk_size: most images (views) through the backbone at once.
        allow_mismatch: accept a head trained on another classifier.
        output_dir: where rank 0 writes the table, records and plot.
    """

    def __init__(
        self,
        classifier: str = "checkpoints/resnet20_at.pt",
        head: str = "checkpoints/resnet20_at_head.pt",
        norm: str = "l_inf",
        eps: float | str = "8/255",
        rows: list[str] | None = None,
        transfer_pgd_steps: int = 10,
        static_apgd_steps: int = 100,
        steps: int = 100,
        restarts: int = 1,
        eot: int = 4,
        draws: int = 5,
        lam: float = 10.0,
        ssl_views: int = 2,
        purifier_eps: float | str = "16/255",
        purifier_step_size: float | str = "2/255",
        purifier_steps: int = 40,
        purifier_views: int = 4,
        attack_purifier_steps: int | None = 10,
        attack_purifier_views: int | None = 2,
        view_mode: str | None = None,
        select: str = "last",
        loss: str | None = None,
        temperature: float | None = None,
        sweep_eps: list[float | str] | None = None,
        sweep_steps: int | None = None,
        convergence: bool = True,
        seed: int = 0,
        chunk_size: int = 256,
        allow_mismatch: bool = False,
        output_dir: str = "results/adaptive",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.rows = list(ALL_ROWS if rows is None else rows)
        unknown = [r for r in self.rows if r not in ALL_ROWS]
        if unknown:
            raise ValueError(f"unknown row(s) {', '.join(unknown)}; known: {', '.join(ALL_ROWS)}")
        self.norm, self.eps, _ = resolve_args(norm, as_float(eps, "eps"), None, steps, restarts)
        if self.norm is Norm.L1:
            raise ValueError("the adaptive evaluation supports l_inf and l_2 (APGD), not l_1")
        for name, v in (
            ("transfer_pgd_steps", transfer_pgd_steps),
            ("static_apgd_steps", static_apgd_steps),
            ("steps", steps),
            ("eot", eot),
            ("draws", draws),
            ("ssl_views", ssl_views),
        ):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v}")
        if ssl_views < 2:
            raise ValueError(f"ssl_views must be >= 2 (a contrastive loss), got {ssl_views}")
        self.transfer_pgd_steps, self.static_apgd_steps = (
            int(transfer_pgd_steps),
            int(static_apgd_steps),
        )
        self.steps, self.restarts, self.eot, self.draws = (
            int(steps),
            int(restarts),
            int(eot),
            int(draws),
        )
        self.lam, self.ssl_views = float(lam), int(ssl_views)
        self.sweep_eps = [
            check_eps(as_float(e, "sweep_eps"))
            for e in (DEFAULT_SWEEP if sweep_eps is None else sweep_eps)
        ]
        self.sweep_steps = int(sweep_steps) if sweep_steps is not None else self.steps
        self.convergence = bool(convergence) and "bpda_apgd_ce" in self.rows
        self.seed, self.chunk_size = int(seed), int(chunk_size)
        self.output_dir = Path(output_dir)

        net, self.classifier_info = load_classifier(classifier)
        head_net, self.head_info = load_head(
            head, classifier_sha256=self.classifier_info["sha256"], allow_mismatch=allow_mismatch
        )
        rec = _head_record(self.head_info)
        self.loss_name = loss or rec.get("loss", "nt_xent")
        self.temperature = float(
            temperature if temperature is not None else rec.get("temperature", 0.2)
        )
        self.view_mode = view_mode or rec.get("view_mode", "shared")
        for p in list(net.parameters()) + list(head_net.parameters()):
            p.requires_grad_(False)
        self.net = net.to(memory_format=torch.channels_last).eval()
        self.head = head_net.eval()
        self.views = SimCLRViews(mode=self.view_mode)
        self.ssl = ContrastiveLoss(self.loss_name, self.temperature)
        common = {
            "norm": "l_inf",
            "eps": purifier_eps,
            "step_size": purifier_step_size,
            "select": select,
        }
        self.purifier = ReversePurifier(
            self.net, self.head, self.ssl, self.views, steps=purifier_steps,
            n_views=purifier_views, chunk_size=chunk_size, **common,
        )  # fmt: skip
        a_steps = purifier_steps if attack_purifier_steps is None else attack_purifier_steps
        a_views = purifier_views if attack_purifier_views is None else attack_purifier_views
        self.attack_is_deployed = (a_steps, a_views) == (purifier_steps, purifier_views)
        self.attack_purifier = (
            self.purifier
            if self.attack_is_deployed
            else ReversePurifier(
                self.net,
                self.head,
                self.ssl,
                self.views,
                steps=a_steps,
                n_views=a_views,
                chunk_size=chunk_size,
                **common,
            )  # fmt: skip
        )
        self._outputs: list[dict[str, torch.Tensor]] = []
        self._t0: float | None = None
        self.summary: dict | None = None

    # ------------------------------------------------------------------ description
    def ssl_fn(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Per-image SSL loss (N,) on ``ssl_views`` fresh views (the defense-aware objective)."""
        return ssl_loss(
            self.net, self.head, self.views, self.ssl, x, self.ssl_views,
            generator=generator, reduction="none", chunk=self.chunk_size,
        )  # fmt: skip

    def defense_settings(self) -> dict:
        """The deployed defense's settings (for records)."""
        return {
            **self.purifier.settings(),
            "loss": self.loss_name,
            "temperature": self.temperature,
            "view_mode": self.view_mode,
            "seed": self.seed,
            "seeding": "per batch: seed * 2**24 + first test index of the batch, + row offset",
        }

    def attack_settings(self, row: str) -> dict:
        """The settings of one row's attack (for records)."""
        base = {
            "name": row,
            "label": report.LABELS.get(row, row),
            "norm": self.norm.value,
            "eps": self.eps,
            "restarts": self.restarts,
        }
        inner = {
            "attack_purifier": self.attack_purifier.settings(),
            "attack_purifier_is_deployed": self.attack_is_deployed,
            "iterate_breaks_counted": self.attack_is_deployed,
        }
        if row == "transfer_pgd":
            return {**base, "kind": "transfer", "attack": "pgd", "loss": "ce", "restarts": 1,
                    "steps": self.transfer_pgd_steps, "step_size": self.eps / 4,
                    "target": "undefended classifier", "seed": self.seed,
                    "seeding": "per-example generator: seed * 2**24 + test index"}  # fmt: skip
        if row == "transfer_apgd":
            return {**base, "kind": "transfer", "attack": "apgd", "loss": "ce+dlr",
                    "steps": self.static_apgd_steps, "target": "undefended classifier"}  # fmt: skip
        if row == "defense_aware":
            return {**base, "kind": "adaptive", "attack": "pgd", "loss": "ce - lambda * ssl",
                    "lambda": self.lam, "ssl_views": self.ssl_views, "steps": self.steps,
                    "step_size": self.eps / 4, "target": "classifier + SSL loss"}  # fmt: skip
        if row in BPDA or row.startswith(("sweep", "conv_")):
            attack, loss = BPDA.get(row, ("apgd", "ce"))
            fixed = row == "bpda_fixed_seed"
            return {**base, "kind": "adaptive", "attack": attack, "loss": loss,
                    "steps": self.steps, "eot": 1 if fixed else self.eot, "bpda": True,
                    "step_size": self.eps / 4 if attack == "pgd" else "apgd: 2*eps, halved",
                    "target": "fixed-seed purifier" if fixed else "randomized purifier",
                    **inner}  # fmt: skip
        return {**base, "kind": "adaptive"}

    # ------------------------------------------------------------------ checks
    def setup(self, stage: str) -> None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or stage != "test":
            return
        if getattr(trainer.test_loop, "inference_mode", False):
            raise ValueError(INFERENCE_MODE_MSG)
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and getattr(dm, "eval_set", "clean") != "clean":
            raise ValueError(
                "AdaptiveModule attacks clean test images; use --data.init_args.eval_set clean"
            )
        ds, bs = getattr(dm, "test_set", None), getattr(dm, "eval_batch_size", None)
        if ds is not None and bs and single_image_batches(len(ds), int(bs), trainer.world_size):
            raise ValueError(
                f"with {len(ds)} images, batch size {bs} and {trainer.world_size} device(s) a batch "
                "of 1 image would occur, but the contrastive loss takes its negatives from the "
                "batch: choose another eval_batch_size or number of images"
            )

    def on_test_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise ValueError(INFERENCE_MODE_MSG)
        self._outputs, self._t0, self.summary = [], time.perf_counter(), None

    # ------------------------------------------------------------------ the work
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _gen(self, base: int, k: int) -> torch.Generator:
        return torch.Generator().manual_seed((base + 1_000_003 * (k + 1)) % (1 << 63))

    def _static(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(x_adv).argmax(1) == y

    def run_attack(
        self, row: str, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, base: int, k: int,
        eps: float | None = None, steps: int | None = None, eot: int | None = None,
        restarts: int | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Run one row on a batch and evaluate its points; returns ``<row>.<field>`` tensors."""
        n = len(y)
        eps = self.eps if eps is None else eps
        steps = self.steps if steps is None else steps
        eot = self.eot if eot is None else eot
        restarts = self.restarts if restarts is None else restarts
        no = torch.zeros(n, dtype=torch.bool, device=x.device)
        extra: dict[str, torch.Tensor] = {}
        deployed, r, broken = self.purifier, self.draws, no
        t0 = time.perf_counter()
        with counting_passes(self.net) as count, torch.enable_grad():
            if row == "transfer_pgd":
                res = pgd_attack(
                    self.net, x, y, norm=self.norm, eps=eps, steps=self.transfer_pgd_steps,
                    restarts=1, loss="ce", random_start=True,
                    generator=example_generators(self.seed, idx),
                )  # fmt: skip
                x_adv, static = res.x_adv, res.pred == y
            elif row == "transfer_apgd":
                kw = {
                    "norm": self.norm,
                    "eps": eps,
                    "steps": self.static_apgd_steps,
                    "restarts": restarts,
                }
                ce = apgd_attack(self.net, x, y, loss="ce", generator=self._gen(base, k), **kw)
                dlr = apgd_attack(
                    self.net, x, y, loss="dlr", generator=self._gen(base, k + 1), **kw
                )
                pick = (~ce.broken & dlr.broken).view(-1, 1, 1, 1)
                x_adv = torch.where(pick, dlr.x_adv, ce.x_adv)
                static = ~(ce.broken | dlr.broken)
                extra = {f"{row}.static_ce": ~ce.broken, f"{row}.static_dlr": ~dlr.broken}
            elif row == "defense_aware":
                res = defense_aware_pgd(
                    self.net, self.ssl_fn, x, y, self.lam, self.norm, eps, None, steps, restarts,
                    generator=self._gen(base, k), views_generator=self._gen(base, k + 1),
                )  # fmt: skip
                x_adv, static = res.x_adv, self._static(res.x_adv, y)
            else:
                attack, loss = BPDA.get(row, ("apgd", "ce"))
                fixed = row == "bpda_fixed_seed"
                target = (
                    fixed_seed(self.attack_purifier, self.seed) if fixed else self.attack_purifier
                )
                if eps == 0:
                    x_adv = x
                else:
                    res = bpda_eot_attack(
                        self.net, target, x, y, attack, loss, self.norm, eps, None, steps,
                        restarts, 1 if fixed else eot, generator=self._gen(base, k),
                        draw_generator=self._gen(base, k + 1), chunk=self.chunk_size,
                    )  # fmt: skip
                    x_adv = res.x_adv
                    if self.attack_is_deployed:
                        broken = res.broken
                static = self._static(x_adv, y)
                if fixed:
                    deployed, r = fixed_seed(self.purifier, self.seed), 1
            correct, ce_def = evaluate_defense(
                self.net, deployed, x_adv, y, r, self._gen(base, k + 2), self.chunk_size
            )
        sec = time.perf_counter() - t0
        full = torch.ones(n, dtype=torch.float64)
        out = {
            f"{row}.static": static.cpu(),
            f"{row}.draws": correct.t().cpu(),
            f"{row}.ce": ce_def.t().float().cpu(),
            f"{row}.broken_iter": broken.cpu(),
            f"{row}.passes": full * (count[0] / n),
            f"{row}.seconds": full * (sec / n),
            **{key: v.cpu() for key, v in extra.items()},
        }
        log.info(
            "batch %d-%d %s: static %.3f, defended mean %.3f, worst %.3f (%.1f s, %.0f passes/img)",
            int(idx.min()), int(idx.max()), row, float(static.float().mean()),
            float(correct.float().mean()),
            float((correct.all(0) & ~broken).float().mean()), sec, count[0] / n,
        )  # fmt: skip
        return out

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if torch.is_inference_mode_enabled():
            raise ValueError(INFERENCE_MODE_MSG)
        x, y, idx = batch
        check_images(x, "input images")
        base = batch_seed(self.seed, int(idx[0]))
        out: dict[str, torch.Tensor] = {"index": idx.cpu(), "label": y.cpu()}
        for k, row in enumerate(ALL_ROWS):
            if row in self.rows:
                out.update(self.run_attack(row, x, y, idx, base, 10 * k))
        for i, e in enumerate(self.sweep_eps):
            out.update(
                self.run_attack(
                    f"sweep{i}", x, y, idx, base, 100 + 10 * i, eps=e, steps=self.sweep_steps
                )
            )
        if self.convergence:
            for j, (key, fs, fe, fr) in enumerate(CONVERGENCE.values()):
                out.update(
                    self.run_attack(
                        key, x, y, idx, base, 200 + 10 * j, steps=self.steps * fs,
                        eot=self.eot * fe, restarts=self.restarts * fr,
                    )
                )  # fmt: skip
        self._outputs.append(out)
        n = len(y)
        for row in self.rows:
            d = out[f"{row}.draws"]
            worst = (d.all(1) & ~out[f"{row}.broken_iter"]).float().mean()
            for name, v in (("mean", d.float().mean()), ("worst", worst)):
                self.log(f"adaptive/{row}_{name}", v.to(self.device), batch_size=n, sync_dist=True)

    # ------------------------------------------------------------------ merge + report
    def on_test_epoch_end(self) -> None:
        trainer = self.trainer
        parts = self.output_dir / ".parts"
        if trainer.is_global_zero and parts.exists():
            shutil.rmtree(parts)
        trainer.strategy.barrier()
        atomic_save(concat_outputs(self._outputs), parts / f"part-rank{trainer.global_rank}.pt")
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            loaded = [
                torch.load(parts / f"part-rank{r}.pt", weights_only=True)
                for r in range(trainer.world_size)
            ]
            merged = merge_by_index(loaded)
            shutil.rmtree(parts, ignore_errors=True)
            if merged:
                self.summary = self.write_report(merged, trainer)
        trainer.strategy.barrier()

    def write_report(self, merged: dict[str, torch.Tensor], trainer=None) -> dict:
        """Table, records, sweep plot, convergence check and verdict from merged outputs (rank 0)."""
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        wall = time.perf_counter() - self._t0 if self._t0 is not None else None
        world = trainer.world_size if trainer is not None else 1
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        rows = report.summarize_table(merged)
        title = (
            f"Adaptive evaluation, {self.norm.value} ε = {self.eps * 255:.3g}/255: n = {rows[0].n}, "
            f"m = {self.eot} EOT draws, r = {self.draws} evaluation draws, attack purifier "
            f"{self.attack_purifier.steps} steps × {self.attack_purifier.n_views} views, deployed "
            f"{self.purifier.steps} × {self.purifier.n_views}, {self.steps} adaptive iterations"
        )
        table = report.format_table(rows, title)
        points = report.sweep_points(merged, self.sweep_eps)
        plot = None
        if points:
            plot = report.plot_sweep(
                points, out / "eps_sweep.png",
                f"BPDA+EOT APGD-CE ({self.sweep_steps} it., m={self.eot}, r={self.draws}), n={points[0]['n']}",
            )  # fmt: skip
        conv = None
        if self.convergence and report.has_row(merged, "bpda_apgd_ce"):
            conv = report.convergence_check(
                merged, "bpda_apgd_ce", {name: v[0] for name, v in CONVERGENCE.items()}
            )
        reaches_zero = report.sweep_reaches_zero(points)
        paired = report.paired_difference(merged)
        verdict = report.verdict(
            rows, conv["converged"] if conv else None, reaches_zero, paired=paired
        )
        n = int(merged["index"].numel())
        ci, hi = self.classifier_info, self.head_info
        data = {
            "split": "clean",
            "source": "CIFAR-10 test set (attacked here)",
            "n": n,
            "test_subset": getattr(dm, "test_subset", None),
            "first_index": int(merged["index"].min()),
            "last_index": int(merged["index"].max()),
        }
        defense = {
            **self.defense_settings(),
            "batch_size": getattr(dm, "eval_batch_size", None),
            "world_size": world,
            "draws": self.draws,
        }
        records = []
        for s in rows:
            attack = (
                {
                    "name": report.WORST,
                    "kind": "adaptive",
                    "rows": [r.name for r in rows if r.name in report.ROWS],
                }
                if s.name == report.WORST
                else self.attack_settings(s.name)
            )
            rec = make_record(
                classifier={"path": ci["path"], "sha256": ci["sha256"], "arch": ci.get("arch")},
                head={
                    "path": hi["path"],
                    "sha256": hi["sha256"],
                    "classifier_sha256": hi.get("classifier_sha256"),
                },
                data=data,
                attack=attack,
                defense=defense,
                n=s.n,
                accuracy=s.mean,
                loss=s.loss,
                ssl_loss_before=None,
                ssl_loss_after=None,
                seconds_per_image=s.seconds_per_image,
                wall_seconds_per_image=(wall / n) if wall else None,
                passes_per_image=s.passes_per_image,
            )
            rec["adaptive"] = {
                "static_accuracy": s.static,
                "static_accuracy_ci95": list(s.static_ci),
                "defended_accuracy_mean": s.mean,
                "defended_accuracy_worst_case": s.worst,
                "defended_worst_case_ci95": list(s.worst_ci),
                "draws": s.draws,
                "eot": self.eot,
                "deployed_purifier": self.purifier.settings(),
                "attack_purifier": self.attack_purifier.settings(),
                "attack_purifier_is_deployed": self.attack_is_deployed,
                "interval": "Wilson score, 95 %",
            }
            if s.name == "transfer_apgd" and "transfer_apgd.static_ce" in merged:
                rec["adaptive"]["static_accuracy_apgd_ce"] = float(
                    merged["transfer_apgd.static_ce"].double().mean()
                )
                rec["adaptive"]["static_accuracy_apgd_dlr"] = float(
                    merged["transfer_apgd.static_dlr"].double().mean()
                )
            if s.name in ("bpda_apgd_ce", report.WORST) and conv is not None:
                rec["adaptive"]["convergence"] = conv
            if s.name == report.WORST:
                rec["adaptive"]["eps_sweep"] = points
                rec["adaptive"]["eps_sweep_reaches_zero"] = reaches_zero
                rec["adaptive"]["verdict"] = verdict
            records.append(rec)
            save_record(rec, out / f"record_{s.name}.json")
        save_jsonl(records, out / "records.jsonl")
        summary = {
            "title": title,
            "rows": [s.as_dict() for s in rows],
            "eps_sweep": points,
            "eps_sweep_reaches_zero": reaches_zero,
            "eps_sweep_plot": str(plot) if plot else None,
            "convergence": conv,
            "paired_difference": paired,
            "verdict": verdict,
            "wall_seconds": wall,
            "settings": {k: v for k, v in dict(self.hparams).items()},
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (out / "table.md").write_text(table + "\n" + verdict + "\n")
        atomic_save(merged, out / "outputs.pt")
        lines = [table]
        if points:
            sweep = ", ".join(f"{p['eps_255']:.3g}: {100 * p['worst']:.1f}" for p in points)
            zero = {True: "reaches ~0", False: "does NOT reach ~0 (gradient masking?)"}
            lines.append(
                f"ε sweep (ε·255: defended worst-case %): {sweep}; {zero[reaches_zero]} -> {plot}"
            )
        if conv is not None:
            moved = ", ".join(
                f"{k} " + ("not run" if v is None else f"{100 * v['delta']:+.1f} pt")
                for k, v in conv["variants"].items()
            )
            lines.append(
                f"convergence (doubling; worst case {100 * conv['base_worst']:.1f} %): {moved} -> "
                + ("converged" if conv["converged"] else "NOT converged (moved by >= 1 point)")
            )
        lines.append(verdict)
        lines.append(f"wrote {out}/ (table.md, summary.json, record_*.json, records.jsonl)")
        print("\n".join(lines), flush=True)
        return summary
