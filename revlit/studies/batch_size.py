"""Study 2a + 3 — purification batch size = number of negatives, and a batch-independent bank.

(2a) The authors' NT-Xent (Mao et al., ICCV 2021) takes an anchor's negatives from the other
images of the purification batch: with B images and V views an anchor sees V − 1 positives and
(B − 1)·V negatives. This study runs the default head's purifier at B ∈ {1, 8, 32, 128, 512} and
reports defended clean and Linf (stored transfer PGD set) accuracy. At B = 1 the authors' loss has
nothing to contrast (revlit's NT-Xent refuses a batch of one image), so that point is absent.

(3) The second curve is revlit's batch-independent option: every image is contrasted with the same
fixed bank of M clean negatives (the head's embeddings of M training images,
:mod:`revlit.defenses.bank`) and draws its random start and views from its own generator seeded
from (seed, test index). Its result cannot depend on B (``tests/defenses/test_bank.py`` checks
bit-equality); the study runs it at several B anyway and reports how many images' predictions
differ between batch sizes (expected: none), and how far it is from the authors' loss at B = 128
(paired 95 % bootstrap interval over images).
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
)
from revlit.studies.context import Context

NAME = "batch_size"
TITLE = "Study 2a + 3 — purification batch (= negatives) and the batch-independent bank"
QUICK = {
    "n": 16,
    "batches": "1,4,16",
    "bank_batches": "1,16",
    "steps": 2,
    "views": 2,
    "ref_batch": 16,
    "n_boot": 100,
}


def _ints(text: str) -> list[int]:
    return [int(t) for t in str(text).split(",") if t.strip()]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", default="1,8,32,128,512", help="purification batch sizes B")
    p.add_argument(
        "--bank-batches",
        default=None,
        help="B values for the bank curve (default: the same; it is batch-independent, so a "
        "subset such as 1,512 saves time and still checks that)",
    )
    p.add_argument("--ref-batch", type=int, default=128, help="B where bank vs batch is compared")
    p.add_argument("--steps", type=int, default=SETTINGS["steps"], help="purifier steps K")
    p.add_argument("--views", type=int, default=SETTINGS["n_views"], help="views V")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=2000)


def run(args: argparse.Namespace, ctx: Context) -> dict:
    return run_measured(args, ctx, NAME, QUICK, add_args, measure, report)


def measure(args: argparse.Namespace, ctx: Context, out: StudyOutput) -> dict:
    """Defended predictions for every (negatives, B) on clean and Linf; per-image tensors."""
    n = args.n or 512
    bs = sorted(set(_ints(args.batches)))
    bank_bs = sorted(set(_ints(args.bank_batches))) if args.bank_batches else bs
    parts = ctx.parts()
    names = ["clean", "l_inf"]
    splits = ctx.splits(names, n)
    curves = [("batch", b) for b in bs if b >= 2]
    if parts.bank is not None:
        curves += [("bank", b) for b in bank_bs]
    else:
        ctx.log(f"{NAME}: no bank for this head (python -m revlit.defenses.bank): one curve only")
    correct: dict[tuple[str, int, str], torch.Tensor] = {}
    seconds: dict[tuple[str, int, str], float] = {}
    undefended: dict[str, torch.Tensor] = {}
    for neg, b in curves:
        for name in names:
            cfg = DefenseConfig(
                steps=args.steps, n_views=args.views, batch_size=b, seed=args.seed, negatives=neg
            )
            ctx.log(f"{NAME}: {neg} B={b} on {name} (n={len(splits[name])})")
            res = defend(parts, splits[name], cfg)
            undefended[name] = res.correct
            correct[neg, b, name] = res.correct_def[args.steps]
            seconds[neg, b, name] = res.seconds / len(res.correct)
    return {
        "args": {k: getattr(args, k) for k in ("steps", "views", "seed", "n_boot", "ref_batch")},
        "batches": bs,
        "bank_batches": bank_bs if parts.bank is not None else [],
        "curves": curves,
        "correct": correct,
        "seconds": seconds,
        "undefended": undefended,
        "info": {
            "n": len(splits["clean"]),
            "labels": {nm: splits[nm].label for nm in names},
            "sets": describe_sets(splits),
            "loss": parts.loss,
            "temperature": parts.temperature,
            "view_mode": parts.view_mode,
            "bank_m": None if parts.bank is None else int(parts.bank.shape[0]),
            "classifier_sha256": parts.classifier_info["sha256"],
            "head_sha256": parts.head_info["sha256"],
            "bank_sha256": (parts.bank_info or {}).get("sha256"),
            "quick": ctx.quick,
        },
        "timing": out.timing(),
    }


def report(state: dict, out: StudyOutput, ctx: Context) -> dict:
    """Table, figure and findings from a measured state."""
    args = argparse.Namespace(**state["args"])
    bs, curves, info = state["batches"], state["curves"], state["info"]
    correct, undefended, seconds = state["correct"], state["undefended"], state["seconds"]
    names = ["clean", "l_inf"]
    labels = info["labels"]
    n_eff, v, m = info["n"], args.views, info["bank_m"]
    rows = []
    for neg, b in curves:
        for name in names:
            c = correct[neg, b, name]
            acc = bootstrap_ci(c.double(), args.n_boot, args.seed)
            gain = bootstrap_ci(c.double() - undefended[name].double(), args.n_boot, args.seed)
            rows.append(
                out.add(
                    split=name,
                    negatives=neg,
                    batch_size=b,
                    effective_batch=min(b, len(c)),
                    negatives_per_anchor=m if neg == "bank" else (min(b, len(c)) - 1) * v,
                    positives_per_anchor=v - 1,
                    n=len(c),
                    accuracy=acc[0],
                    accuracy_ci=[acc[1], acc[2]],
                    gain_vs_undefended=gain[0],
                    gain_ci=[gain[1], gain[2]],
                    undefended_accuracy=float(undefended[name].double().mean()),
                    seconds_per_image=seconds[neg, b, name],
                    steps=args.steps,
                    views=v,
                    seed=args.seed,
                )
            )
    # ---- comparisons
    findings = []
    und_txt = ", ".join(
        f"{labels[nm]} {100 * float(undefended[nm].double().mean()):.1f} %" for nm in names
    )
    findings.append(f"Undefended accuracy: {und_txt}.")
    if any(b > n_eff for b in bs):
        findings.append(
            f"Only n = {n_eff} images were evaluated, so B > {n_eff} ran as one batch of {n_eff}."
        )
    for name in names:
        accs = [
            (b, r["accuracy"])
            for r in rows
            for b in [r["batch_size"]]
            if r["split"] == name and r["negatives"] == "batch"
        ]
        if len(accs) >= 2:
            lo_b, lo_a = min(accs, key=lambda t: t[1])
            hi_b, hi_a = max(accs, key=lambda t: t[1])
            small, large = min(b for b, _ in accs), max(b for b, _ in accs)
            d = bootstrap_ci(
                correct["batch", large, name].double() - correct["batch", small, name].double(),
                args.n_boot,
                args.seed,
            )
            verdict = "within noise" if d[1] <= 0 <= d[2] else "a real difference"
            findings.append(
                f"{labels[name]}, authors' loss: accuracy ranges {100 * lo_a:.1f} % (B={lo_b}) "
                f"to {100 * hi_a:.1f} % (B={hi_b}); B={large} minus B={small}: "
                f"{fmt_ci(*d)} pp (paired 95 % CI) — {verdict}."
            )
        bank_b = sorted(b for (neg, b, nm) in correct if neg == "bank" and nm == name)
        if len(bank_b) >= 2:
            base = correct["bank", bank_b[0], name]
            flips = max(int((correct["bank", b, name] != base).sum()) for b in bank_b[1:])
            findings.append(
                f"{labels[name]}, bank: predictions differ between B ∈ {bank_b} for "
                f"{flips} of {len(base)} images (batch-independent by construction)."
            )
        ref = args.ref_batch
        gains = [
            f"{'authors' + chr(39) + ' loss' if r['negatives'] == 'batch' else 'bank'} "
            f"{fmt_ci(r['gain_vs_undefended'], *r['gain_ci'])} pp"
            for r in rows
            if r["split"] == name and r["batch_size"] == ref
        ]
        if gains:
            findings.append(
                f"{labels[name]} at B={ref}, defended minus undefended (paired 95 % CI): "
                + "; ".join(gains)
                + "."
            )
        if ("bank", ref, name) in correct and ("batch", ref, name) in correct:
            d = bootstrap_ci(
                correct["bank", ref, name].double() - correct["batch", ref, name].double(),
                args.n_boot,
                args.seed,
            )
            verdict = "within noise" if d[1] <= 0 <= d[2] else "a real difference"
            findings.append(
                f"{labels[name]}: bank minus authors' loss at B={ref}: {fmt_ci(*d)} pp "
                f"(paired 95 % CI) — {verdict}."
            )
    # ---- figure
    fig, axes = figure(2, 5.0, 4.2)
    for ax, name in zip(axes, names):
        for neg, colour, label in (
            ("batch", "tab:blue", "authors' loss: negatives = batch"),
            (
                "bank",
                "tab:red",
                f"bank of {m or 0} clean negatives (batch-independent)",
            ),
        ):
            rs = [r for r in rows if r["split"] == name and r["negatives"] == neg]
            if not rs:
                continue
            shift = 1.0 if neg == "batch" else 1.07  # keep the two curves' error bars apart
            x = [r["batch_size"] * shift for r in rs]
            y = [100 * r["accuracy"] for r in rs]
            err = [
                [100 * (r["accuracy"] - r["accuracy_ci"][0]) for r in rs],
                [100 * (r["accuracy_ci"][1] - r["accuracy"]) for r in rs],
            ]
            ax.errorbar(
                x,
                y,
                yerr=err,
                marker="o" if neg == "batch" else "s",
                ms=4,
                capsize=2,
                color=colour,
                ls="-" if neg == "batch" else "--",
                label=label,
            )
        und = 100 * float(undefended[name].double().mean())
        ax.axhline(und, color="0.4", ls=":", lw=1, label=f"undefended {und:.1f} %")
        if 1 in bs:
            ax.annotate(
                "B=1: authors' loss\nhas no negatives",
                (1, und),
                fontsize=6,
                xytext=(4, 8),
                textcoords="offset points",
                color="tab:blue",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(bs)
        ax.set_xticklabels([str(b) for b in bs])
        ax.set_xlabel("purification batch B")
        ax.set_ylabel(f"defended {labels[name]} accuracy (%)")
        ax.set_title(f"{labels[name]} (n = {n_eff})", fontsize=10)
        ax.legend(fontsize=7)
    caption = (
        f"n = {n_eff} test images (clean, and the stored transfer set {info['sets']}); "
        f"default head ({info['loss']}, T={info['temperature']}, views {info['view_mode']}); purifier "
        f"K={args.steps} steps, V={v} views, {budget_text()}, seed {args.seed} (per batch for "
        f"the authors' loss, per image for the bank). An anchor sees V−1 positives and (B−1)·V "
        f"negatives with the authors' loss, M bank negatives with the bank. Error bars: 95 % bootstrap CI over images. "
        f"Classifier {info['classifier_sha256'][:12]}, head {info['head_sha256'][:12]}"
        + (f", bank {info['bank_sha256'][:12]}." if info["bank_sha256"] else ".")
    )
    out.save_figure(fig, caption)
    table = []
    for neg, b in curves:
        rs = [r for r in rows if (r["negatives"], r["batch_size"]) == (neg, b)]
        cells = [neg, str(b), str(rs[0]["negatives_per_anchor"])]
        for name in names:
            r = next(r for r in rs if r["split"] == name)
            cells.append(fmt_ci(r["accuracy"], *r["accuracy_ci"]))
        cells.append(f"{sum(r['seconds_per_image'] for r in rs) / len(rs):.2f}")
        table.append(cells)
    if 1 in bs:
        table.insert(0, ["batch", "1", "0", "n/a (no negatives)", "n/a (no negatives)", "—"])
    header = ["negatives", "B", "negatives per anchor"]
    header += [f"{labels[nm]} acc % [95 % CI]" for nm in names] + ["s / image"]
    settings = {
        "n": n_eff,
        "batches": bs,
        "bank_batches": state["bank_batches"],
        "steps": args.steps,
        "views": v,
        "seed": args.seed,
        "n_boot": args.n_boot,
        "bank_m": m,
        "classifier_sha256": info["classifier_sha256"],
        "head_sha256": info["head_sha256"],
        "bank_sha256": info["bank_sha256"],
        "quick": info["quick"],
    }
    return out.finish(
        TITLE, settings, caption, markdown_table(header, table), findings, ctx.docs,
        state.get("timing"),
    )  # fmt: skip
