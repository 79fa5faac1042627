"""The adaptive-evaluation report: table, 95 % intervals, ε sweep plot, convergence check, verdict.

Framework-free helpers for :class:`revlit.modules.adaptive.AdaptiveModule` (issue 9). They work on
the module's merged per-example outputs, a dict of tensors whose first dimension is the example,
with one group of keys per evaluated attack ("row") ``<row>.<field>``:

- ``static``  (N,) bool: the undefended classifier is right on the attack's final point;
- ``draws``   (N, r) bool: the defended classifier is right in each of r fresh deployed draws;
- ``ce``      (N, r) float: its cross-entropy in each draw;
- ``broken_iter`` (N,) bool: the *deployed* defense misclassified some attack iterate (only ever
  True when the attack ran the deployed purifier);
- ``passes`` (N,) float: backbone passes spent on the example (attack + evaluation);
- ``seconds`` (N,) float: compute seconds spent on the example.

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

#: the rows of the issue's table, in order (the per-example worst case is added after them)
ROWS = (
    "transfer_pgd",
    "transfer_apgd",
    "defense_aware",
    "bpda_pgd",
    "bpda_apgd_ce",
    "bpda_apgd_dlr",
)
#: the second target (a fixed-seed, deterministic purifier): reported, not in the worst case
EXTRA_ROWS = ("bpda_fixed_seed",)
WORST = "worst_case"
LABELS = {
    "transfer_pgd": "transfer PGD",
    "transfer_apgd": "transfer APGD-CE+DLR",
    "defense_aware": "defense-aware PGD",
    "bpda_pgd": "BPDA+EOT PGD",
    "bpda_apgd_ce": "BPDA+EOT APGD-CE",
    "bpda_apgd_dlr": "BPDA+EOT APGD-DLR",
    "bpda_fixed_seed": "BPDA APGD-CE, fixed-seed purifier",
    WORST: "worst case over all rows",
}
FIELDS = ("static", "draws", "ce", "broken_iter", "passes", "seconds")
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


def has_row(merged: dict[str, torch.Tensor], row: str) -> bool:
    """Whether ``merged`` holds the outputs of ``row``."""
    return f"{row}.draws" in merged


def row_robust(merged: dict[str, torch.Tensor], row: str) -> torch.Tensor:
    """Per-example worst-case robustness of a row: right in every draw, never broken (N,) bool."""
    return merged[f"{row}.draws"].all(1) & ~merged[f"{row}.broken_iter"].bool()


def summarize_row(
    merged: dict[str, torch.Tensor], row: str, label: str | None = None
) -> RowSummary:
    """The table row of one attack from the merged outputs."""
    draws = merged[f"{row}.draws"].bool()
    n, r = draws.shape
    static = merged[f"{row}.static"].bool()
    robust = row_robust(merged, row)
    ks, kw = int(static.sum()), int(robust.sum())
    return RowSummary(
        name=row,
        label=label or LABELS.get(row, row),
        n=n,
        draws=r,
        static=ks / n,
        mean=float(draws.double().mean()),
        worst=kw / n,
        loss=float(merged[f"{row}.ce"].double().mean()),
        passes_per_image=float(merged[f"{row}.passes"].double().mean()),
        seconds_per_image=float(merged[f"{row}.seconds"].double().mean()),
        static_ci=wilson_interval(ks, n),
        worst_ci=wilson_interval(kw, n),
    )


def summarize_worst(merged: dict[str, torch.Tensor], rows: Sequence[str]) -> RowSummary:
    """The per-example worst case over ``rows``.

    static: right under every row's static point; mean: per example the lowest fraction of correct
    draws over the rows, averaged; worst: robust in every row; passes/seconds: summed over rows.
    """
    rows = [r for r in rows if has_row(merged, r)]
    if not rows:
        raise ValueError("no rows to take the worst case over")
    static = torch.stack([merged[f"{r}.static"].bool() for r in rows]).all(0)
    robust = torch.stack([row_robust(merged, r) for r in rows]).all(0)
    per = torch.stack([merged[f"{r}.draws"].double().mean(1) for r in rows]).amin(0)
    ce = torch.stack([merged[f"{r}.ce"].double().mean(1) for r in rows]).amax(0)
    n = len(static)
    ks, kw = int(static.sum()), int(robust.sum())
    return RowSummary(
        name=WORST,
        label=LABELS[WORST],
        n=n,
        draws=min(int(merged[f"{r}.draws"].shape[1]) for r in rows),
        static=ks / n,
        mean=float(per.mean()),
        worst=kw / n,
        loss=float(ce.mean()),
        passes_per_image=sum(float(merged[f"{r}.passes"].double().mean()) for r in rows),
        seconds_per_image=sum(float(merged[f"{r}.seconds"].double().mean()) for r in rows),
        static_ci=wilson_interval(ks, n),
        worst_ci=wilson_interval(kw, n),
    )


def summarize_table(merged: dict[str, torch.Tensor]) -> list[RowSummary]:
    """The issue's table: every row present, the worst case over :data:`ROWS`, then extra rows."""
    out = [summarize_row(merged, r) for r in ROWS if has_row(merged, r)]
    if out:
        out.append(summarize_worst(merged, [s.name for s in out]))
    out += [summarize_row(merged, r) for r in EXTRA_ROWS if has_row(merged, r)]
    return out


def _pct(v: float) -> str:
    return f"{100 * v:6.2f}"


def format_table(rows: Sequence[RowSummary], title: str = "") -> str:
    """The table as markdown (accuracies in %, 95 % Wilson intervals for static and worst case)."""
    head = (
        "| attack | static acc. % | defended acc. % (mean over draws) | defended worst case % "
        "| backbone passes / image |\n|---|---:|---:|---:|---:|\n"
    )
    lines = []
    for s in rows:
        lines.append(
            f"| {s.label} | {_pct(s.static)} [{100 * s.static_ci[0]:.1f}, {100 * s.static_ci[1]:.1f}] "
            f"| {_pct(s.mean)} | {_pct(s.worst)} [{100 * s.worst_ci[0]:.1f}, "
            f"{100 * s.worst_ci[1]:.1f}] | {s.passes_per_image:.0f} |"
        )
    n = rows[0].n if rows else 0
    r = rows[0].draws if rows else 0
    foot = (
        f"\nn = {n} images, r = {r} evaluation draws of the deployed purifier; "
        "[lo, hi] = 95 % Wilson interval.\n"
    )
    return (f"{title}\n\n" if title else "") + head + "\n".join(lines) + "\n" + foot


# ----------------------------------------------------------------------------- ε sweep
def sweep_points(merged: dict[str, torch.Tensor], eps_list: Sequence[float]) -> list[dict]:
    """Accuracy of the defended model under the sweep attack at each ε (keys ``sweep<i>.*``)."""
    out = []
    for i, eps in enumerate(eps_list):
        row = f"sweep{i}"
        if not has_row(merged, row):
            continue
        s = summarize_row(merged, row, f"ε = {eps * 255:.3g}/255")
        out.append(
            {
                "eps": float(eps),
                "eps_255": float(eps) * 255,
                "static": s.static,
                "mean": s.mean,
                "worst": s.worst,
                "worst_ci": list(s.worst_ci),
                "n": s.n,
                "draws": s.draws,
                "passes_per_image": s.passes_per_image,
            }
        )
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
def convergence_check(
    merged: dict[str, torch.Tensor],
    base: str,
    variants: dict[str, str],
    threshold: float = 0.01,
) -> dict:
    """Does doubling the budget move the worst-case accuracy by less than ``threshold``?

    Args:
        merged: merged outputs.
        base: the row whose budget was doubled (e.g. ``bpda_apgd_ce``).
        variants: ``{what was doubled: row key}``, e.g. ``{"iterations": "conv_steps"}``.
        threshold: largest allowed change of the worst-case accuracy (0.01 = one point).

    Returns:
        ``{"base", "base_worst", "threshold", "n", "variants": {name: {"worst", "delta",
        "moved_by_examples"}}, "converged"}`` where ``converged`` is True only if every variant
        moved the worst case by less than the threshold (a variant that was not run makes it None).
        With n examples one example moves the accuracy by 1/n: below n = 100 a single example
        already exceeds one point.
    """
    b = summarize_row(merged, base)
    out: dict = {"base": base, "base_worst": b.worst, "threshold": threshold, "n": b.n}
    res = {}
    ok: bool | None = True
    for name, key in variants.items():
        if not has_row(merged, key):
            res[name] = None
            ok = None if ok is not False else ok
            continue
        v = summarize_row(merged, key)
        delta = v.worst - b.worst
        changed = int((row_robust(merged, key) != row_robust(merged, base)).sum())
        res[name] = {"worst": v.worst, "delta": delta, "examples_changed": changed}
        if abs(delta) >= threshold:
            ok = False
    out["variants"] = res
    out["converged"] = ok
    return out


# ------------------------------------------------------------------------------- verdict
def paired_difference(
    merged: dict[str, torch.Tensor], rows: Sequence[str] = ROWS, static_row: str = "transfer_apgd"
) -> dict | None:
    """Defended worst case minus static APGD accuracy on the SAME images, with a paired 95 % CI.

    Per image: ``a`` = robust under every row of ``rows`` and every evaluation draw (the worst
    case), ``b`` = the undefended classifier right on ``static_row``'s static point (APGD-CE +
    APGD-DLR). The difference of the two accuracies is (n_ab̄ − n_āb) / n; its interval is the
    normal approximation for paired proportions (variance (n_ab̄ + n_āb − (n_ab̄ − n_āb)²/n) / n²),
    tighter than comparing two unpaired intervals because both are measured on the same images.

    Returns:
        ``{"n", "defended_worst", "static", "difference", "ci", "only_defended", "only_static"}``
        (fractions), or None when a needed row is missing.
    """
    rows = [r for r in rows if has_row(merged, r)]
    if not rows or not has_row(merged, static_row):
        return None
    a = torch.stack([row_robust(merged, r) for r in rows]).all(0)
    b = merged[f"{static_row}.static"].bool()
    n = int(a.numel())
    b_only, c_only = int((a & ~b).sum()), int((~a & b).sum())
    d = (b_only - c_only) / n
    var = max(b_only + c_only - (b_only - c_only) ** 2 / n, 0.0) / n**2
    half = Z95 * math.sqrt(var)
    return {
        "n": n,
        "defended_worst": float(a.double().mean()),
        "static": float(b.double().mean()),
        "difference": d,
        "ci": [d - half, d + half],
        "only_defended": b_only,
        "only_static": c_only,
    }


def verdict(
    rows: Sequence[RowSummary],
    converged: bool | None = None,
    sweep_reaches_zero_: bool | None = None,
    paired: dict | None = None,
) -> str:
    """A plain-words verdict: adaptive defended accuracy vs. static APGD accuracy, with intervals.

    Compares the per-example worst case over all rows (what a user can count on) with the
    undefended classifier's accuracy under APGD-CE + APGD-DLR (the static reference), and adds the
    caveats of the convergence check and the ε sweep when they failed.
    """
    by = {s.name: s for s in rows}
    worst = by.get(WORST)
    static = by.get("transfer_apgd")
    if worst is None or static is None:
        return "verdict unavailable: the worst-case row and the static APGD row are both needed."

    def fmt(p: float, ci: tuple[float, float]) -> str:
        return f"{100 * p:.1f} % (95 % CI {100 * ci[0]:.1f}–{100 * ci[1]:.1f} %)"

    transfer = max((by[r].mean for r in ("transfer_pgd", "transfer_apgd") if r in by), default=None)
    lines = [
        f"Adaptive evaluation on n = {worst.n} CIFAR-10 test images (Linf): the defended model "
        f"keeps {fmt(worst.worst, worst.worst_ci)} of the images against the strongest attack per "
        f"image (worst case over all attacks and {worst.draws} evaluation draws), while the "
        f"undefended classifier keeps {fmt(static.static, static.static_ci)} under APGD-CE + "
        "APGD-DLR."
    ]
    overlap = not (
        worst.worst_ci[0] > static.static_ci[1] or worst.worst_ci[1] < static.static_ci[0]
    )
    if paired is not None:
        lo, hi = paired["ci"]
        lines.append(
            f"Paired on the same images, defended worst case minus static APGD: "
            f"{100 * paired['difference']:+.1f} points (95 % CI {100 * lo:+.1f} to {100 * hi:+.1f}; "
            f"{paired['only_defended']} images survive only with the defense, "
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
    elif overlap:
        lines.append(
            "The two intervals overlap: at this n the defense is not measurably more robust than "
            "the classifier alone."
        )
    elif worst.worst > static.static:
        lines.append(
            "The defended worst case is above the static interval: the defense adds robustness "
            "that these adaptive attacks did not remove (check the ε sweep and convergence)."
        )
    else:
        lines.append("The defended worst case is below the static accuracy: the defense hurts.")
    if transfer is not None and transfer > worst.worst:
        lines.append(
            f"Transfer attacks (computed on the undefended classifier) report up to "
            f"{100 * transfer:.1f} % defended accuracy; that number overstates robustness."
        )
    if converged is False:
        lines.append(
            "The attacks had not converged (doubling iterations, EOT samples or restarts moved "
            "the worst case by 1 point or more): the true worst case may be lower still."
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
    """``python -m revlit.adaptive_report OUTPUTS.pt``: table, paired difference and verdict again.

    Re-reads the merged per-example outputs a run saved (``<output_dir>/outputs.pt``); nothing is
    recomputed with the models, so it is instant and gives the same rows as the run.
    """
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m revlit.adaptive_report", description=main.__doc__)
    p.add_argument("outputs", help="outputs.pt written by an AdaptiveModule run")
    args = p.parse_args(argv)
    path = Path(args.outputs)
    if not path.is_file():
        p.error(f"no such file: {path}")
    merged = torch.load(path, weights_only=True)
    rows = summarize_table(merged)
    paired = paired_difference(merged)
    print(format_table(rows))
    print(json.dumps({"paired_difference": paired}, indent=1))
    print(verdict(rows, paired=paired))


if __name__ == "__main__":
    main()
