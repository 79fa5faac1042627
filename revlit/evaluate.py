"""``python -m revlit.evaluate``: the defense's results table (``make evaluate``).

For every data split (``clean`` and stored adversarial sets under ``data/pgd``) and every defense
(``none``, ``reverse``, ``noise``) it reports accuracy, cross-entropy, SSL loss before/after,
seconds and backbone passes per image, as a markdown table (printed and written to
``<out>/table.md``) and one JSON record per row (``<out>/records.jsonl`` and
``<out>/<split>/<defense>/record_*.json``; see :mod:`revlit.records`).

One pass over a split gives both the undefended and the defended numbers (the DefenseModule
computes both), so a split costs one reverse run plus one (cheap) noise run.

Example::

    python -m revlit.evaluate --classifier checkpoints/resnet20_at.pt \\
        --head checkpoints/resnet20_at_head.pt --n 1000 \\
        --sets clean,resnet20_at_l_inf,resnet20_at_l_2,resnet20_at_l_1 \\
        --defenses none,reverse,noise --out results/resnet20_at

Runs on one device or under DDP (``--devices 2 --strategy ddp``, or ``--accelerator gpu
--devices N``): each device's batch supplies the contrastive negatives, so the per-device batch
size (``--batch-size``) is part of the defense's settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DEFENSE_ORDER = ("none", "reverse", "noise")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m revlit.evaluate",
        description="Accuracy and loss of a classifier on clean and stored adversarial splits, "
        "without and with the reverse-attack defense and the random-noise baseline.",
    )
    p.add_argument(
        "--classifier", default="checkpoints/resnet20_at.pt", help="classifier checkpoint"
    )
    p.add_argument("--head", default="checkpoints/resnet20_at_head.pt", help="SSL head checkpoint")
    p.add_argument("--n", type=int, default=1000, help="first N images of every split (0 = all)")
    p.add_argument(
        "--sets",
        default="clean,resnet20_at_l_inf,resnet20_at_l_2,resnet20_at_l_1",
        help="comma-separated splits: 'clean' and stored set names (under --pgd-root) or paths",
    )
    p.add_argument("--defenses", default="none,reverse,noise", help="subset of none,reverse,noise")
    p.add_argument("--out", default="results/evaluate", help="output folder (results/<run>)")
    p.add_argument("--batch-size", type=int, default=128, help="per-device batch (the negatives)")
    add_purifier_options(p)
    p.add_argument(
        "--view-mode", default=None, help="shared or per_sample (default: head's record)"
    )
    p.add_argument(
        "--loss", default=None, help="SSL loss (default: the head's record, else nt_xent)"
    )
    p.add_argument("--temperature", type=float, default=None, help="SSL loss temperature")
    p.add_argument("--seed", type=int, default=0, help="run seed (per batch: + first test index)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default $REVLIT_DATA_DIR)")
    p.add_argument("--pgd-root", default="data/pgd", help="folder of the stored sets")
    p.add_argument(
        "--allow-mismatch", action="store_true", help="accept another classifier's sets/head"
    )
    p.add_argument("--skip-missing", action="store_true", help="skip stored sets that do not exist")
    p.add_argument("--accelerator", default="cpu", help="cpu, gpu, auto")
    p.add_argument("--devices", type=int, default=1, help="devices (processes under DDP)")
    p.add_argument("--strategy", default="auto", help="auto or ddp")
    p.add_argument(
        "--log-dir", default=os.environ.get("REVLIT_LOG_DIR", "logs"), help="TensorBoard root"
    )
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True,
        help="Lightning's progress bar with images/s (default: on)",
    )  # fmt: skip
    return p


def _arg_help(name: str) -> str:
    """The first line of ``name``'s entry in ReversePurifier's Args docstring."""
    import re

    from revlit.defenses import ReversePurifier

    doc = ReversePurifier.__doc__ or ""
    found = re.search(rf"^ {{8}}{name}: (.+?)(?=^ {{8}}\w+:|^\s*$)", doc, re.M | re.S)
    text = " ".join(found.group(1).split()) if found else name
    return text.split(". ")[0].rstrip(".").replace("%", "%%") + " (default: %(default)s)"


def add_purifier_options(p: argparse.ArgumentParser) -> None:
    """One option per setting of :class:`revlit.defenses.ReversePurifier`, default and all, read
    from its signature (so the command line cannot drift from the purifier)."""
    import inspect
    from enum import Enum

    from revlit.defenses import SETTINGS, ReversePurifier

    params = inspect.signature(ReversePurifier).parameters
    for name, default in SETTINGS.items():
        flag, kind = "--" + name.replace("_", "-"), str(params[name].annotation)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                           help=_arg_help(name))  # fmt: skip
            continue
        if isinstance(default, Enum):
            default, typ = default.value, str
        elif "str" in kind:  # numbers that also take fractions such as "16/255"
            typ = str
        else:
            typ = type(default)
        p.add_argument(flag, type=typ, default=default, help=_arg_help(name))


def make_defense(args, method: str):
    """The defense of one run from the command line's settings (``none``, ``noise``, ``reverse``)."""
    from revlit.defenses import SETTINGS, NoDefense, RandomNoise, ReversePurifier

    if method == "none":
        return NoDefense()
    if method == "noise":
        return RandomNoise(norm=args.norm, eps=args.eps)
    kw = {name: getattr(args, name) for name in SETTINGS}
    if args.view_mode is not None:
        from revlit.ssl.views import SimCLRViews

        kw["views"] = SimCLRViews(mode=args.view_mode)
    if args.loss is not None or args.temperature is not None:
        from revlit.losses import make_loss
        from revlit.ssl.head import head_training, load_head

        rec = head_training(load_head(args.head)[1])
        temperature = rec["temperature"] if args.temperature is None else args.temperature
        kw["loss"] = make_loss(args.loss or rec["loss"], temperature)
    return ReversePurifier(**kw)


def _runs_for(defenses: list[str]) -> list[str]:
    """Module runs needed: 'reverse' and 'noise' each also give the undefended row."""
    runs = [d for d in ("reverse", "noise") if d in defenses]
    return runs or ["none"]


def _run_one(args, split: str, defense: str, out_dir: Path, run_name: str):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from revlit.callbacks.defense_viz import DefenseViz
    from revlit.callbacks.defense_writer import DefenseWriter
    from revlit.callbacks.throughput import ImagesPerSecond
    from revlit.data.datamodule import CIFAR10DataModule
    from revlit.modules.defense import DefenseModule

    module = DefenseModule(
        classifier=args.classifier,
        head=args.head,
        defense=make_defense(args, defense),
        seed=args.seed,
        allow_mismatch=args.allow_mismatch,
    )
    dm = CIFAR10DataModule(
        data_dir=args.data_dir,
        eval_batch_size=args.batch_size,
        eval_set=split,
        pgd_root=args.pgd_root,
        test_subset=args.n if args.n > 0 else None,
        allow_mismatch=args.allow_mismatch,
    )
    writer = DefenseWriter(str(out_dir))
    tag = Path(split).name
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        inference_mode=False,
        logger=TensorBoardLogger(args.log_dir, name=run_name, version=f"{tag}_{defense}"),
        callbacks=[writer, DefenseViz(), ImagesPerSecond()],
        enable_progress_bar=args.progress,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.predict(module, datamodule=dm, return_predictions=False)
    return trainer, writer.records


def evaluate(args) -> list[dict]:
    """Run every (split, defense) and return the records (on rank 0; [] on other ranks)."""
    from revlit.records import markdown_table, save_jsonl

    defenses = _csv(args.defenses)
    bad = [d for d in defenses if d not in DEFENSE_ORDER]
    if bad or not defenses:
        raise ValueError(f"--defenses takes a subset of none,reverse,noise, got '{args.defenses}'")
    sets = _csv(args.sets)
    if not sets:
        raise ValueError("--sets is empty")
    for path, what in ((args.classifier, "classifier"), (args.head, "head")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    out = Path(args.out)
    run_name = f"evaluate_{out.name}"
    records: list[dict] = []
    skipped: list[str] = []
    is_zero = True
    for split in sets:  # every set checked before any work
        if (
            split != "clean"
            and not Path(split).exists()
            and not (Path(args.pgd_root) / split).exists()
        ):
            if not args.skip_missing:
                raise FileNotFoundError(
                    f"stored set '{split}' not found under {args.pgd_root} (make it with "
                    "`make attacks`, or pass --skip-missing)"
                )
            logging.getLogger("revlit").warning("skipping missing stored set '%s'", split)
            skipped.append(split)
    for split in (s for s in sets if s not in skipped):
        got: dict[str, dict] = {}
        for defense in _runs_for(defenses):
            tag = Path(split).name
            trainer, recs = _run_one(args, split, defense, out / tag / defense, run_name)
            is_zero = trainer.is_global_zero
            for r in recs:
                got.setdefault(r["defense"]["method"], r)  # the first 'none' row is kept
        records += [got[d] for d in DEFENSE_ORDER if d in defenses and d in got]
    if not is_zero:
        return []
    save_jsonl(records, out / "records.jsonl")
    table = markdown_table(records)
    header = _header(args, records, skipped)
    (out / "table.md").write_text(header + table)
    print(header + table, flush=True)
    return records


def _header(args, records: list[dict], skipped: list[str]) -> str:
    from revlit.io import git_commit

    first = records[0] if records else {}
    lines = [
        "# revlit evaluation",
        "",
        f"- classifier: `{args.classifier}` (sha256 {first.get('classifier', {}).get('sha256', '?')[:12]})",
        f"- SSL head: `{args.head}` (sha256 {(first.get('head') or {}).get('sha256', '?')[:12]})",
        f"- first {args.n or 'all'} test images per split; per-device batch {args.batch_size} "
        f"(the contrastive negatives); devices {args.devices} ({args.accelerator}, {args.strategy})",
        f"- defense: {args.norm} ε_r={args.eps}, step {args.step_size}, {args.steps} steps, "
        f"{args.n_views} views, select={args.select}, seed {args.seed}",
        f"- commit {git_commit()}; command: `python -m revlit.evaluate {' '.join(sys.argv[1:])}`",
        "- accuracy and CE loss of the classifier on the split as given (defense none) and after "
        "the defense; attacks are transfer attacks made against the undefended classifier.",
    ]
    if skipped:
        lines.append(f"- skipped (missing): {', '.join(skipped)}")
    return "\n".join(lines) + "\n\n"


def main(argv: list[str] | None = None) -> int:
    from revlit.cli import quiet

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet()
    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("REVLIT_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"revlit: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
