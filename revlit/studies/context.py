"""What a study runs on: the shipped classifier/head/bank/sets, or the quick-mode stand-ins."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from revlit.studies.common import Parts, Split, load_parts, load_splits


@dataclass
class Context:
    """Paths and caches shared by the studies of one command.

    Built by :func:`context_from_args`; in quick mode every path points at the tiny assets of
    :mod:`revlit.studies.quick`.
    """

    classifier: str | dict
    head: str
    bank: str | None
    data_dir: str | None
    pgd_root: str
    out: str
    docs: str | None = None
    set_prefix: str | None = None
    quick: bool = False
    allow_mismatch: bool = False
    verbose: bool = True
    _parts: Parts | None = field(default=None, repr=False)
    _splits: dict = field(default_factory=dict, repr=False)

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def parts(self) -> Parts:
        """The classifier + default head (+ its bank), loaded once."""
        if self._parts is None:
            self._parts = load_parts(self.classifier, self.head, self.bank, self.allow_mismatch)
        return self._parts

    def splits(self, names: list[str], n: int) -> dict[str, Split]:
        """The first ``n`` images of each split (cached per (names, n))."""
        key = (tuple(names), n)
        if key not in self._splits:
            self._splits[key] = load_splits(
                names,
                n,
                self.parts().classifier_info,
                self.set_prefix,
                self.pgd_root,
                self.data_dir,
                self.allow_mismatch,
            )
        return self._splits[key]

    @property
    def heads_dir(self) -> Path:
        """Where heads trained by the studies are cached (shared by studies 1 and 2b)."""
        return Path(self.out) / "heads"


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny model + tiny data, seconds (tests)")
    p.add_argument("--n", type=int, default=None, help="test images per split (first n)")
    p.add_argument("--out", default="results/studies", help="output root (<out>/<study>/)")
    p.add_argument("--docs", default=None, help="also copy <study>.png/.md here (docs/studies)")
    p.add_argument("--classifier", default="checkpoints/resnet20_at.pt")
    p.add_argument("--head", default="checkpoints/resnet20_at_head.pt")
    p.add_argument("--bank", default="auto", help="bank file; 'auto' = <head>_bank.pt; 'none'")
    p.add_argument("--pgd-root", default="data/pgd", help="folder of the stored sets")
    p.add_argument(
        "--set-prefix", default=None, help="stored sets <prefix>_<norm> (classifier stem)"
    )
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default $REVLIT_DATA_DIR)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--allow-mismatch", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--rerender",
        action="store_true",
        help="rebuild table/figure/findings from <out>/<study>/state.pt (no measuring)",
    )


def context_from_args(args: argparse.Namespace) -> Context:
    """A :class:`Context` for the parsed arguments (writes the quick assets if ``--quick``)."""
    if args.quick:
        from revlit.studies.quick import make_quick_assets

        a = make_quick_assets(Path(args.out) / "_quick_assets")
        return Context(
            str(a.classifier),
            str(a.head),
            str(a.bank),
            str(a.data_dir),
            str(a.pgd_root),
            args.out,
            args.docs,
            a.set_prefix,
            True,
            False,
            not args.quiet,
        )
    bank = None if str(args.bank).lower() == "none" else args.bank
    return Context(
        args.classifier,
        args.head,
        bank,
        args.data_dir,
        args.pgd_root,
        args.out,
        args.docs,
        args.set_prefix,
        False,
        args.allow_mismatch,
        not args.quiet,
    )
