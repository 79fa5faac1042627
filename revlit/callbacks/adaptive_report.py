"""AdaptiveReport: the adaptive evaluation's writer: table, records and plots, once, on rank 0.

After ``cli.py predict`` with :class:`revlit.modules.adaptive.AdaptiveModule`, the finished batches
are kept and the ranks merged by test index (:class:`revlit.callbacks.writers.RankMergeWriter`: the
one rank merge, with ``overwrite``/``resume``), and rank 0 writes to ``output_dir``: ``table.md``
(table + verdict), ``summary.json``, ``record_<row>.json`` and ``records.jsonl``
(:mod:`revlit.records`), ``predictions.pt`` (the merged outputs: ``python -m
revlit.adaptive_report predictions.pt`` prints the table again), ``eps_sweep.png`` and
``convergence.png`` when those checks ran; then it prints the table. The statistics are
:mod:`revlit.adaptive_report`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from revlit import adaptive_report as report
from revlit.attacks.cascade import order_by_cost, purify_passes
from revlit.callbacks.writers import RankMergeWriter
from revlit.io import atomic_save, atomic_write_json, atomic_write_text
from revlit.records import make_record, save_jsonl, save_record


class AdaptiveReport(RankMergeWriter):
    """Write the adaptive evaluation's table, records and plots (rank 0, once per test run).

    Args:
        output_dir, overwrite, resume: see :class:`revlit.callbacks.writers.RankMergeWriter`.
    """

    def __init__(
        self, output_dir: str = "results/adaptive", overwrite: bool = False, resume: bool = False
    ) -> None:
        super().__init__(output_dir, overwrite, resume)
        self.result_dir = Path(output_dir)
        self.summary: dict | None = None
        self._t0: float | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        self._t0, self.summary = time.perf_counter(), None

    def finalize(self, merged: dict[str, torch.Tensor], trainer, pl_module) -> None:
        if merged:
            self.summary = self.write(merged, describe(pl_module), trainer)

    def write(self, merged: dict[str, torch.Tensor], info: dict, trainer=None) -> dict:
        """Table, records, plots, convergence check and verdict from merged outputs."""
        out = self.output_dir
        wall = time.perf_counter() - self._t0 if self._t0 is not None else None
        dm = getattr(trainer, "datamodule", None)
        rows = report.summarize_table(merged)
        n = rows[0].n
        d = info["defense"]
        title = (
            f"Adaptive evaluation, {info['norm']} ε = {info['eps'] * 255:.3g}/255: n = {n}, "
            f"r = {info['draws']} evaluation draws of the deployed purifier "
            f"({d.get('steps')} steps × {d.get('n_views')} views, ε_r = "
            f"{d.get('eps', 0) * 255:.3g}/255)"
        )
        table = report.format_table(rows, title, info["cascade"])
        points = report.sweep_points(merged)
        reaches_zero = report.sweep_reaches_zero(points)
        conv = report.convergence_check(merged)
        paired = report.paired_difference(merged)
        converged = conv["converged"] if conv else None
        verdict = report.verdict(rows, converged, reaches_zero, paired)
        plots = {}
        if points:
            plots["eps_sweep"] = str(report.plot_sweep(points, out / "eps_sweep.png",
                f"{report.LABELS.get(points[0]['attack'], points[0]['attack'])} vs. ε, "
                f"r = {info['draws']}, n = {n}"))  # fmt: skip
        if conv:
            plots["convergence"] = str(report.plot_convergence(conv, out / "convergence.png"))
        data = {
            "split": "clean", "source": "CIFAR-10 test set (attacked here)", "n": n,
            "test_subset": getattr(dm, "test_subset", None),
            "first_index": int(merged["index"].min()), "last_index": int(merged["index"].max()),
        }  # fmt: skip
        defense = {**d, "batch_size": getattr(dm, "eval_batch_size", None), "draws": info["draws"],
                   "world_size": trainer.world_size if trainer is not None else 1}  # fmt: skip
        records = []
        for s in rows:
            attack = info["attacks"].get(s.name, {"name": s.name, "kind": "adaptive"})
            rec = make_record(
                classifier=info["classifier"], head=info["head"], data=data,
                attack={**attack, "norm": info["norm"], "eps": info["eps"],
                        "cascade": info["cascade"]},
                defense=defense, n=s.n, accuracy=s.mean, loss=s.loss, ssl_loss_before=None,
                ssl_loss_after=None, seconds_per_image=s.seconds_per_image,
                wall_seconds_per_image=(wall / n) if wall else None,
                passes_per_image=s.passes_per_image,
            )  # fmt: skip
            rec["adaptive"] = {
                "images_attacked": s.attacked, "static_accuracy": s.static,
                "static_accuracy_ci95": list(s.static_ci), "defended_accuracy_mean": s.mean,
                "defended_accuracy_worst_case": s.worst,
                "defended_worst_case_ci95": list(s.worst_ci), "draws": s.draws,
                "interval": "Wilson score, 95 %",
            }  # fmt: skip
            if s.name == report.REFERENCE and f"{s.name}.static_ce" in merged:
                for loss in ("ce", "dlr"):
                    acc = float(merged[f"{s.name}.static_{loss}"].double().mean())
                    rec["adaptive"][f"static_accuracy_apgd_{loss}"] = acc
            if s.name == report.WORST:
                rec["adaptive"].update({"convergence": conv, "paired_difference": paired,
                                        "eps_sweep": points, "verdict": verdict,
                                        "eps_sweep_reaches_zero": reaches_zero})  # fmt: skip
            records.append(rec)
            save_record(rec, out / f"record_{s.name}.json")
        save_jsonl(records, out / "records.jsonl")
        summary = {
            "title": title, "rows": [s.as_dict() for s in rows], "eps_sweep": points,
            "eps_sweep_reaches_zero": reaches_zero, "convergence": conv,
            "paired_difference": paired, "broken_by": report.break_confusion(merged),
            "verdict": verdict, "plots": plots,
            "wall_seconds": wall, "settings": info,
        }  # fmt: skip
        atomic_write_json(summary, out / "summary.json", default=str)
        atomic_write_text(table + "\n" + verdict + "\n", out / "table.md")
        atomic_save(merged, out / "predictions.pt")
        print("\n".join([table, *self._lines(points, reaches_zero, conv), verdict,
                         f"wrote {self.result_dir}/ (table.md, summary.json, record_*.json, records.jsonl"
                         f"{''.join(', ' + Path(p).name for p in plots.values())})"]),
              flush=True)  # fmt: skip
        return summary

    @staticmethod
    def _lines(points: list[dict], reaches_zero: bool | None, conv: dict | None) -> list[str]:
        lines = []
        if points:
            sweep = ", ".join(f"{p['eps_255']:.3g}: {100 * p['worst']:.1f}" for p in points)
            zero = {True: "reaches ~0", False: "does NOT reach ~0 (gradient masking?)"}
            lines.append(f"ε sweep (ε·255: defended worst-case %): {sweep}; {zero[reaches_zero]}")
        if conv is not None:
            moved = ", ".join(
                f"2x {k} " + ("not run" if v is None else f"{100 * v['delta']:+.1f} pt")
                for k, v in conv["variants"].items()
            )
            ok = "converged" if conv["converged"] else "NOT converged (moved by >= 1 point)"
            lines.append(
                f"convergence (worst case {100 * conv['base_worst']:.1f} %): {moved} -> {ok}"
            )
        return lines


def describe(module) -> dict:
    """What an :class:`revlit.modules.adaptive.AdaptiveModule` evaluated, for the records."""
    ci, hi, t = module.classifier_info, module.head_info, module.target
    passes = purify_passes(module.defense)
    order = order_by_cost(module.attacks, passes, t.draws)
    return {
        "classifier": {"path": ci["path"], "sha256": ci["sha256"], "arch": ci.get("arch")},
        "head": {"path": hi["path"], "sha256": hi["sha256"],
                 "classifier_sha256": hi.get("classifier_sha256")},
        "defense": {**module.defense.settings(), **module.ssl_setting, "seed": t.seed,
                    "bank": module.hparams.get("bank"),
                    "seeding": "per batch: seed * 2**24 + first test index, + attack"},
        "attacks": {a.name: {**a.settings(), "estimated_passes_per_attacked_image":
                             a.cost(passes, t.draws)} for a in order},
        "order": [a.name for a in order], "norm": t.norm.value, "eps": t.eps, "draws": t.draws,
        "cascade": module.cascade, "sweep_eps": module.sweep_eps,
        "convergence": module.convergence,
    }  # fmt: skip
