"""Study 1 — loss functions: one SSL head per loss in revlit, same budget and seed.

Mao et al. (ICCV 2021) train their head with NT-Xent and reverse attacks by lowering the same loss;
this study asks whether another loss serves the defense better. revlit has three losses
(:mod:`revlit.losses.contrastive`): the authors' NT-Xent (target = first other view), the
multi-positive NT-Xent (SupCon L_out) and the negative-free alignment loss. For each, a head is
trained on the frozen shipped classifier with the SAME budget (images seen), batch, learning rate
and seed (:mod:`revlit.studies.heads`), and the study reports

* the mean per-image SSL loss on clean and on attacked (stored transfer Linf PGD) images, and the
  paired difference (does the attack raise the loss the defense descends?);
* the accuracy gained by the defense (defended − undefended) on clean and Linf, mean ± std over
  ``--seeds`` purifier seeds, with a 95 % bootstrap interval over images;
* the random-noise baseline of the same budget (uniform in the ε_r ball) as a reference line.

Training a head with the alignment loss alone has no force pushing images apart (a constant
embedding has loss 0), so it is expected to collapse; the study measures what that does, and adds
the row "NT-Xent head, alignment loss at test time" (negative-free purification with a
contrastively trained head).
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

NAME = "loss_functions"
TITLE = "Study 1 — loss functions: one SSL head per loss, same budget and seed"
QUICK = {
    "n": 16,
    "budget": 64,
    "head_batch": 16,
    "seeds": "0,1,2",
    "steps": 2,
    "views": 2,
    "batch_size": 8,
    "draws": 1,
    "n_boot": 100,
    "hidden": 32,
    "out_dim": 8,
}


def _list(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--losses", default="nt_xent,nt_xent_multi,alignment", help="head losses")
    p.add_argument(
        "--extra",
        default="nt_xent:alignment",
        help="extra head:purification-loss pairs (comma-separated; '' for none)",
    )
    p.add_argument("--budget", type=int, default=61_440, help="training images seen per head")
    p.add_argument("--head-batch", type=int, default=256, help="head-training batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr (configs/ssl/resnet20_at.yaml)")
    p.add_argument("--head-seed", type=int, default=0)
    p.add_argument(
        "--train-views",
        type=int,
        default=2,
        help="views per image in head training (authors: 2; then nt_xent_multi = nt_xent)",
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--out-dim", type=int, default=16)
    p.add_argument("--seeds", default="0,1,2", help="purifier seeds")
    p.add_argument("--steps", type=int, default=SETTINGS["steps"])
    p.add_argument("--views", type=int, default=SETTINGS["n_views"])
    p.add_argument("--batch-size", type=int, default=128, help="purification batch")
    p.add_argument("--draws", type=int, default=2, help="view draws for the SSL loss means")
    p.add_argument("--n-boot", type=int, default=2000)


def run(args: argparse.Namespace, ctx: Context) -> dict:
    return run_measured(args, ctx, NAME, QUICK, add_args, measure, report)


def measure(args: argparse.Namespace, ctx: Context, out: StudyOutput) -> dict:
    """Train (or reuse) one head per loss; SSL losses, defended runs and the noise baseline."""
    n = args.n or 200
    seeds = [int(s) for s in _list(args.seeds)]
    losses = _list(args.losses)
    pairs = [(loss, loss) for loss in losses]
    for pair in _list(args.extra):
        head_loss, purify_loss = pair.split(":")
        if head_loss not in losses:
            losses.append(head_loss)
        pairs.append((head_loss, purify_loss))
    base = ctx.parts()
    names = ["clean", "l_inf"]
    splits = ctx.splits(names, n)
    val_size = 5000 if not ctx.quick else 16
    heads, same_as = {}, {}
    for loss in losses:
        # With 2 training views the multi-positive NT-Xent IS the authors' NT-Xent (one positive
        # per anchor), so both heads would be bit-identical: train it once.
        train_loss = "nt_xent" if (loss == "nt_xent_multi" and args.train_views == 2) else loss
        if train_loss != loss:
            same_as[loss] = train_loss
        spec = HeadSpec(
            loss=train_loss,
            batch_size=args.head_batch,
            budget=args.budget,
            lr=args.lr,
            seed=args.head_seed,
            n_views=args.train_views,
            hidden_dim=args.hidden,
            out_dim=args.out_dim,
        )
        heads[loss] = train_head(
            spec, ctx.classifier, ctx.heads_dir, ctx.data_dir, val_size, ctx.log
        )
    cfg = DefenseConfig(steps=args.steps, n_views=args.views, batch_size=args.batch_size)
    # the random-noise baseline of the same budget (independent of the head)
    noise = {}
    for name in names:
        ctx.log(f"{NAME}: noise baseline on {name}")
        noise_cfg = DefenseConfig(method="noise", n_views=args.views, batch_size=args.batch_size)
        noise[name] = seed_runs(base, splits[name], noise_cfg, seeds)
    measured = []
    for head_loss, purify_loss in pairs:
        head, info = heads[head_loss]
        parts = base.with_head(head, info)
        label = head_loss if head_loss == purify_loss else f"{head_loss} head, {purify_loss} purify"
        ssl, runs = {}, {}
        for name in names:
            ctx.log(f"{NAME}: {label}: SSL loss on {name}")
            ssl[name] = ssl_scores(
                parts, splits[name], "batch", args.views, args.draws, args.batch_size, 0,
                purify_loss,
            )  # fmt: skip
        for name in names:
            ctx.log(f"{NAME}: {label}: defense on {name}, seeds {seeds}")
            pcfg = DefenseConfig(**{**cfg.as_dict(), "loss": purify_loss})
            runs[name] = seed_runs(parts, splits[name], pcfg, seeds)
        measured.append(
            {
                "head_loss": head_loss,
                "purify_loss": purify_loss,
                "label": label,
                "head_sha256": info["sha256"],
                "head_meta": info["meta"],
                "ssl": ssl,
                "runs": runs,
            }
        )
    keep = ("budget", "head_batch", "train_views", "lr", "head_seed", "hidden", "out_dim",
            "steps", "views", "batch_size", "draws", "n_boot")  # fmt: skip
    return {
        "args": {k: getattr(args, k) for k in keep},
        "losses": losses,
        "pairs": pairs,
        "same_as": same_as,
        "seeds": seeds,
        "noise": noise,
        "measured": measured,
        "info": splits_info(splits, names, base.classifier_info["sha256"], ctx.quick),
        "timing": out.timing(),
    }


def report(state: dict, out: StudyOutput, ctx: Context) -> dict:
    """Table, figure and findings from a measured state."""
    args = argparse.Namespace(**state["args"])
    seeds, info, noise, same_as = state["seeds"], state["info"], state["noise"], state["same_as"]
    losses, pairs = state["losses"], state["pairs"]
    names = ["clean", "l_inf"]
    labels = info["labels"]
    rows, table, findings = [], [], []
    for m in state["measured"]:
        head_loss, purify_loss, label, ssl = m["head_loss"], m["purify_loss"], m["label"], m["ssl"]
        d_ssl = bootstrap_ci(ssl["l_inf"] - ssl["clean"], args.n_boot)
        row = {
            "head_loss": head_loss,
            "purify_loss": purify_loss,
            "label": label,
            "head_sha256": m["head_sha256"],
            "head_train_loss_last": m["head_meta"].get("train_loss_last"),
            "head_seconds": m["head_meta"].get("seconds"),
            "ssl_clean": float(ssl["clean"].mean()),
            "ssl_attacked": float(ssl["l_inf"].mean()),
            "ssl_attacked_minus_clean": d_ssl[0],
            "ssl_attacked_minus_clean_ci": [d_ssl[1], d_ssl[2]],
            "seeds": seeds,
            "n": info["n"],
        }
        cells = [
            label,
            f"{row['ssl_clean']:.3f}",
            f"{row['ssl_attacked']:.3f}",
            f"{d_ssl[0]:+.3f} [{d_ssl[1]:+.3f}, {d_ssl[2]:+.3f}]",
        ]
        for name in names:
            runs = m["runs"][name]
            g_mean, g_std = mean_std(runs.gains())
            ci = runs.gain_ci(args.n_boot)
            row[f"{name}_undefended"] = float(runs.correct.double().mean())
            row[f"{name}_defended"] = runs.accuracies()
            row[f"{name}_gain_mean"], row[f"{name}_gain_std"] = g_mean, g_std
            row[f"{name}_gain_ci"] = [ci[1], ci[2]]
            row[f"{name}_seconds_per_image"] = runs.seconds / (len(seeds) * len(runs.correct))
            cells.append(
                f"{100 * g_mean:+.1f} ± {100 * g_std:.1f} [{100 * ci[1]:+.1f}, {100 * ci[2]:+.1f}]"
            )
        rows.append(out.add(**row))
        table.append(cells)
        verdicts = []
        for name in names:
            lo, hi = row[f"{name}_gain_ci"]
            v = "within noise of 0" if lo <= 0 <= hi else ("a gain" if lo > 0 else "a loss")
            verdicts.append(
                f"{labels[name]} {100 * row[f'{name}_gain_mean']:+.1f} pp "
                f"(95 % CI [{100 * lo:+.1f}, {100 * hi:+.1f}]: {v})"
            )
        ssl_v = (
            "raises"
            if d_ssl[1] > 0
            else ("lowers" if d_ssl[2] < 0 else "does not measurably change")
        )
        findings.append(
            f"{label}: the attack {ssl_v} the SSL loss ({d_ssl[0]:+.3f}, CI "
            f"[{d_ssl[1]:+.3f}, {d_ssl[2]:+.3f}]); defense gain {'; '.join(verdicts)}."
        )
    noise_cells = ["noise baseline (same budget)", "—", "—", "—"]
    noise_row = {"label": "noise", "seeds": seeds}
    for name in names:
        g_mean, g_std = mean_std(noise[name].gains())
        ci = noise[name].gain_ci(args.n_boot)
        noise_row[f"{name}_gain_mean"], noise_row[f"{name}_gain_std"] = g_mean, g_std
        noise_row[f"{name}_gain_ci"] = [ci[1], ci[2]]
        noise_cells.append(
            f"{100 * g_mean:+.1f} ± {100 * g_std:.1f} [{100 * ci[1]:+.1f}, {100 * ci[2]:+.1f}]"
        )
    out.add(**noise_row)
    table.append(noise_cells)
    for loss, twin in same_as.items():
        findings.append(
            f"With {args.train_views} training views {loss} and {twin} are the same training loss "
            f"(one positive per anchor), so their heads are one and the same; the {loss} row "
            f"differs only in the purification loss at V={args.views} views."
        )
    findings.append(
        f"Noise baseline (uniform in the {SETTINGS['eps'] * 255:.3g}/255 ball): "
        + "; ".join(
            f"{labels[nm]} {fmt_ci(noise_row[f'{nm}_gain_mean'], *noise_row[f'{nm}_gain_ci'])} pp"
            for nm in names
        )
        + "."
    )
    # ---- figure: gains (left), SSL loss clean vs attacked (right)
    fig, (ax, ax2) = figure(2, 5.4, 4.4)
    width = 0.38
    xs = list(range(len(rows)))
    for j, (name, colour) in enumerate(zip(names, ("tab:blue", "tab:red"))):
        means = [100 * r[f"{name}_gain_mean"] for r in rows]
        stds = [100 * r[f"{name}_gain_std"] for r in rows]
        ax.bar(
            [x + (j - 0.5) * width for x in xs],
            means,
            width,
            yerr=stds,
            capsize=3,
            color=colour,
            alpha=0.8,
            label=f"{labels[name]}",
        )
        ax.axhline(
            100 * noise_row[f"{name}_gain_mean"],
            color=colour,
            ls="--",
            lw=1,
            label=f"noise baseline, {labels[name]}",
        )
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(xs)
    ax.set_xticklabels([r["label"].replace(" head, ", "\nhead, ") for r in rows], fontsize=7)
    ax.set_ylabel("defended − undefended accuracy (pp)")
    ax.set_title(f"Accuracy gained (mean ± std over {len(seeds)} seeds)", fontsize=10)
    ax.legend(fontsize=7)
    for j, (key, colour, lab) in enumerate(
        (("ssl_clean", "tab:blue", "clean"), ("ssl_attacked", "tab:red", "Linf attacked"))
    ):
        ax2.bar(
            [x + (j - 0.5) * width for x in xs],
            [r[key] for r in rows],
            width,
            color=colour,
            alpha=0.8,
            label=lab,
        )
    ax2.set_xticks(xs)
    ax2.set_xticklabels([r["label"].replace(" head, ", "\nhead, ") for r in rows], fontsize=7)
    ax2.set_ylabel("mean per-image SSL loss (each row's own loss)")
    ax2.set_title("SSL loss of the unpurified input", fontsize=10)
    ax2.legend(fontsize=7)
    caption = (
        f"n = {info['n']} test images (clean, and the stored transfer set "
        f"{info['sets']}). Heads: {args.hidden}→{args.out_dim}, trained on the frozen "
        f"classifier with the same budget ({args.budget} images = batch {args.head_batch} x "
        f"{max(1, args.budget // args.head_batch)} steps), Adam lr {args.lr:g}, {args.train_views} "
        f"views, seed "
        f"{args.head_seed}. Purifier K={args.steps}, V={args.views}, {budget_text()}, batch "
        f"{args.batch_size}, seeds {seeds}. SSL losses: mean of {args.draws} view draws, batch "
        f"{args.batch_size}. Classifier {info['classifier_sha256'][:12]}."
    )
    out.save_figure(fig, caption)
    header = [
        "head / purification loss",
        "SSL loss clean",
        "SSL loss Linf",
        "Linf − clean [95 % CI]",
    ] + [f"gain {labels[nm]} pp (mean ± std [95 % CI])" for nm in names]
    settings = {
        "n": info["n"],
        "losses": losses,
        "pairs": pairs,
        "budget": args.budget,
        "head_batch": args.head_batch,
        "train_views": args.train_views,
        "lr": args.lr,
        "head_seed": args.head_seed,
        "seeds": seeds,
        "steps": args.steps,
        "views": args.views,
        "batch_size": args.batch_size,
        "draws": args.draws,
        "classifier_sha256": info["classifier_sha256"],
        "quick": info["quick"],
    }
    return out.finish(
        TITLE, settings, caption, markdown_table(header, table), findings, ctx.docs,
        state.get("timing"),
    )  # fmt: skip
