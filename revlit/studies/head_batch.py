"""Study 2b — head-training batch (= negatives while training) at an equal budget of images seen.

The head of Mao et al. (ICCV 2021) is trained with NT-Xent, whose negatives are the other images of
the training batch; SimCLR-style training usually profits from large batches. This study trains the
default head (authors' NT-Xent, 2 views, the recipe of ``configs/ssl/resnet20_at.yaml``) at
batch ∈ {64, 256, 1024} with the SAME number of training images seen (``--budget``; steps =
budget / batch) and seed, and reports the defended clean and Linf accuracy of the default purifier
(K=40, V=4, purification batch 128) with each head, plus its clean-vs-attacked SSL loss gap.
"""

from __future__ import annotations

import argparse

from revlit.defenses import SETTINGS
from revlit.studies.common import (
    DefenseConfig,
    StudyOutput,
    bootstrap_ci,
    budget_text,
    figure,
    fmt_ci,
    markdown_table,
    mean_std,
    run_measured,
    seed_runs,
    splits_info,
    ssl_scores,
)
from revlit.studies.context import Context
from revlit.studies.heads import HeadSpec, train_head

NAME = "head_batch"
TITLE = "Study 2b — head-training batch at an equal budget of images seen"
QUICK = {
    "n": 16,
    "head_batches": "8,32",
    "budget": 64,
    "seeds": "0",
    "steps": 2,
    "views": 2,
    "batch_size": 8,
    "draws": 1,
    "n_boot": 100,
    "hidden": 32,
    "out_dim": 8,
}


def _ints(text: str) -> list[int]:
    return [int(t) for t in str(text).split(",") if t.strip()]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head-batches", default="64,256,1024", help="head-training batch sizes")
    p.add_argument("--budget", type=int, default=61_440, help="training images seen per head")
    p.add_argument("--loss", default="nt_xent", help="head training (and purification) loss")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--head-seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--out-dim", type=int, default=16)
    p.add_argument("--seeds", default="0", help="purifier seeds")
    p.add_argument("--steps", type=int, default=SETTINGS["steps"])
    p.add_argument("--views", type=int, default=SETTINGS["n_views"])
    p.add_argument("--batch-size", type=int, default=128, help="purification batch")
    p.add_argument("--draws", type=int, default=2, help="view draws for the SSL loss means")
    p.add_argument("--n-boot", type=int, default=2000)


def run(args: argparse.Namespace, ctx: Context) -> dict:
    return run_measured(args, ctx, NAME, QUICK, add_args, measure, report)


def measure(args: argparse.Namespace, ctx: Context, out: StudyOutput) -> dict:
    """Train (or reuse) one head per batch; SSL losses and defended runs per head and split."""
    n = args.n or 200
    batches = sorted(set(_ints(args.head_batches)))
    seeds = _ints(args.seeds)
    base = ctx.parts()
    names = ["clean", "l_inf"]
    splits = ctx.splits(names, n)
    val_size = 5000 if not ctx.quick else 16
    cfg = DefenseConfig(
        steps=args.steps, n_views=args.views, batch_size=args.batch_size, loss=args.loss
    )
    heads = {}
    for b in batches:
        spec = HeadSpec(
            loss=args.loss,
            batch_size=b,
            budget=args.budget,
            lr=args.lr,
            seed=args.head_seed,
            hidden_dim=args.hidden,
            out_dim=args.out_dim,
        )
        head, info = train_head(
            spec, ctx.classifier, ctx.heads_dir, ctx.data_dir, val_size, ctx.log
        )
        parts = base.with_head(head, info)
        ssl = {
            nm: ssl_scores(
                parts, splits[nm], "batch", args.views, args.draws, args.batch_size, 0, args.loss
            )
            for nm in names
        }
        runs = {}
        for nm in names:
            ctx.log(f"{NAME}: head batch {b}: defense on {nm}")
            runs[nm] = seed_runs(parts, splits[nm], cfg, seeds)
        heads[b] = {
            "steps": spec.steps,
            "sha256": info["sha256"],
            "meta": info["meta"],
            "ssl": ssl,
            "runs": runs,
        }
    keep = ("head_batches", "budget", "loss", "lr", "head_seed", "hidden", "out_dim", "seeds",
            "steps", "views", "batch_size", "draws", "n_boot")  # fmt: skip
    return {
        "args": {k: getattr(args, k) for k in keep},
        "batches": batches,
        "seeds": seeds,
        "heads": heads,
        "info": splits_info(splits, names, base.classifier_info["sha256"], ctx.quick),
        "timing": out.timing(),
    }


def report(state: dict, out: StudyOutput, ctx: Context) -> dict:
    """Table, figure and findings from a measured state."""
    args = argparse.Namespace(**state["args"])
    batches, seeds, info = state["batches"], state["seeds"], state["info"]
    names = ["clean", "l_inf"]
    labels = info["labels"]
    rows, table, runs_by = [], [], {}
    for b in batches:
        h = state["heads"][b]
        ssl = h["ssl"]
        d_ssl = bootstrap_ci(ssl["l_inf"] - ssl["clean"], args.n_boot)
        row = {
            "head_batch": b,
            "head_steps": h["steps"],
            "budget": args.budget,
            "head_sha256": h["sha256"],
            "head_train_loss_last": h["meta"].get("train_loss_last"),
            "head_seconds": h["meta"].get("seconds"),
            "ssl_clean": float(ssl["clean"].mean()),
            "ssl_attacked": float(ssl["l_inf"].mean()),
            "ssl_attacked_minus_clean": d_ssl[0],
            "ssl_attacked_minus_clean_ci": [d_ssl[1], d_ssl[2]],
            "seeds": seeds,
            "n": info["n"],
        }
        cells = [
            str(b),
            str(h["steps"]),
            f"{row['ssl_clean']:.3f}",
            f"{d_ssl[0]:+.3f} [{d_ssl[1]:+.3f}, {d_ssl[2]:+.3f}]",
        ]
        for nm in names:
            runs = h["runs"][nm]
            runs_by[b, nm] = runs
            per_image = runs.defended.double().mean(0)
            acc = bootstrap_ci(per_image, args.n_boot)
            a_mean, a_std = mean_std(runs.accuracies())
            row[f"{nm}_undefended"] = float(runs.correct.double().mean())
            row[f"{nm}_accuracy"] = acc[0]
            row[f"{nm}_accuracy_ci"] = [acc[1], acc[2]]
            row[f"{nm}_accuracy_seed_std"] = a_std
            row[f"{nm}_seconds_per_image"] = runs.seconds / (len(seeds) * len(per_image))
            cells.append(fmt_ci(*acc))
        rows.append(out.add(**row))
        table.append(cells)
    findings = []
    und = {nm: 100 * rows[0][f"{nm}_undefended"] for nm in names}
    findings.append(
        "Undefended accuracy: " + ", ".join(f"{labels[nm]} {und[nm]:.1f} %" for nm in names) + "."
    )
    if len(batches) >= 2:
        lo_b, hi_b = batches[0], batches[-1]
        for nm in names:
            d = bootstrap_ci(
                runs_by[hi_b, nm].defended.double().mean(0)
                - runs_by[lo_b, nm].defended.double().mean(0),
                args.n_boot,
            )
            verdict = "within noise" if d[1] <= 0 <= d[2] else "a real difference"
            findings.append(
                f"{labels[nm]}: head batch {hi_b} minus {lo_b}: {fmt_ci(*d)} pp defended "
                f"accuracy (paired 95 % CI) — {verdict}."
            )
    for r in rows:
        findings.append(
            f"Head batch {r['head_batch']} ({r['head_steps']} steps): last train loss "
            f"{r['head_train_loss_last']:.3f}; Linf − clean SSL loss "
            f"{r['ssl_attacked_minus_clean']:+.3f} [{r['ssl_attacked_minus_clean_ci'][0]:+.3f}, "
            f"{r['ssl_attacked_minus_clean_ci'][1]:+.3f}]."
            if r["head_train_loss_last"] is not None
            else f"Head batch {r['head_batch']}: no train loss recorded."
        )
    fig, (ax,) = figure(1, 5.6, 4.4)
    for nm, colour in zip(names, ("tab:blue", "tab:red")):
        y = [100 * r[f"{nm}_accuracy"] for r in rows]
        err = [
            [100 * (r[f"{nm}_accuracy"] - r[f"{nm}_accuracy_ci"][0]) for r in rows],
            [100 * (r[f"{nm}_accuracy_ci"][1] - r[f"{nm}_accuracy"]) for r in rows],
        ]
        ax.errorbar(
            batches,
            y,
            yerr=err,
            marker="o",
            capsize=3,
            color=colour,
            label=f"defended {labels[nm]}",
        )
        ax.axhline(und[nm], color=colour, ls=":", lw=1, label=f"undefended {labels[nm]}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel(f"head-training batch (budget {args.budget} images each)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Defended accuracy by head-training batch", fontsize=10)
    ax.legend(fontsize=7)
    caption = (
        f"n = {info['n']} test images (clean, and the stored transfer set "
        f"{info['sets']}). Heads {args.hidden}→{args.out_dim}, {args.loss}, 2 views, Adam "
        f"lr {args.lr:g}, seed {args.head_seed}, {args.budget} training images each "
        f"(steps = budget / batch). Purifier K={args.steps}, V={args.views}, {budget_text()}, "
        f"batch {args.batch_size}, seeds {seeds}. Error bars: 95 % bootstrap CI over images. "
        f"Classifier {info['classifier_sha256'][:12]}."
    )
    out.save_figure(fig, caption)
    header = ["head batch", "steps", "SSL loss clean", "Linf − clean SSL loss [95 % CI]"] + [
        f"defended {labels[nm]} % [95 % CI]" for nm in names
    ]
    settings = {
        "n": info["n"],
        "head_batches": batches,
        "budget": args.budget,
        "loss": args.loss,
        "lr": args.lr,
        "head_seed": args.head_seed,
        "seeds": seeds,
        "steps": args.steps,
        "views": args.views,
        "batch_size": args.batch_size,
        "classifier_sha256": info["classifier_sha256"],
        "quick": info["quick"],
    }
    return out.finish(
        TITLE, settings, caption, markdown_table(header, table), findings, ctx.docs,
        state.get("timing"),
    )  # fmt: skip
