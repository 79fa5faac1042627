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

from revlit.io import atomic_write_text, replace_dir
from revlit.utils import ArgumentParser, int_at_least

DEFENSE_ORDER = ("none", "reverse", "noise")
N_TEST = 10_000  # CIFAR-10 test images


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m revlit.evaluate",
        description="Accuracy and loss of a classifier on clean and stored adversarial splits, "
        "without and with the reverse-attack defense and the random-noise baseline.",
    )
    p.add_argument(
        "--classifier", default="checkpoints/resnet20_at.pt", help="classifier checkpoint"
    )
    p.add_argument("--head", default="checkpoints/resnet20_at_head.pt", help="SSL head checkpoint")
    p.add_argument(
        "--n", type=int_at_least(0), default=1000, help="first N images of every split (0 = all)"
    )
    p.add_argument(
        "--sets",
        default="clean,resnet20_at_l_inf,resnet20_at_l_2,resnet20_at_l_1",
        help="comma-separated splits: 'clean' and stored set names (under --pgd-root) or paths",
    )
    p.add_argument("--defenses", default="none,reverse,noise", help="subset of none,reverse,noise")
    p.add_argument("--out", default="results/evaluate", help="output folder (results/<run>)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out (when the new run is complete)"
    )
    p.add_argument(
        "--resume", action="store_true", help="finish --out: reuse its results and finished batches"
    )
    p.add_argument(
        "--batch-size", type=int_at_least(2), default=128,
        help="per-device batch (the negatives)",
    )  # fmt: skip
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
    p.add_argument(
        "--devices", type=int_at_least(1), default=1, help="devices (processes under DDP)"
    )
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
    writer = DefenseWriter(str(out_dir), overwrite=args.overwrite, resume=args.resume)
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
    out, skipped = Path(args.out), preflight(args, sets)
    run_dir = out.with_name(f".{out.name}.partial-run") if args.overwrite else out
    run_name = f"evaluate_{out.name}"
    records: list[dict] = []
    is_zero = True
    for split in (s for s in sets if s not in skipped):
        got: dict[str, dict] = {}
        for defense in _runs_for(defenses):
            tag = Path(split).name
            trainer, recs = _run_one(args, split, defense, run_dir / tag / defense, run_name)
            is_zero = trainer.is_global_zero
            for r in recs:
                got.setdefault(r["defense"]["method"], r)  # the first 'none' row is kept
        records += [got[d] for d in DEFENSE_ORDER if d in defenses and d in got]
    if not is_zero:
        return []
    save_jsonl(records, run_dir / "records.jsonl")
    table = markdown_table(records)
    header = _header(args, records, skipped)
    atomic_write_text(header + table, run_dir / "table.md")  # written last: complete
    if run_dir != out:
        replace_dir(run_dir, out)
    print(header + table, flush=True)
    return records


def preflight(args, sets: list[str]) -> list[str]:
    """Every input checked before any model runs; returns the stored sets skipped as missing.

    Output folder (refused if it exists, unless ``--overwrite``/``--resume``), classifier and
    head (loadable, finite, made for each other), every stored set (present, well-formed, made
    for this classifier), n and the batch (no batch of one image on any device).
    """
    from revlit.data.stored import StoredSetNotFound, check_stored_sets
    from revlit.defenses.evaluate import single_image_batches
    from revlit.models import load_classifier
    from revlit.ssl import load_head

    out = Path(args.out)
    if args.overwrite and args.resume:
        raise ValueError("pass --overwrite or --resume, not both")
    first_rank = int(os.environ.get("LOCAL_RANK", 0)) == 0  # DDP children rerun this script
    if first_rank and out.exists() and any(out.iterdir()) and not (args.overwrite or args.resume):
        raise ValueError(
            f"output folder {out} already exists: pass --overwrite to replace it, --resume to "
            "finish it, or another --out"
        )
    if args.n > N_TEST:
        raise ValueError(f"--n {args.n}: CIFAR-10 has {N_TEST} test images (0 = all)")
    for defense in _runs_for(_csv(args.defenses)):
        make_defense(args, defense)  # its settings are checked (e.g. steps >= 1)
    _, cinfo = load_classifier(args.classifier)
    load_head(args.head, cinfo["sha256"], allow_mismatch=args.allow_mismatch)
    skipped = []
    for split in sets:
        try:
            found = check_stored_sets([split], args.pgd_root, cinfo["sha256"], args.allow_mismatch)
        except StoredSetNotFound:
            if not args.skip_missing:
                raise FileNotFoundError(
                    f"stored set '{split}' not found under {args.pgd_root} (make it with "
                    "`make attacks`, or pass --skip-missing)"
                ) from None
            logging.getLogger("revlit").warning("skipping missing stored set '%s'", split)
            skipped.append(split)
            continue
        size = len(found[split]) if split in found else N_TEST
        n = min(args.n or size, size)
        if single_image_batches(n, args.batch_size, args.devices):
            raise ValueError(
                f"'{split}': {n} images in batches of {args.batch_size} on {args.devices} "
                "device(s) leave a batch of one image (the contrastive loss needs negatives): "
                "choose another --batch-size or --n"
            )
    return skipped


def _per255(value) -> str:
    """``16/255`` for a budget that is a whole number of 255ths, else the number."""
    from revlit.utils import as_float

    v = as_float(value, "value")
    k = round(v * 255)
    return f"{k}/255" if abs(v * 255 - k) < 1e-6 else f"{v:.6g}"


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
        f"- defense: {args.norm} ε_r={_per255(args.eps)}, step {_per255(args.step_size)}, "
        f"{args.steps} steps, "
        f"{args.n_views} views, select={args.select}, seed {args.seed}",
        f"- commit {git_commit()}; command: `python -m revlit.evaluate {' '.join(getattr(args, 'argv', sys.argv[1:]))}`",
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the table's header
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
