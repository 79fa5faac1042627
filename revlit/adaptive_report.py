"""The adaptive evaluation's statistics: table rows, 95 % intervals, paired difference, ε sweep,
convergence check, verdict, and the two plots. Framework-free.

They read the merged per-example outputs of :func:`revlit.attacks.cascade.adaptive_batch`, a dict of
tensors whose first dimension is the example, with one group of keys per attack row
``<row>.<field>`` (rows in the order they ran, cheapest first):

- ``attacked`` (N,) bool: the row attacked the example (with the cascade, only unbroken examples);
- ``static``  (N,) bool: the undefended classifier is right on the row's point;
- ``draws``   (N, r) bool: the defended classifier is right in each of r fresh deployed draws;
- ``ce``      (N, r) float: its cross-entropy in each draw;
- ``broken_iter`` (N,) bool: the deployed purifier misclassified an attack iterate;
- ``passes`` / ``seconds`` (N,) float: backbone passes and seconds the row spent, per example;

and ``final.robust`` (N,) bool, the per-example worst case over all rows. With the cascade a row
that did not attack an example carries the example's worst point so far, so each row is the worst
case after the attacks up to it. Rows ``sweep<i>/<row>`` and ``conv_<what>/<row>`` (with their own
``final.robust``) hold the ε sweep and the convergence variants.

Accuracies are fractions in [0, 1]. Worst case (Carlini et al. 2019): an example is robust only if
no evaluation draw and no counted iterate misclassified it; it is never above the mean over draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from revlit.io import atomic_path

WORST = "worst_case"
#: the static reference: the undefended classifier under APGD-CE + APGD-DLR
REFERENCE = "transfer_apgd_ce_dlr"
LABELS = {
    "transfer_pgd": "transfer PGD",
    "transfer_apgd_ce": "transfer APGD-CE",
    "transfer_apgd_dlr": "transfer APGD-DLR",
    REFERENCE: "transfer APGD-CE+DLR",
    "defense_aware": "defense-aware PGD",
    "bpda_pgd": "BPDA+EOT PGD",
    "bpda_apgd_ce": "BPDA+EOT APGD-CE",
    "bpda_apgd_dlr": "BPDA+EOT APGD-DLR",
    WORST: "worst case over all rows",
}
#: the convergence variants: what is doubled
VARIANTS = ("iterations", "eot", "restarts", "draws")
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (95 % for the default z).

    Wilson (1927): the p with |k/n − p| ≤ z·sqrt(p(1 − p)/n), i.e.
    (p̂ + z²/2n ± z·sqrt(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n). Unlike the normal approximation it
    stays inside [0, 1] and is not degenerate at k = 0 or k = n.

    Raises:
        ValueError: n < 1 or k outside [0, n].
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"Wilson interval needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class RowSummary:
    """One row of the table (accuracies are fractions; intervals are 95 % Wilson)."""

    name: str
    label: str
    n: int
    attacked: int
    draws: int
    static: float
    mean: float
    worst: float
    loss: float
    passes_per_image: float
    seconds_per_image: float
    static_ci: tuple[float, float]
    worst_ci: tuple[float, float]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["static_ci"], d["worst_ci"] = list(self.static_ci), list(self.worst_ci)
        return d


def row_names(merged: dict[str, torch.Tensor], prefix: str = "") -> list[str]:
    """The rows under ``prefix`` (``""``: the table's), in the order they ran."""
    out = []
    for key in merged:
        if key.startswith(prefix) and key.endswith(".draws"):
            name = key[len(prefix) : -len(".draws")]
            if "/" not in name:
                out.append(name)
    return out


def row_robust(merged: dict[str, torch.Tensor], row: str) -> torch.Tensor:
    """Per-example worst-case robustness of a row: right in every draw, never broken (N,) bool."""
    return merged[f"{row}.draws"].bool().all(1) & ~merged[f"{row}.broken_iter"].bool()


def summarize_row(
    merged: dict[str, torch.Tensor], row: str, label: str | None = None
) -> RowSummary:
    """The table row of one attack from the merged outputs."""
    draws = merged[f"{row}.draws"].bool()
    n, r = draws.shape
    static = merged[f"{row}.static"].bool()
    ks, kw = int(static.sum()), int(row_robust(merged, row).sum())
    attacked = merged.get(f"{row}.attacked", torch.ones(n, dtype=torch.bool))
    return RowSummary(
        name=row, label=label or LABELS.get(row.rsplit("/", 1)[-1], row), n=n,
        attacked=int(attacked.sum()), draws=r, static=ks / n, mean=float(draws.double().mean()),
        worst=kw / n, loss=float(merged[f"{row}.ce"].double().mean()),
        passes_per_image=float(merged[f"{row}.passes"].double().mean()),
        seconds_per_image=float(merged[f"{row}.seconds"].double().mean()),
        static_ci=wilson_interval(ks, n), worst_ci=wilson_interval(kw, n),
    )  # fmt: skip


def summarize_worst(merged: dict[str, torch.Tensor], prefix: str = "") -> RowSummary:
    """The per-example worst case over the rows under ``prefix``.

    static: right under every row's point; mean: per example the lowest fraction of correct draws
    over the rows, averaged; worst: ``final.robust``; passes/seconds: summed over the rows.
    """
    rows = [prefix + r for r in row_names(merged, prefix)]
    if not rows:
        raise ValueError("no rows to take the worst case over")
    static = torch.stack([merged[f"{r}.static"].bool() for r in rows]).all(0)
    robust = merged[f"{prefix}final.robust"].bool()
    per = torch.stack([merged[f"{r}.draws"].double().mean(1) for r in rows]).amin(0)
    ce = torch.stack([merged[f"{r}.ce"].double().mean(1) for r in rows]).amax(0)
    n = len(static)
    ks, kw = int(static.sum()), int(robust.sum())
    return RowSummary(
        name=WORST, label=LABELS[WORST], n=n, attacked=n,
        draws=min(int(merged[f"{r}.draws"].shape[1]) for r in rows), static=ks / n,
        mean=float(per.mean()), worst=kw / n, loss=float(ce.mean()),
        passes_per_image=sum(float(merged[f"{r}.passes"].double().mean()) for r in rows),
        seconds_per_image=sum(float(merged[f"{r}.seconds"].double().mean()) for r in rows),
        static_ci=wilson_interval(ks, n), worst_ci=wilson_interval(kw, n),
    )  # fmt: skip


def summarize_table(merged: dict[str, torch.Tensor]) -> list[RowSummary]:
    """The table: every row in the order it ran, then the per-example worst case."""
    rows = [summarize_row(merged, r) for r in row_names(merged)]
    return rows + [summarize_worst(merged)] if rows else rows


def _pct(v: float) -> str:
    return f"{100 * v:6.2f}"


def format_table(rows: Sequence[RowSummary], title: str = "", cascade: bool = True) -> str:
    """The table as markdown (accuracies in %, 95 % Wilson intervals for static and worst case)."""
    head = (
        "| attack | images attacked | static acc. % | defended acc. % (mean over draws) "
        "| defended worst case % | backbone passes / image |\n|---|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {s.label} | {s.attacked} | {_pct(s.static)} [{100 * s.static_ci[0]:.1f}, "
        f"{100 * s.static_ci[1]:.1f}] | {_pct(s.mean)} | {_pct(s.worst)} "
        f"[{100 * s.worst_ci[0]:.1f}, {100 * s.worst_ci[1]:.1f}] | {s.passes_per_image:.0f} |"
        for s in rows
    ]
    n, r = (rows[0].n, rows[0].draws) if rows else (0, 0)
    how = (
        "attacks ran cheapest first, each only on images no earlier attack broke; a row is the "
        "worst case after the attacks up to it"
        if cascade
        else "every attack ran on every image"
    )
    foot = (
        f"\nn = {n} images, r = {r} evaluation draws of the deployed purifier; {how}; "
        "passes = backbone passes actually spent, per image of the test set; "
        "[lo, hi] = 95 % Wilson interval.\n"
    )
    return (f"{title}\n\n" if title else "") + head + "\n".join(lines) + "\n" + foot


# ----------------------------------------------------------------------------- ε sweep
def sweep_points(merged: dict[str, torch.Tensor]) -> list[dict]:
    """The defended model under the sweep attack at each ε (rows ``sweep<i>/<row>``, ε in
    ``sweep<i>/eps``), in the order they ran."""
    out = []
    i = 0
    while f"sweep{i}/eps" in merged:
        eps, i = float(merged[f"sweep{i}/eps"][0]), i + 1
        names = row_names(merged, f"sweep{i - 1}/")
        s = summarize_row(merged, f"sweep{i - 1}/{names[0]}", f"ε = {eps * 255:.3g}/255")
        out.append({"eps": float(eps), "eps_255": float(eps) * 255, "attack": names[0],
                    "static": s.static, "mean": s.mean, "worst": s.worst,
                    "worst_ci": list(s.worst_ci), "n": s.n, "draws": s.draws,
                    "passes_per_image": s.passes_per_image})  # fmt: skip
    return out


def sweep_reaches_zero(points: Sequence[dict], tol: float = 0.02) -> bool | None:
    """Whether the defended worst case at the largest ε is ≤ ``tol`` (None without points).

    Carlini et al. (2019): accuracy must approach 0 as ε grows; if it does not, the attack is not
    finding what exists (gradient masking) rather than the model being robust.
    """
    if not points:
        return None
    last = max(points, key=lambda p: p["eps"])
    return bool(last["worst"] <= tol)


def plot_sweep(points: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """PNG: static, defended-mean and defended-worst accuracy against ε (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    xs = [q["eps_255"] for q in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot(xs, [100 * q["static"] for q in points], "s:", color="0.5", label="undefended (static)")
    ax.plot(xs, [100 * q["mean"] for q in points], "o-", label="defended, mean over draws")
    ax.plot(xs, [100 * q["worst"] for q in points], "v--", label="defended, worst case")
    lo = [100 * q["worst_ci"][0] for q in points]
    hi = [100 * q["worst_ci"][1] for q in points]
    ax.fill_between(xs, lo, hi, alpha=0.15, color="C1", label="95 % Wilson (worst case)")
    ax.set_xlabel("ε (×1/255, Linf)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    n = points[0]["n"] if points else 0
    ax.set_title(title or f"BPDA+EOT vs. ε (n = {n})", fontsize=9)
    fig.tight_layout()
    with atomic_path(p) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return p


# ------------------------------------------------------------------------- convergence
def convergence_check(merged: dict[str, torch.Tensor], threshold: float = 0.01) -> dict | None:
    """Does doubling each budget (iterations, EOT draws m, restarts, evaluation draws r) move the
    worst case by less than ``threshold`` (0.01 = one point)?

    Returns:
        ``{"base_worst", "threshold", "n", "variants": {what: {"worst", "worst_ci", "delta",
        "examples_changed"}}, "converged"}`` (None without variants): ``converged`` is True iff
        every variant moved the worst case by less than the threshold (None if one is missing).
        With n examples one example moves the accuracy by 1/n: below n = 100 one example already
        exceeds a point.
    """
    if not any(f"conv_{v}/final.robust" in merged for v in VARIANTS):
        return None
    base = merged["final.robust"].bool()
    n = int(base.numel())
    out: dict = {"base_worst": float(base.double().mean()), "threshold": threshold, "n": n}
    res, ok = {}, True
    for what in VARIANTS:
        key = f"conv_{what}/final.robust"
        if key not in merged:
            res[what], ok = None, (None if ok else ok)
            continue
        v = merged[key].bool()
        k = int(v.sum())
        delta = (k - int(base.sum())) / n
        res[what] = {"worst": k / n, "worst_ci": list(wilson_interval(k, n)), "delta": delta,
                     "examples_changed": int((v != base).sum())}  # fmt: skip
        if abs(delta) >= threshold:
            ok = False
    out["variants"], out["converged"] = res, ok
    return out


def plot_convergence(conv: dict, path: str | Path, title: str = "") -> Path:
    """PNG: the worst case of the base budget and of each doubled budget, with 95 % intervals and
    the ±1-point band around the base (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = {"iterations": "iterations", "eot": "EOT draws m", "restarts": "restarts",
             "draws": "evaluation draws r"}  # fmt: skip
    names = ["base budget"] + [f"2× {label[w]}" for w, v in conv["variants"].items() if v]
    vals = [conv["base_worst"]] + [v["worst"] for v in conv["variants"].values() if v]
    cis = [wilson_interval(round(conv["base_worst"] * conv["n"]), conv["n"])]
    cis += [tuple(v["worst_ci"]) for v in conv["variants"].values() if v]
    fig, ax = plt.subplots(figsize=(6.0, 3.4), dpi=120)
    ys = list(range(len(names)))[::-1]
    b = 100 * conv["base_worst"]
    ax.axvspan(b - 100 * conv["threshold"], b + 100 * conv["threshold"], color="C2", alpha=0.15,
               label=f"base ± {100 * conv['threshold']:.0f} point")  # fmt: skip
    for y, v, (lo, hi) in zip(ys, vals, cis, strict=True):
        ax.errorbar(100 * v, y, xerr=[[100 * (v - lo)], [100 * (hi - v)]], fmt="o", color="C0",
                    capsize=3)  # fmt: skip
        ax.annotate(f"{100 * v:.1f} %", (100 * v, y), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=8)  # fmt: skip
    ax.set_yticks(ys, names)
    ax.set_ylim(-0.6, len(names) - 0.2)
    ax.set_xlabel("defended worst-case accuracy (%), 95 % Wilson interval")
    verdict = "converged" if conv["converged"] else "NOT converged"
    ax.set_title(title or f"Convergence (n = {conv['n']}): {verdict}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return p


def break_confusion(merged: dict[str, torch.Tensor]) -> dict | None:
    """Which kind of attack breaks each image: transfer only, adaptive only, both, neither.

    Needs every row run on every image (no cascade; else None): a transfer row is one whose name
    starts with ``transfer_``, every other row is adaptive.
    """
    rows = row_names(merged)
    if not rows or not all(bool(merged[f"{r}.attacked"].all()) for r in rows):
        return None
    kinds = {k: [r for r in rows if r.startswith("transfer_") == (k == "t")] for k in "ta"}
    if not kinds["t"] or not kinds["a"]:
        return None
    t, a = (torch.stack([~row_robust(merged, r) for r in kinds[k]]).any(0) for k in "ta")
    return {"n": int(t.numel()), "transfer_only": int((t & ~a).sum()),
            "adaptive_only": int((a & ~t).sum()), "both": int((t & a).sum()),
            "neither": int((~t & ~a).sum())}  # fmt: skip


# ------------------------------------------------------------------------------- verdict
def paired_difference(merged: dict[str, torch.Tensor], static_row: str = REFERENCE) -> dict | None:
    """Defended worst case minus static APGD accuracy on the SAME images, with a paired 95 % CI.

    Per image: ``a`` = ``final.robust`` (the defended worst case), ``b`` = the undefended
    classifier right on ``static_row``'s point (APGD-CE + APGD-DLR). The difference of the two
    accuracies is (n_ab̄ − n_āb) / n; its interval is the normal approximation for paired
    proportions (variance (n_ab̄ + n_āb − (n_ab̄ − n_āb)²/n) / n²).

    Returns:
        ``{"n", "defended_worst", "static", "difference", "ci", "only_defended", "only_static"}``
        (fractions), or None when a needed row is missing.
    """
    if "final.robust" not in merged or f"{static_row}.static" not in merged:
        return None
    a, b = merged["final.robust"].bool(), merged[f"{static_row}.static"].bool()
    n = int(a.numel())
    b_only, c_only = int((a & ~b).sum()), int((~a & b).sum())
    d = (b_only - c_only) / n
    half = Z95 * math.sqrt(max(b_only + c_only - (b_only - c_only) ** 2 / n, 0.0) / n**2)
    return {"n": n, "defended_worst": float(a.double().mean()), "static": float(b.double().mean()),
            "difference": d, "ci": [d - half, d + half], "only_defended": b_only,
            "only_static": c_only}  # fmt: skip


def verdict(
    rows: Sequence[RowSummary],
    converged: bool | None = None,
    sweep_reaches_zero_: bool | None = None,
    paired: dict | None = None,
) -> str:
    """A plain-words verdict: the defended worst case vs. the static APGD accuracy, with intervals,
    and the caveats of the convergence check and the ε sweep when they failed."""
    by = {s.name: s for s in rows}
    worst, static = by.get(WORST), by.get(REFERENCE)
    if worst is None or static is None:
        return "verdict unavailable: the worst-case row and the static APGD row are both needed."

    def fmt(p: float, ci: tuple[float, float]) -> str:
        return f"{100 * p:.1f} % (95 % CI {100 * ci[0]:.1f}–{100 * ci[1]:.1f} %)"

    lines = [
        f"Adaptive evaluation on n = {worst.n} CIFAR-10 test images: the defended model keeps "
        f"{fmt(worst.worst, worst.worst_ci)} of the images against the strongest attack per image "
        f"(worst case over all attacks and {worst.draws} evaluation draws), while the undefended "
        f"classifier keeps {fmt(static.static, static.static_ci)} under APGD-CE + APGD-DLR."
    ]
    if paired is not None:
        lo, hi = paired["ci"]
        lines.append(
            f"Paired on the same images, defended worst case minus static APGD: "
            f"{100 * paired['difference']:+.1f} points (95 % CI {100 * lo:+.1f} to {100 * hi:+.1f};"
            f" {paired['only_defended']} images survive only with the defense, "
            f"{paired['only_static']} only without it)."
        )
        if lo > 0:
            lines.append("The paired interval excludes 0: the defense adds measurable robustness.")
        elif hi < 0:
            lines.append("The paired interval is below 0: the defense measurably hurts.")
        else:
            lines.append(
                "The paired interval contains 0: the defense is not measurably more robust than "
                "the classifier alone."
            )
    transfer = [s.mean for s in rows if s.name.startswith("transfer_")]
    if transfer and max(transfer) > worst.worst:
        lines.append(
            f"Transfer attacks (computed on the undefended classifier) alone report up to "
            f"{100 * max(transfer):.1f} % defended accuracy (mean over draws); that overstates "
            "robustness."
        )
    if converged is False:
        lines.append(
            "The attacks had not converged (doubling iterations, EOT draws, restarts or "
            "evaluation draws moved the worst case by 1 point or more): the true worst case may "
            "be lower still."
        )
    if sweep_reaches_zero_ is False:
        lines.append(
            "Defended accuracy did not fall to about 0 at the largest ε of the sweep: the attack "
            "may suffer from gradient masking, so treat these accuracies as upper bounds."
        )
    lines.append(
        f"The number to count on is the worst case, {100 * worst.worst:.1f} %, "
        f"with a 95 % lower bound of {100 * worst.worst_ci[0]:.1f} %."
    )
    return " ".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m revlit.adaptive_report PREDICTIONS.pt [--plots DIR]``: table, paired difference,
    convergence and verdict again, and the two plots.

    Re-reads the merged per-example outputs a run saved (``<output_dir>/predictions.pt``); nothing is
    recomputed with the models, so it is instant and gives the same rows as the run.
    """
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m revlit.adaptive_report", description=main.__doc__)
    p.add_argument("outputs", help="predictions.pt written by an adaptive evaluation")
    p.add_argument("--plots", help="also write eps_sweep.png and convergence.png into this folder")
    args = p.parse_args(argv)
    path = Path(args.outputs)
    if not path.is_file():
        p.error(f"no such file: {path}")
    merged = torch.load(path, weights_only=True)
    rows = summarize_table(merged)
    paired = paired_difference(merged)
    conv = convergence_check(merged)
    print(format_table(rows))
    print(json.dumps({"paired_difference": paired, "convergence": conv}, indent=1))
    points = sweep_points(merged)
    print(verdict(rows, conv["converged"] if conv else None, sweep_reaches_zero(points), paired))
    if args.plots:
        for made in (points and plot_sweep(points, Path(args.plots) / "eps_sweep.png"),
                     conv and plot_convergence(conv, Path(args.plots) / "convergence.png")):  # fmt: skip
            if made:
                print(f"wrote {made}")


if __name__ == "__main__":
    main()
