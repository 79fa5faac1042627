"""revlit's adaptive attack beside the reference libraries, on the same images.

On the first ``n`` CIFAR-10 test images (Linf, ε = 8/255 by default):

* ``static_aa_standard``: AutoAttack ``standard`` (APGD-CE, APGD-T, FAB-T, Square) on the
  undefended classifier;
* ``aa_rand_bpda``: AutoAttack ``rand`` (APGD-CE + APGD-DLR with EOT) on
  :class:`revlit.defended.DefendedClassifier` in BPDA mode, fresh purifier randomness per call;
* ``torchattacks_apgd_bpda``: torchattacks' APGD (CE) with ``eot_iter`` on the same wrapper;
* ``revlit_bpda_apgd``: revlit's own BPDA+EOT APGD-CE (:func:`revlit.attacks.adaptive.bpda_eot_attack`)
  through the same purifier.

Every defended row's final points are judged by ``draws`` fresh draws of the deployed defense
(:func:`revlit.attacks.adaptive.evaluate_defense`, in batches of ``batch_size``); an image counts
as robust when every draw classifies it correctly and the attack itself never broke it (AutoAttack's
robust flags; revlit's ``broken``). Per-image correctness goes to ``outputs.pt`` after every row;
``summary.json`` and ``table.md`` hold the accuracies with 95 % Wilson intervals and the paired
differences (each defended row minus the static AutoAttack row; revlit minus each library on the
defended model: a positive value means revlit's attack is weaker on those images).

Needs the optional extra ``revlit[zoo]`` (pyautoattack, torchattacks)::

    python -m benchmarks.autoattack_compare --n 500 --out results/autoattack_compare

Options size it to a budget (``--iters``, ``--eot``, ``--draws``, ``--rows``); the record states the
machine and date.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROWS = ("static_aa_standard", "aa_rand_bpda", "torchattacks_apgd_bpda", "revlit_bpda_apgd")
LABELS = {
    "static_clean": "undefended, clean",
    "static_aa_standard": "undefended, AutoAttack standard",
    "defended_clean": "defended, clean",
    "aa_rand_bpda": "defended, AutoAttack rand (BPDA)",
    "torchattacks_apgd_bpda": "defended, torchattacks APGD-CE+EOT (BPDA)",
    "revlit_bpda_apgd": "defended, revlit BPDA+EOT APGD-CE",
}
#: paired comparisons (a minus b) reported in the summary
PAIRS = (
    ("aa_rand_bpda", "static_aa_standard"),
    ("torchattacks_apgd_bpda", "static_aa_standard"),
    ("revlit_bpda_apgd", "static_aa_standard"),
    ("revlit_bpda_apgd", "aa_rand_bpda"),
    ("revlit_bpda_apgd", "torchattacks_apgd_bpda"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.autoattack_compare", description=__doc__.splitlines()[0]
    )
    p.add_argument("--n", type=int, default=500, help="first n test images")
    p.add_argument("--classifier", default="checkpoints/resnet20_at.pt", help="classifier spec")
    p.add_argument("--head", default="checkpoints/resnet20_at_head.pt")
    p.add_argument("--eps", default="8/255")
    p.add_argument("--iters", type=int, default=20, help="APGD iterations of the defended rows")
    p.add_argument("--eot", type=int, default=1, help="EOT draws per gradient (defended rows)")
    p.add_argument("--draws", type=int, default=3, help="deployed draws judging each point")
    p.add_argument("--purifier-steps", type=int, default=None, help="default: the purifier's")
    p.add_argument("--purifier-views", type=int, default=None, help="default: the purifier's")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.environ.get("REVLIT_DATA_DIR", "data"))
    p.add_argument("--out", default="results/autoattack_compare")
    a = p.parse_args(argv)
    rows = [r for r in a.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    for name in ("n", "iters", "eot", "draws", "batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if bad or not rows:
        p.error(f"unknown row(s) {bad}; known: {', '.join(ROWS)}")
    a.rows = rows
    return a


def _batches(n: int, bs: int):
    for s in range(0, n, bs):
        yield slice(s, min(s + bs, n))


class Runner:
    """The loaded parts and the per-image outputs of one comparison."""

    def __init__(self, a: argparse.Namespace) -> None:
        from revlit.data.cifar import load_cifar10
        from revlit.defended import load_defended
        from revlit.utils import as_float

        self.a = a
        self.eps = as_float(a.eps, "eps")
        kw = {}
        if a.purifier_steps is not None:
            kw["steps"] = a.purifier_steps
        if a.purifier_views is not None:
            kw["n_views"] = a.purifier_views
        x, y = load_cifar10(a.data_dir, train=False)
        if a.n >= len(y):
            raise ValueError(f"--n {a.n} must be below the {len(y)} test images")
        self.x, self.y = x[: a.n].float().div_(255.0), y[: a.n].clone()
        # a lone image (AutoAttack attacks the points still robust) is purified beside the next
        # test image, a clean batch-mate outside the n evaluated
        context = x[a.n : a.n + 1].float().div_(255.0)
        self.model, self.info = load_defended(
            a.classifier, a.head, "bpda", seed=a.seed, context=context, **kw
        )
        self.net = self.model.classifier.requires_grad_(False)
        self.purifier = self.model.purify  # (x, generator) -> purified x, batch of one padded
        self.out: dict[str, torch.Tensor] = {"index": torch.arange(a.n), "label": self.y}
        self.seconds: dict[str, float] = {}
        self.passes: dict[str, float] = {}

    # -------------------------------------------------------------------- judging
    def judge(self, x_adv: torch.Tensor, k: int) -> torch.Tensor:
        """(draws, n) bool: deployed draws classifying each point correctly (batch by batch)."""
        from revlit.attacks.adaptive import evaluate_defense

        cols = []
        for j, sl in enumerate(_batches(self.a.n, self.a.batch_size)):
            g = torch.Generator().manual_seed(self.a.seed * 1_000_003 + 1000 * k + j)
            c, _ = evaluate_defense(self.net, self.purifier, x_adv[sl], self.y[sl], self.a.draws, g)
            cols.append(c)
        return torch.cat(cols, 1)

    @torch.no_grad()
    def static_correct(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(x[sl]).argmax(1) == self.y[sl] for sl in _batches(len(x), 250)])

    # -------------------------------------------------------------------- rows
    def run(self, row: str, k: int) -> None:
        from revlit.attacks.adaptive import counting_passes

        t0 = time.perf_counter()
        with counting_passes(self.net) as count:
            getattr(self, row)(k)
        self.seconds[row] = time.perf_counter() - t0
        self.passes[row] = count[0] / self.a.n

    def static_aa_standard(self, k: int) -> None:
        from pyautoattack import AutoAttack

        aa = AutoAttack(self.net, norm="Linf", eps=self.eps, version="standard", seed=self.a.seed)
        x_adv, _ = aa.run_standard_evaluation(self.x, self.y, batch_size=self.a.batch_size)
        self.out["static_aa_standard.robust"] = self.static_correct(x_adv)

    def aa_rand_bpda(self, k: int) -> None:
        from pyautoattack import AutoAttack, checks

        # AutoAttack's check_dynamic traces every Python line of one forward (sys.settrace): on
        # the purifier's 40-step loop it costs minutes and only warns that the model is dynamic,
        # which this one is by design. The attacks themselves are unchanged.
        checks.check_dynamic = lambda *args, **kwargs: None
        aa = AutoAttack(self.model, norm="Linf", eps=self.eps, version="rand", seed=self.a.seed)
        aa.apgd.n_iter, aa.apgd.eot_iter = self.a.iters, self.a.eot
        x_adv, y_adv = aa.run_standard_evaluation(self.x, self.y, batch_size=self.a.batch_size)
        # AutoAttack's own verdict: y_adv is the clean prediction, replaced by the wrong one that
        # broke the point (each judged by one call of the randomized model)
        self._defended("aa_rand_bpda", x_adv, y_adv == self.y, k)

    def torchattacks_apgd_bpda(self, k: int) -> None:
        import torchattacks

        atk = torchattacks.APGD(self.model, norm="Linf", eps=self.eps, steps=self.a.iters,
                                n_restarts=1, seed=self.a.seed, loss="ce",
                                eot_iter=self.a.eot)  # fmt: skip
        x_adv = torch.cat(
            [atk(self.x[sl], self.y[sl]) for sl in _batches(self.a.n, self.a.batch_size)]
        )
        self._defended("torchattacks_apgd_bpda", x_adv, torch.ones(self.a.n, dtype=torch.bool), k)

    def revlit_bpda_apgd(self, k: int) -> None:
        from revlit.attacks.adaptive import bpda_eot_attack

        xs, ok = [], []
        for j, sl in enumerate(_batches(self.a.n, self.a.batch_size)):
            g = torch.Generator().manual_seed(self.a.seed * 1_000_003 + 1000 * k + 500 + j)
            d = torch.Generator().manual_seed(self.a.seed * 1_000_003 + 1000 * k + 700 + j)
            res = bpda_eot_attack(self.net, self.purifier, self.x[sl], self.y[sl], "apgd", "ce",
                                  "l_inf", self.eps, None, self.a.iters, 1, self.a.eot,
                                  generator=g, draw_generator=d)  # fmt: skip
            xs.append(res.x_adv)
            ok.append(~res.broken)
        self._defended("revlit_bpda_apgd", torch.cat(xs), torch.cat(ok), k)

    def _defended(self, row: str, x_adv: torch.Tensor, attack_ok: torch.Tensor, k: int) -> None:
        if (x_adv - self.x).abs().max() > self.eps + 1e-6 or x_adv.min() < 0 or x_adv.max() > 1:
            raise RuntimeError(f"{row}: points outside the ε-ball or [0, 1]")
        draws = self.judge(x_adv, k)
        self.out[f"{row}.draws"] = draws
        self.out[f"{row}.attack_ok"] = attack_ok
        self.out[f"{row}.robust"] = draws.all(0) & attack_ok

    def clean(self) -> None:
        self.out["static_clean.robust"] = self.static_correct(self.x)
        draws = self.judge(self.x, 99)
        self.out["defended_clean.draws"] = draws
        self.out["defended_clean.robust"] = draws.all(0)


# ------------------------------------------------------------------------ summary
def summarize(out: dict[str, torch.Tensor]) -> dict:
    from revlit.adaptive_report import Z95, paired_difference, wilson_interval

    rows = {}
    for name in LABELS:
        if f"{name}.robust" in out:
            r = out[f"{name}.robust"].bool()
            k, n = int(r.sum()), int(r.numel())
            rows[name] = {"label": LABELS[name], "n": n, "accuracy": k / n,
                          "ci95": list(wilson_interval(k, n))}  # fmt: skip
            if f"{name}.draws" in out:
                rows[name]["mean_over_draws"] = float(out[f"{name}.draws"].double().mean())
    pairs = []
    for a, b in PAIRS:
        if f"{a}.robust" in out and f"{b}.robust" in out:
            d = paired_difference(
                {"final.robust": out[f"{a}.robust"], f"{b}.static": out[f"{b}.robust"]}, b
            )
            pairs.append(
                {
                    "a": a,
                    "b": b,
                    **{k: v for k, v in d.items() if k not in ("defended_worst", "static")},
                }
            )
    return {"rows": rows, "paired": pairs, "z": Z95}


def table(summary: dict, head: str) -> str:
    lines = [head, "", "| row | n | accuracy | 95 % CI |", "| --- | ---: | ---: | --- |"]
    for r in summary["rows"].values():
        lo, hi = r["ci95"]
        lines.append(
            f"| {r['label']} | {r['n']} | {100 * r['accuracy']:.1f} % | {100 * lo:.1f}–{100 * hi:.1f} % |"
        )
    if summary["paired"]:
        lines += ["", "| a − b (same images) | difference | 95 % CI | only a | only b |",
                  "| --- | ---: | --- | ---: | ---: |"]  # fmt: skip
        for p in summary["paired"]:
            lo, hi = p["ci"]
            lines.append(f"| {LABELS[p['a']]} − {LABELS[p['b']]} | {100 * p['difference']:+.1f} pt | "
                         f"{100 * lo:+.1f} to {100 * hi:+.1f} | {p['only_defended']} | {p['only_static']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    for mod in ("pyautoattack", "torchattacks"):
        need = {"pyautoattack": ("static_aa_standard", "aa_rand_bpda"),
                "torchattacks": ("torchattacks_apgd_bpda",)}[mod]  # fmt: skip
        if any(r in a.rows for r in need):
            try:
                __import__(mod)
            except ImportError:
                print(
                    f"autoattack_compare: error: {mod} missing: pip install 'revlit[zoo]'",
                    file=sys.stderr,
                )
                return 2
    out_dir = Path(a.out)
    if out_dir.exists() and any(out_dir.iterdir()):
        print(
            f"autoattack_compare: error: {out_dir} is not empty; choose another --out",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(a.seed)
    try:
        r = Runner(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"autoattack_compare: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    from revlit.io import atomic_save, atomic_write_json, atomic_write_text, git_commit

    t_all = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    r.clean()
    r.seconds["clean"] = time.perf_counter() - t0
    for k, row in enumerate(a.rows):
        print(f"== {row}", flush=True)
        r.run(row, k)
        atomic_save(r.out, out_dir / "outputs.pt")
        print(
            f"   {r.seconds[row]:.0f} s, {r.passes[row]:.0f} backbone passes per image", flush=True
        )
    summary = summarize(r.out)
    summary.update({
        "settings": {**vars(a), "eps": r.eps, "defense": r.info["defense"]},
        "classifier": {k: r.info["classifier"][k] for k in ("path", "sha256", "arch")},
        "head": {k: r.info["head"][k] for k in ("path", "sha256")},
        "seconds": r.seconds, "backbone_passes_per_image": r.passes,
        "wall_seconds": time.perf_counter() - t_all,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": git_commit(),
    })  # fmt: skip
    head = (f"Linf ε = {r.eps * 255:.3g}/255, n = {a.n}, {a.iters} APGD iterations, EOT m = {a.eot}, "
            f"r = {a.draws} deployed draws, purifier {r.model.defense.steps} steps × {r.model.defense.n_views} views")  # fmt: skip
    text = table(summary, head)
    atomic_write_json(summary, out_dir / "summary.json")
    atomic_write_text(text + "\n", out_dir / "table.md")
    print(text)
    print(
        f"wrote {out_dir}/ (outputs.pt, summary.json, table.md) in {summary['wall_seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
