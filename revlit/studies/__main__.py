"""``python -m revlit.studies <study> [--quick] [--n N] ...``: run one study, or ``all``.

Studies (each writes ``<out>/<study>/{rows.jsonl,<study>.json,<study>.md,<study>.png}``):

  loss_functions  1: one head per SSL loss (same budget/seed): SSL loss clean vs attacked, gain
  batch_size      2a+3: purification batch B (= negatives), authors' loss vs a bank of negatives
  head_batch      2b: head-training batch at an equal budget of images seen
  cost_frontier   4: steps K x views V against backbone passes per image
  detection       5: the input's SSL loss as an attack detector (ROC, AUROC)

``--quick`` runs the same code on tiny synthetic stand-ins in seconds (``make test`` does).
Bad input (missing checkpoint or stored set, wrong classifier, bad values) exits 2 with one line
``revlit: error: ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from revlit.studies import STUDIES, get_study
from revlit.studies.context import add_common_args, context_from_args
from revlit.utils import ArgumentParser


def load_config(path: str | Path, parser: argparse.ArgumentParser) -> dict:
    """Option defaults from a YAML mapping (``configs/studies/<study>.yaml``).

    Keys are option names (``steps-grid`` or ``steps_grid``); lists become comma-separated
    strings. Unknown keys are refused (one line).
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"study config not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"study config {p} must be a mapping of option: value")
    known = {a.dest for a in parser._actions}
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            raise ValueError(f"study config {p}: unknown option '{key}'")
        out[dest] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(  # one-line usage errors, in every study's sub-parser too
        prog="python -m revlit.studies",
        description="revlit's studies of the reverse-attack defense (see docs/studies/).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    p._studies = sub  # the sub-parsers, for --config
    for name in (*STUDIES, "all"):
        sp = sub.add_parser(name, help=get_study(name).TITLE if name != "all" else "every study")
        add_common_args(sp)
        if name != "all":  # ``all`` runs every study with its own defaults
            get_study(name).add_args(sp)
            sp.add_argument("--config", default=None, help="YAML of option defaults")
    return p


def run_study(name: str, args: argparse.Namespace, ctx) -> dict:
    mod = get_study(name)
    if args.study == "all":  # fill this study's defaults
        sp = argparse.ArgumentParser()
        mod.add_args(sp)
        defaults = vars(sp.parse_args([]))
        args = argparse.Namespace(**{**defaults, **vars(args)})
    ctx.log(f"study {name}: start")
    summary = mod.run(args, ctx)
    ctx.log(f"study {name}: done in {summary['wall_seconds']:.0f} s -> {summary['dir']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):  # config values become defaults; flags still win
            sp = parser._studies.choices[args.study]
            sp.set_defaults(**load_config(args.config, sp))
            args = parser.parse_args(argv)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        ctx = context_from_args(args)
        names = list(STUDIES) if args.study == "all" else [args.study]
        summaries = [run_study(name, args, ctx) for name in names]
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"revlit: error: {first}", file=sys.stderr)
        return 2
    for s in summaries:
        print(json.dumps({k: s[k] for k in ("study", "wall_seconds", "dir", "findings")}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
