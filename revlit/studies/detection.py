"""Study 5 — detection: is the SSL loss of an unpurified input a score for "attacked"?

Mao et al. (ICCV 2021) build the defense on the observation that adversarial perturbations raise
the self-supervised contrastive loss. If they do so reliably, the per-image loss of the input as
given is a detector. For the stored transfer PGD sets (L1, L2, Linf, made against the same
classifier) against the clean versions of the same test images, this study computes that score
(mean per-image NT-Xent over ``--draws`` independent draws of ``--views`` views), its ROC curve and
AUROC (torchmetrics), with a 95 % bootstrap interval over images (pairs resampled). Two scores:

* ``batch``: the authors' loss, negatives = the other images of the batch (batches of one split);
* ``bank``: the head's fixed bank of clean negatives, so the score of an image does not depend on
  its batch-mates (if a bank exists).

AUROC is also reported on the successful attacks only (clean image classified correctly, attacked
version misclassified) against all clean images.
"""

from __future__ import annotations

import argparse

import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc

from revlit.studies.common import (
    StudyOutput,
    apply_quick,
    describe_sets,
    figure,
    markdown_table,
    predict,
    sha12,
    ssl_scores,
)
from revlit.studies.context import Context

NAME = "detection"
TITLE = "Study 5 — detection: the SSL loss of the input as a score for 'attacked'"
ATTACKS = ("l_1", "l_2", "l_inf")
QUICK = {"n": 24, "draws": 1, "batch_size": 8, "n_boot": 50}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draws", type=int, default=4, help="view draws averaged per score")
    p.add_argument("--views", type=int, default=4, help="views per image")
    p.add_argument("--batch-size", type=int, default=128, help="batch (negatives) of the score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CI")


def _unit(scores: torch.Tensor) -> torch.Tensor:
    """Monotone map of scores to [0, 1] (torchmetrics would squash raw losses with a sigmoid)."""
    lo, hi = scores.min(), scores.max()
    return (scores - lo) / (hi - lo).clamp_min(1e-12)


def auroc(attacked: torch.Tensor, clean: torch.Tensor) -> float:
    """AUROC of ``score > t`` for attacked (positives) vs clean (negatives)."""
    s = _unit(torch.cat([attacked, clean]).double())
    t = torch.cat([torch.ones(len(attacked)), torch.zeros(len(clean))]).long()
    return float(binary_auroc(s, t))


def auroc_ci(
    attacked: torch.Tensor, clean: torch.Tensor, n_boot: int, seed: int = 0
) -> tuple[float, float, float]:
    """AUROC and the 95 % percentile-bootstrap interval, resampling image PAIRS (same test image)."""
    g = torch.Generator().manual_seed(seed)
    n = len(clean)
    vals = []
    for _ in range(n_boot):
        j = torch.randint(0, n, (n,), generator=g)
        vals.append(auroc(attacked[j], clean[j]))
    q = torch.quantile(
        torch.tensor(vals, dtype=torch.float64), torch.tensor([0.025, 0.975]).double()
    )
    return auroc(attacked, clean), float(q[0]), float(q[1])


def verdict(lo: float, hi: float) -> str:
    if lo <= 0.5 <= hi:
        return "no better than chance (the interval contains 0.5)"
    if hi < 0.5:
        return "below chance: attacked images have a LOWER loss"
    if lo >= 0.9:
        return "a strong detector"
    if lo >= 0.7:
        return "a usable but imperfect detector"
    return "weak: above chance, far from a detector"


def run(args: argparse.Namespace, ctx: Context) -> dict:
    if ctx.quick:
        apply_quick(args, QUICK, add_args)
    n = args.n or 500
    out = StudyOutput(ctx.out, NAME)
    parts = ctx.parts()
    splits = ctx.splits(["clean", *ATTACKS], n)
    negs = ["batch"] + (["bank"] if parts.bank is not None else [])
    clean = splits["clean"]
    correct_clean = predict(parts.classifier, clean.x) == clean.y
    kw = {"n_views": args.views, "draws": args.draws, "batch_size": args.batch_size}
    scores = {}
    for neg in negs:
        for name, sp in splits.items():
            ctx.log(f"{NAME}: SSL loss {neg} {name} (n={len(sp)})")
            scores[neg, name] = ssl_scores(parts, sp, neg, seed=args.seed, **kw)
    fig, (ax,) = figure(1, 5.6, 5.0)
    colours = {"l_1": "tab:green", "l_2": "tab:orange", "l_inf": "tab:red"}
    table = []
    findings = []
    for name in ATTACKS:
        sp = splits[name]
        success = correct_clean & (predict(parts.classifier, sp.x) != sp.y)
        for neg in negs:
            a, c = scores[neg, name], scores[neg, "clean"]
            auc, lo, hi = auroc_ci(a, c, args.n_boot, args.seed)
            auc_s = auroc(a[success], c) if int(success.sum()) > 0 else float("nan")
            s01 = _unit(torch.cat([a, c]).double())
            t = torch.cat([torch.ones(len(a)), torch.zeros(len(c))]).long()
            fpr, tpr, _ = binary_roc(s01, t)
            tpr_at_5 = float(tpr[fpr <= 0.05].max()) if bool((fpr <= 0.05).any()) else 0.0
            ax.plot(
                fpr.numpy(),
                tpr.numpy(),
                color=colours[name],
                ls="-" if neg == "batch" else "--",
                label=f"{sp.label} {neg}: AUROC {auc:.3f} [{lo:.3f}, {hi:.3f}]",
            )
            out.add(
                split=name,
                negatives=neg,
                n=len(sp),
                auroc=auc,
                auroc_lo=lo,
                auroc_hi=hi,
                auroc_successful=auc_s,
                n_successful=int(success.sum()),
                tpr_at_fpr_5pct=tpr_at_5,
                ssl_clean=float(c.mean()),
                ssl_attacked=float(a.mean()),
                attack_meta={k: sp.meta.get(k) for k in ("norm", "eps", "steps", "loss")},
            )
            table.append(
                [
                    sp.label,
                    neg,
                    f"{float(c.mean()):.3f}",
                    f"{float(a.mean()):.3f}",
                    f"{auc:.3f} [{lo:.3f}, {hi:.3f}]",
                    f"{auc_s:.3f} (n={int(success.sum())})",
                    f"{100 * tpr_at_5:.1f}",
                ]
            )
            findings.append(
                f"{sp.label} ({neg} negatives): AUROC {auc:.3f}, 95 % CI [{lo:.3f}, {hi:.3f}] — "
                f"{verdict(lo, hi)}."
            )
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("false positive rate (clean flagged)")
    ax.set_ylabel("true positive rate (attacked flagged)")
    ax.set_title("Per-image SSL loss of the input as an attack detector", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    settings = {
        "n": n,
        "draws": args.draws,
        "views": args.views,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "n_boot": args.n_boot,
        "negatives": negs,
        "classifier_sha256": parts.classifier_info["sha256"],
        "head_sha256": parts.head_info["sha256"],
        "bank_sha256": (parts.bank_info or {}).get("sha256"),
        "quick": ctx.quick,
    }
    caption = (
        f"n = {len(clean)} test images per split (clean vs the stored transfer sets "
        f"{describe_sets(splits)}). Score: per-image {parts.loss} loss (T={parts.temperature}) of "
        f"the unpurified input, mean of {args.draws} draws of {args.views} views, seed "
        f"{args.seed}; batch = {args.batch_size} images of one split; bank = "
        f"{parts.bank.shape[0] if parts.bank is not None else 0} clean negatives. 95 % CI: "
        f"{args.n_boot} bootstrap resamples of image pairs. Classifier {sha12(parts.classifier_info)}, "
        f"head {sha12(parts.head_info)}."
    )
    out.save_figure(fig, caption)
    header = [
        "attack",
        "negatives",
        "SSL loss clean",
        "SSL loss attacked",
        "AUROC [95 % CI]",
        "AUROC, successful attacks only",
        "TPR @ 5 % FPR (%)",
    ]
    return out.finish(TITLE, settings, caption, markdown_table(header, table), findings, ctx.docs)
