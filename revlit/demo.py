"""``make demo``: the whole revlit pipeline on the shipped default, on the CPU, in minutes.

1. builds the stored PGD sets (L1 ε 12, L2 ε 0.5, Linf ε 8/255; 10 iterations) for the first N
   CIFAR-10 test images against the shipped robust classifier (``cli.py predict`` with
   ``configs/attack/pgd_*.yaml``), with their PNG grids;
2. evaluates clean / L1 / L2 / Linf without and with the reverse-attack defense (and the
   random-noise baseline of the same budget) (``python -m revlit.evaluate``);
3. prints the table and says where the JSON records, PNGs and TensorBoard logs are.

Usage::

    python -m revlit.demo [--n N] [--out results/demo]

The default N keeps the whole ``make demo`` (install included) within ten minutes on a 2-core CPU
(docs/speed.md gives the cost per image); ``make demo N=1000`` gives the longer table.

These are *transfer* attacks (made on the undefended classifier): they are no robustness
guarantee for the defended one; see ``make adaptive`` for attacks that target the defense.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from revlit.data.cifar import default_data_dir, find_batches
from revlit.defenses.evaluate import single_image_batches
from revlit.utils import ArgumentParser, int_at_least

ATTACKS = (("l_1", "pgd_l1"), ("l_2", "pgd_l2"), ("l_inf", "pgd_linf"))
#: test images per split of the demo (the one definition; ``make demo`` passes N only if given)
DEMO_N = 256


def _cli(args: list[str]) -> None:
    from revlit.cli import main as cli_main

    print(f"\n$ python cli.py {' '.join(args)}", flush=True)
    cli_main(args)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m revlit.demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--n", type=int, default=DEMO_N, help="first N test images (default: %(default)s)"
    )
    p.add_argument("--classifier", default="checkpoints/resnet20_at.pt")
    p.add_argument("--head", default="checkpoints/resnet20_at_head.pt")
    p.add_argument("--out", default="results/demo", help="output folder of the evaluation")
    p.add_argument(
        "--batch-size", type=int_at_least(2), default=256, help="purification batch (negatives)"
    )
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10")
    args = p.parse_args(argv)
    if args.n < 2:
        p.error("--n must be >= 2 (the contrastive loss needs a batch)")
    if single_image_batches(args.n, args.batch_size):  # checked before any attack set is made
        p.error(
            f"--n {args.n} in batches of {args.batch_size} leaves a batch of one image (the "
            "contrastive loss needs negatives): choose another --batch-size or --n"
        )
    for path in (args.classifier, args.head):
        if not Path(path).is_file():
            print(
                f"revlit demo: error: {path} not found (run from the repository root)",
                file=sys.stderr,
            )
            return 2
    data_dir = default_data_dir()
    if find_batches(data_dir) is None and not args.download:
        print(
            f"revlit demo: error: CIFAR-10 not found in '{Path(data_dir).resolve()}': set "
            "$REVLIT_DATA_DIR to a folder holding cifar-10-batches-py/, or pass --download",
            file=sys.stderr,
        )
        return 2
    t0 = time.time()
    stem = Path(args.classifier).stem
    sets = []
    for norm, cfg in ATTACKS:
        name = f"demo_{stem}_{norm}"
        _cli(
            [
                "predict",
                "--config", f"configs/attack/{cfg}.yaml",
                "--model.init_args.classifier", args.classifier,
                "--model.init_args.set_name", name,
                "--model.init_args.overwrite", "true",  # the demo's own sets
                "--data.init_args.test_subset", str(args.n),
                "--data.init_args.download", str(args.download).lower(),
                "--run_name", f"demo_attack_{norm}",
            ]
        )  # fmt: skip
        sets.append(name)
    t_attacks = time.time() - t0
    from revlit.evaluate import main as evaluate_main

    eval_args = [
        "--classifier", args.classifier,
        "--head", args.head,
        "--n", str(args.n),
        "--sets", ",".join(["clean", *sets]),
        "--defenses", "none,reverse,noise",
        "--batch-size", str(args.batch_size),
        "--out", args.out,
        "--overwrite",  # the demo's own folder, replaced when the new table is complete
    ]  # fmt: skip
    print(f"\n$ python -m revlit.evaluate {' '.join(eval_args)}", flush=True)
    rc = evaluate_main(eval_args)
    if rc:
        return rc
    total = time.time() - t0
    out = Path(args.out)
    print(
        f"\nrevlit demo done in {total / 60:.1f} min (attacks {t_attacks:.0f} s) on n={args.n}.\n"
        f"  table:        {out / 'table.md'}\n"
        f"  JSON records: {out / 'records.jsonl'} (one per row)\n"
        f"  PNG grids:    data/pgd/demo_*/grid.png (attacks), {out}/**/*.png (defense)\n"
        f"  TensorBoard:  tensorboard --logdir logs\n"
        "These are transfer attacks from the undefended model, not a robustness guarantee for "
        "the defended one: run `make adaptive` for attacks on the defense itself."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
