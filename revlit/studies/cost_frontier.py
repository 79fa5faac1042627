"""Study 4 — cost frontier: what do the reverse attack's steps and views buy per backbone pass?

The deployed purifier of Mao et al. (ICCV 2021) runs K = 40 steps with V = 4 views: K·V = 160
input-gradient backbone passes per image (plus a few forward passes), about 160x the cost of
classifying. This study sweeps K ∈ {0, 5, 10, 20, 40} x V ∈ {2, 4} and reports defended clean and
Linf (stored transfer PGD set) accuracy against K·V, marks the authors' (40, 4), and says which
cheaper settings are within the noise of it: the paired 95 % bootstrap interval (over images) of
the accuracy difference to (40, 4) contains 0 on both splits. The cheapest such setting is
proposed as a preset.

One K = 40 run per V gives every K: with ``select="last"`` the iterate after K steps of a 40-step
run is exactly a K-step run's output (same random start and views; see
:func:`revlit.studies.common.purify_traced`). K = 0 is the random start alone, i.e. the
random-noise baseline of the same budget. Seeding as DefenseModule (per batch).
"""

from __future__ import annotations

import argparse

import torch

from revlit.defenses import SETTINGS
from revlit.studies.common import (
    DefenseConfig,
    StudyOutput,
    bootstrap_ci,
    budget_text,
    defend,
    describe_sets,
    figure,
    fmt_ci,
    markdown_table,
    run_measured,
    sha12,
)
from revlit.studies.context import Context

NAME = "cost_frontier"
TITLE = "Study 4 — cost frontier: steps K x views V against backbone passes per image"
QUICK = {
    "n": 16,
    "steps_grid": "0,1,2",
    "views_grid": "2,3",
    "reference": "2,3",
    "batch_size": 8,
    "n_boot": 100,
}


def _ints(text: str) -> list[int]:
    return [int(t) for t in str(text).split(",") if t.strip()]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps-grid", default="0,5,10,20,40", help="K values")
    p.add_argument("--views-grid", default="2,4", help="V values")
    p.add_argument("--reference", default="40,4", help="the authors' K,V (marked; compared to)")
    p.add_argument("--batch-size", type=int, default=128, help="purification batch (negatives)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=2000)


def propose(rows: list[dict], ref_passes: int, splits: list[str]) -> dict | None:
    """The cheapest (K >= 1, V) cheaper than the reference and not measurably worse on any split.

    "Not measurably worse": the paired 95 % interval of its accuracy minus the reference's
    reaches 0 or above on every split (it may be better: a cheaper purifier can keep more clean
    accuracy). K = 0 (the random start alone) is never proposed; the findings say separately
    when it is within the noise of the reference (then the steps buy nothing measurable).
    """
    by_kv: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        by_kv.setdefault((r["steps"], r["views"]), []).append(r)
    ok = [
        (kv, rs)
        for kv, rs in by_kv.items()
        if 0 < rs[0]["passes"] < ref_passes
        and {r["split"] for r in rs} >= set(splits)
        and all(r["delta_ci"][1] >= 0.0 for r in rs)
    ]
    if not ok:
        return None
    (k, v), rs = min(ok, key=lambda t: (t[1][0]["passes"], -t[0][0]))
    return {"steps": k, "views": v, "passes": k * v, "rows": rs}


def run(args: argparse.Namespace, ctx: Context) -> dict:
    return run_measured(args, ctx, NAME, QUICK, add_args, measure, report)


def measure(args: argparse.Namespace, ctx: Context, out: StudyOutput) -> dict:
    """Run the grid; return the state :func:`report` needs (rows with CIs, settings, info)."""
    n = args.n or 500
    ks, vs = sorted(set(_ints(args.steps_grid))), sorted(set(_ints(args.views_grid)))
    ref_k, ref_v = _ints(args.reference)
    if ref_k not in ks or ref_v not in vs:
        raise ValueError(f"the reference {ref_k},{ref_v} must be on the grid {ks} x {vs}")
    parts = ctx.parts()
    names = ["clean", "l_inf"]
    splits = ctx.splits(names, n)
    correct: dict[tuple[str, int, int], torch.Tensor] = {}
    undefended: dict[str, torch.Tensor] = {}
    seconds: dict[tuple[str, int], float] = {}
    for v in vs:
        for name in names:
            cfg = DefenseConfig(
                steps=max(ks), n_views=v, batch_size=args.batch_size, seed=args.seed
            )
            ctx.log(f"{NAME}: V={v} K<={max(ks)} on {name} (n={len(splits[name])})")
            res = defend(parts, splits[name], cfg, trace=ks)
            undefended[name] = res.correct
            seconds[name, v] = res.seconds / len(splits[name])
            for k in ks:
                correct[name, k, v] = res.correct_def[k]
    rows = []
    for name in names:
        ref = correct[name, ref_k, ref_v].double()
        for v in vs:
            for k in ks:
                c = correct[name, k, v].double()
                acc = bootstrap_ci(c, args.n_boot, args.seed)
                diff = bootstrap_ci(c - ref, args.n_boot, args.seed)
                gain = bootstrap_ci(c - undefended[name].double(), args.n_boot, args.seed)
                rows.append(
                    dict(
                        split=name,
                        steps=k,
                        views=v,
                        passes=k * v,
                        n=len(c),
                        accuracy=acc[0],
                        accuracy_ci=[acc[1], acc[2]],
                        delta_vs_reference=diff[0],
                        delta_ci=[diff[1], diff[2]],
                        within_noise=bool(diff[1] <= 0.0 <= diff[2])
                        if (k, v) != (ref_k, ref_v)
                        else True,
                        undefended_accuracy=float(undefended[name].double().mean()),
                        gain_vs_undefended=gain[0],
                        gain_ci=[gain[1], gain[2]],
                        seconds_per_image_full_run=seconds[name, v] if k == max(ks) else None,
                        batch_size=args.batch_size,
                        seed=args.seed,
                    )
                )
    settings = {
        "n": len(splits["clean"]),
        "steps_grid": ks,
        "views_grid": vs,
        "reference": [ref_k, ref_v],
        "batch_size": args.batch_size,
        "seed": args.seed,
        "n_boot": args.n_boot,
        "eps": SETTINGS["eps"],
        "step_size": SETTINGS["step_size"],
        "seconds_per_image": {f"{nm}_V{v}": sec for (nm, v), sec in seconds.items()},
        "classifier_sha256": parts.classifier_info["sha256"],
        "head_sha256": parts.head_info["sha256"],
        "quick": ctx.quick,
    }
    info = {
        "labels": {nm: splits[nm].label for nm in names},
        "sets": describe_sets(splits),
        "loss": parts.loss,
        "temperature": parts.temperature,
        "view_mode": parts.view_mode,
        "classifier": sha12(parts.classifier_info),
        "head": sha12(parts.head_info),
    }
    return {"rows": rows, "settings": settings, "info": info, "timing": out.timing()}


def report(state: dict, out: StudyOutput, ctx: Context) -> dict:
    """Table, figure and findings from a measured state."""
    rows, settings, info = state["rows"], dict(state["settings"]), state["info"]
    for r in rows:
        out.add(**r)
    names = ["clean", "l_inf"]
    labels = info["labels"]
    ks, vs = settings["steps_grid"], settings["views_grid"]
    ref_k, ref_v = settings["reference"]
    und_acc = {nm: next(r["undefended_accuracy"] for r in rows if r["split"] == nm) for nm in names}
    preset = propose(rows, ref_k * ref_v, names)
    # ---- figure
    fig, axes = figure(2, 5.0, 4.2)
    for ax, name in zip(axes, names):
        for v, colour in zip(vs, ("tab:blue", "tab:purple", "tab:green", "tab:brown")):
            rs = [r for r in rows if r["split"] == name and r["views"] == v]
            x = [r["passes"] for r in rs]
            y = [100 * r["accuracy"] for r in rs]
            err = [
                [100 * (r["accuracy"] - r["accuracy_ci"][0]) for r in rs],
                [100 * (r["accuracy_ci"][1] - r["accuracy"]) for r in rs],
            ]
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, color=colour, label=f"V = {v}")
            for r in rs:
                ax.annotate(
                    f"K={r['steps']}",
                    (r["passes"], 100 * r["accuracy"]),
                    fontsize=6,
                    xytext=(3, -9),
                    textcoords="offset points",
                )
        ref_row = next(
            r for r in rows if r["split"] == name and (r["steps"], r["views"]) == (ref_k, ref_v)
        )
        ax.plot(
            [ref_k * ref_v],
            [100 * ref_row["accuracy"]],
            marker="*",
            ms=15,
            color="gold",
            mec="k",
            ls="none",
            label=f"reference ({ref_k}, {ref_v})",
            zorder=5,
        )
        und = 100 * und_acc[name]
        ax.axhline(und, color="0.4", ls="--", lw=1, label=f"undefended {und:.1f} %")
        if preset is not None:
            pr = next(r for r in preset["rows"] if r["split"] == name)
            ax.plot(
                [pr["passes"]],
                [100 * pr["accuracy"]],
                marker="D",
                ms=8,
                mfc="none",
                mec="tab:red",
                ls="none",
                label=f"proposed ({preset['steps']}, {preset['views']})",
            )
        ax.set_xlabel("backbone input-gradient passes per image (K·V)")
        ax.set_ylabel(f"defended {labels[name]} accuracy (%)")
        ax.set_title(f"{labels[name]} (n = {settings['n']})", fontsize=10)
        ax.legend(fontsize=7)
    caption = (
        f"n = {settings['n']} test images (clean, and the stored transfer set {info['sets']}), "
        f"one purifier seed ({settings['seed']}, per batch), purification batch "
        f"{settings['batch_size']}, {budget_text()}, {info['loss']} "
        f"T={info['temperature']}, views {info['view_mode']}; K=0 = random start only (noise "
        f"baseline). Error bars: 95 % bootstrap CI over images ({settings['n_boot']} resamples). "
        f"Classifier {info['classifier']}, head {info['head']}."
    )
    out.save_figure(fig, caption)
    # ---- table + findings
    table = []
    for v in vs:
        for k in ks:
            cells = [str(k), str(v), str(k * v)]
            for name in names:
                r = next(r for r in rows if (r["split"], r["steps"], r["views"]) == (name, k, v))
                cells.append(fmt_ci(r["accuracy"], *r["accuracy_ci"]))
                cells.append(
                    "ref"
                    if (k, v) == (ref_k, ref_v)
                    else fmt_ci(r["delta_vs_reference"], *r["delta_ci"], digits=1)
                )
            table.append(cells)
    header = ["K", "V", "passes K·V"]
    for name in names:
        lab = labels[name]
        header += [f"{lab} acc % [95 % CI]", f"Δ {lab} vs ({ref_k},{ref_v}) pp [95 % CI]"]
    und_txt = ", ".join(f"{labels[nm]} {100 * und_acc[nm]:.1f} %" for nm in names)
    findings = [f"Undefended accuracy: {und_txt}."]
    for name in names:
        r = next(r for r in rows if (r["split"], r["steps"], r["views"]) == (name, ref_k, ref_v))
        r0 = (
            next(r for r in rows if (r["split"], r["steps"], r["views"]) == (name, 0, ref_v))
            if 0 in ks
            else None
        )
        txt = f"{labels[name]}: ({ref_k},{ref_v}) gives {100 * r['accuracy']:.1f} %"
        if "gain_ci" in r:
            g = fmt_ci(r["gain_vs_undefended"], *r["gain_ci"])
            txt += f", {g} pp against undefended"
        if r0 is not None:
            d0 = (-r0["delta_vs_reference"], -r0["delta_ci"][1], -r0["delta_ci"][0])
            txt += (
                f"; the random start alone (K=0) gives {100 * r0['accuracy']:.1f} %, so the "
                f"{ref_k} steps change accuracy by {fmt_ci(*d0)} pp"
                + (" (within noise)" if r0["within_noise"] else "")
            )
        findings.append(txt + ".")
    within = [
        (r["steps"], r["views"])
        for r in rows
        if r["split"] == names[0] and 0 < r["passes"] < ref_k * ref_v
        and all(
            q["within_noise"] for q in rows
            if (q["steps"], q["views"]) == (r["steps"], r["views"])
        )
    ]  # fmt: skip
    findings.append(
        "Cheaper settings within the noise of "
        f"({ref_k},{ref_v}) on every split (paired 95 % interval of the difference contains 0): "
        + (", ".join(f"({k},{v})" for k, v in within) if within else "none")
        + "."
    )
    if preset is None:
        findings.append(
            f"No setting cheaper than ({ref_k},{ref_v}) is free of a measurable loss on every "
            "split: each has a paired 95 % interval of the difference below 0 somewhere."
        )
    else:
        d = "; ".join(
            f"{labels[r['split']]} Δ {fmt_ci(r['delta_vs_reference'], *r['delta_ci'])} pp"
            for r in preset["rows"]
        )
        findings.append(
            f"Proposed preset: K={preset['steps']}, V={preset['views']} ({preset['passes']} "
            f"passes, {ref_k * ref_v / max(preset['passes'], 1):.0f}x cheaper than "
            f"({ref_k},{ref_v})): not measurably worse on any split ({d}; every interval "
            "reaches 0 or above). At this n and one seed that is 'within noise', not proven "
            "equal; intervals that end exactly at 0 are borderline."
        )
    settings["preset"] = (
        None if preset is None else {k: preset[k] for k in ("steps", "views", "passes")}
    )
    return out.finish(
        TITLE, settings, caption, markdown_table(header, table), findings, ctx.docs,
        state.get("timing"),
    )  # fmt: skip
