"""Shared machinery of the studies: parts, splits, the defended-accuracy loop, statistics, outputs.

The studies measure the reverse-attack defense of Mao et al. ("Adversarial Attacks are Reversible
with Natural Supervision", ICCV 2021) as revlit implements it. Each one runs the framework-free
purifier (:class:`revlit.defenses.ReversePurifier`) directly over the first ``n`` images of the
clean CIFAR-10 test set and of the stored transfer PGD sets (``data/pgd/<classifier>_l_inf`` etc.,
made against the same classifier), with the same per-batch seeding as
:class:`revlit.modules.defense.DefenseModule` (``seed * 2**24 + first test index``), so a study's
row at the default settings is the number ``python -m revlit.evaluate`` reports.

Images are float [0, 1] NCHW throughout. Every study writes, under ``<out>/<study>/``:
``rows.jsonl`` (one JSON object per measured row), ``<study>.json`` (settings, n, seeds, wall time,
findings), ``<study>.md`` (the table the README includes) and ``<study>.png`` (matplotlib Agg,
settings in the caption).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from revlit.defenses import SETTINGS, RandomNoise, ReversePurifier
from revlit.defenses.bank import (
    bank_purifier,
    default_bank_path,
    load_bank,
)
from revlit.defenses.evaluate import defend_batch
from revlit.losses import ContrastiveLoss
from revlit.models.checkpoint import load_classifier
from revlit.seeding import batch_seed, per_image_generators
from revlit.ssl.head import head_training, load_head
from revlit.ssl.views import SimCLRViews

NEGATIVES = ("batch", "bank")
SPLIT_LABELS = {"clean": "clean", "l_inf": "Linf", "l_2": "L2", "l_1": "L1"}


# ------------------------------------------------------------------------------ parts
@dataclass
class Parts:
    """The frozen classifier, its SSL head, and what the head was trained with.

    ``loss``/``temperature``/``view_mode`` come from the head checkpoint's meta (defaults:
    ``nt_xent``, 0.2, ``shared``). ``bank`` is the head's bank of clean negatives, if loaded.
    """

    classifier: nn.Module
    classifier_info: dict
    head: nn.Module
    head_info: dict
    loss: str = "nt_xent"
    temperature: float = 0.2
    view_mode: str = "shared"
    bank: torch.Tensor | None = None
    bank_info: dict | None = None

    def views(self) -> SimCLRViews:
        return SimCLRViews(mode=self.view_mode)

    def with_head(self, head: nn.Module, head_info: dict) -> Parts:
        """The same classifier with another head (its own loss/temperature/views, no bank)."""
        rec = head_training(head_info)
        return Parts(
            self.classifier,
            self.classifier_info,
            head.eval(),
            head_info,
            rec["loss"],
            rec["temperature"],
            rec["view_mode"],
        )


def load_parts(
    classifier: str | os.PathLike | dict,
    head: str | os.PathLike,
    bank: str | os.PathLike | None = "auto",
    allow_mismatch: bool = False,
) -> Parts:
    """Load classifier + head (+ bank) and freeze them.

    Args:
        classifier: any classifier spec of :func:`revlit.models.load_classifier`.
        head: SSL head checkpoint trained on that classifier (refused otherwise).
        bank: bank file, ``"auto"`` (``<head stem>_bank.pt`` if it exists) or ``None``.
        allow_mismatch: accept a head/bank made for another classifier/head.
    """
    net, cinfo = load_classifier(classifier)
    hnet, hinfo = load_head(head, cinfo["sha256"], allow_mismatch=allow_mismatch)
    for p in list(net.parameters()) + list(hnet.parameters()):
        p.requires_grad_(False)
    net = net.to(memory_format=torch.channels_last).eval()
    parts = Parts(net, cinfo, hnet.eval(), hinfo).with_head(hnet, hinfo)
    if bank == "auto":
        bank = default_bank_path(head) if default_bank_path(head).is_file() else None
    if bank is not None:
        parts.bank, parts.bank_info = load_bank(bank, hinfo["sha256"], allow_mismatch)
    return parts


# ------------------------------------------------------------------------------ splits
@dataclass
class Split:
    """A data split: images (N, 3, 32, 32) float [0, 1], labels, CIFAR-10 test indices, meta."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def label(self) -> str:
        return SPLIT_LABELS.get(self.name, self.name)


def load_splits(
    names: Sequence[str],
    n: int,
    classifier_info: dict,
    set_prefix: str | None = None,
    pgd_root: str | os.PathLike = "data/pgd",
    data_dir: str | None = None,
    allow_mismatch: bool = False,
) -> dict[str, Split]:
    """The first ``n`` images of each split, aligned on the same test indices.

    Args:
        names: ``clean`` and/or norms ``l_inf``, ``l_2``, ``l_1`` (stored set
            ``<pgd_root>/<set_prefix>_<norm>``) or stored-set paths.
        n: images per split (the first n of the stored sets; ``clean`` takes the test images at
            the indices of the first stored set loaded, else the first n test images).
        classifier_info: the classifier's info; a set made against another classifier is refused
            unless ``allow_mismatch``.
        set_prefix: stem of the stored sets (default: the classifier checkpoint's file stem).

    Raises:
        ValueError / FileNotFoundError: one line (missing set, wrong classifier, n < 1).
    """
    from revlit.data.cifar import default_data_dir, load_cifar10
    from revlit.data.stored import load_stored_set

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    prefix = set_prefix or Path(classifier_info["path"]).stem
    out: dict[str, Split] = {}
    for name in names:
        if name == "clean":
            continue
        p = Path(name)
        folder = p if p.exists() else Path(pgd_root) / f"{prefix}_{name}"
        st = load_stored_set(folder)
        made_for = st.meta.get("classifier_sha256")
        if made_for not in (None, classifier_info["sha256"]) and not allow_mismatch:
            raise ValueError(
                f"stored set {folder} was made against classifier {made_for[:12]}, not "
                f"{classifier_info['sha256'][:12]}"
            )
        k = min(n, len(st))
        out[name] = Split(name, st.images[:k].float(), st.labels[:k], st.indices[:k], st.meta)
    if "clean" in names:
        x_test, y_test = load_cifar10(data_dir or default_data_dir(), train=False)
        ref = next(iter(out.values()), None)
        idx = ref.idx if ref is not None else torch.arange(min(n, len(y_test)))
        out["clean"] = Split("clean", x_test[idx].float() / 255.0, y_test[idx], idx.clone())
    lengths = {s.name: len(s) for s in out.values()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"splits have different sizes {lengths}; rebuild the sets with one N")
    return {name: out[name] for name in names}


def describe_sets(splits: dict[str, Split]) -> str:
    """``Linf ε=8/255 PGD-10, L2 ε=0.5 PGD-10`` from the stored sets' meta."""
    out = []
    for sp in splits.values():
        if sp.name == "clean":
            continue
        eps, steps = sp.meta.get("eps"), sp.meta.get("steps")
        if isinstance(eps, (int, float)) and sp.meta.get("norm") == "l_inf":
            eps = f"{eps * 255:.3g}/255"
        elif isinstance(eps, (int, float)):
            eps = f"{eps:.3g}"
        out.append(f"{sp.label} ε={eps} PGD-{steps}")
    return ", ".join(out)


# ------------------------------------------------------------------------------ defense
@dataclass
class DefenseConfig:
    """One setting of the defense.

    ``negatives``: ``batch`` (the authors' loss, negatives = the batch's other images, per-batch
    generator) or ``bank`` (fixed bank of clean negatives, per-image generators: batch-independent).
    ``method``: ``reverse`` or ``noise`` (uniform noise of the same budget, the paper's baseline).
    ``loss``: purification loss (default: the loss the head was trained with).
    """

    steps: int = SETTINGS["steps"]
    n_views: int = SETTINGS["n_views"]
    eps: float = SETTINGS["eps"]
    step_size: float = SETTINGS["step_size"]
    batch_size: int = 128
    seed: int = 0
    negatives: str = "batch"
    method: str = "reverse"
    loss: str | None = None
    chunk_size: int = SETTINGS["chunk_size"]

    def __post_init__(self) -> None:
        if self.negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}")
        if self.method not in ("reverse", "noise"):
            raise ValueError(f"method must be reverse or noise, got '{self.method}'")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def passes(self) -> int:
        """Backbone passes per image that buy the repair (K·V input-gradient passes)."""
        return self.steps * self.n_views if self.method == "reverse" else 0

    def as_dict(self) -> dict:
        return asdict(self)


def make_purifier(parts: Parts, cfg: DefenseConfig) -> ReversePurifier:
    """The purifier of ``cfg`` on ``parts`` (bank loss + per-image randomness for ``bank``)."""
    kw = {
        "eps": cfg.eps,
        "step_size": cfg.step_size,
        "steps": cfg.steps,
        "n_views": cfg.n_views,
        "chunk_size": cfg.chunk_size,
    }
    loss = cfg.loss or parts.loss
    if cfg.negatives == "bank":
        if parts.bank is None:
            raise ValueError("negatives='bank' needs a bank (python -m revlit.defenses.bank)")
        return bank_purifier(
            parts.classifier, parts.head, parts.bank, parts.views(), loss, parts.temperature, **kw
        )
    return ReversePurifier(
        parts.classifier, parts.head, ContrastiveLoss(loss, parts.temperature), parts.views(), **kw
    )


def budget_text(eps: float = SETTINGS["eps"], step_size: float = SETTINGS["step_size"]) -> str:
    """``ε_r=16/255, step 2/255`` for captions, from the given (default: the purifier's) values."""
    return f"ε_r={eps * 255:.3g}/255, step {step_size * 255:.3g}/255"


def generators(cfg: DefenseConfig, idx: torch.Tensor, seed: int | None = None):
    """The randomness of one batch: per-image generators (bank) or one per batch (batch)."""
    seed = cfg.seed if seed is None else seed
    if cfg.negatives == "bank":
        return per_image_generators(seed, idx)
    return torch.Generator().manual_seed(batch_seed(seed, int(idx[0])))


@torch.no_grad()
def predict(classifier: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels (N,) of images (N, 3, H, W) in [0, 1]."""
    out = [
        classifier(xb.contiguous(memory_format=torch.channels_last)).argmax(1)
        for xb in x.split(batch_size)
    ]
    return torch.cat(out)


def purify_traced(
    purifier: ReversePurifier, x: torch.Tensor, generator, at_steps: Sequence[int]
) -> dict[int, torch.Tensor]:
    """The iterates after ``t`` steps for every ``t`` in ``at_steps``, from ONE purify call
    (:meth:`ReversePurifier.defend` with ``trace``; needs ``select="last"``)."""
    want = sorted({int(t) for t in at_steps})
    if not want or want[0] < 0 or want[-1] > purifier.steps:
        raise ValueError(f"trace steps must lie in [0, {purifier.steps}], got {want}")
    images, _ = purifier.defend(x, generator, want)
    return {t: images[t] for t in want}


@dataclass
class DefenseResult:
    """Per-image outcome of one defense run over a split."""

    correct: torch.Tensor  # (N,) bool, undefended
    correct_def: dict[int, torch.Tensor]  # steps -> (N,) bool, defended (one key unless traced)
    seconds: float
    images: dict[int, torch.Tensor] | None = None  # steps -> defended images, if asked for

    def accuracy(self, steps: int | None = None) -> float:
        key = max(self.correct_def) if steps is None else steps
        return float(self.correct_def[key].float().mean())


def defend(
    parts: Parts,
    split: Split,
    cfg: DefenseConfig,
    trace: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
    keep_images: bool = False,
) -> DefenseResult:
    """Classify ``split`` without and with the defense ``cfg`` (batches of ``cfg.batch_size``).

    Runs :func:`revlit.defenses.evaluate.defend_batch`, the loop DefenseModule runs (same
    per-batch seeding; the bank gives each image its own generator), without the SSL-loss probe.

    Args:
        trace: also classify the iterates after these step counts (one purify call per batch).
        progress: called with a short status line after every batch.
        keep_images: also return the defended images (memory: N x 12 KB per traced step).
    """
    if cfg.method == "reverse":
        defense = make_purifier(parts, cfg)
    else:
        defense = RandomNoise(eps=cfg.eps)
    hits: dict[int, list[torch.Tensor]] = {}
    kept: dict[int, list[torch.Tensor]] = {}
    plain: list[torch.Tensor] = []
    t0 = time.perf_counter()
    n = len(split)
    for s in range(0, n, cfg.batch_size):
        xb, yb, ib = (t[s : s + cfg.batch_size] for t in (split.x, split.y, split.idx))
        res = defend_batch(parts.classifier, defense, xb, yb, ib, cfg.seed, trace=trace)
        plain.append(res.rows["pred"] == yb)
        for k, pred in res.preds.items():
            hits.setdefault(k, []).append(pred == yb)
            if keep_images:
                kept.setdefault(k, []).append(res.images[k].detach().cpu())
        if progress is not None:
            progress(f"{split.name} {min(s + cfg.batch_size, n)}/{n}")
    seconds = time.perf_counter() - t0
    images = {k: torch.cat(v) for k, v in kept.items()} if keep_images else None
    return DefenseResult(
        torch.cat(plain), {k: torch.cat(v) for k, v in sorted(hits.items())}, seconds, images
    )


@dataclass
class SeedRuns:
    """One defense setting on one split over several purifier seeds."""

    correct: torch.Tensor  # (N,) bool, undefended
    defended: torch.Tensor  # (S, N) bool, one row per seed
    seeds: list[int]
    seconds: float

    def gains(self) -> list[float]:
        """Per seed: defended accuracy minus undefended accuracy (fractions)."""
        und = float(self.correct.double().mean())
        return [float(d.double().mean()) - und for d in self.defended]

    def accuracies(self) -> list[float]:
        return [float(d.double().mean()) for d in self.defended]

    def gain_ci(self, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
        """Mean gain and its 95 % bootstrap interval over images (per-image gain averaged over
        seeds, so the interval covers both the images' sampling and the purifier's randomness)."""
        per_image = self.defended.double().mean(0) - self.correct.double()
        return bootstrap_ci(per_image, n_boot, seed)


def seed_runs(
    parts: Parts,
    split: Split,
    cfg: DefenseConfig,
    seeds: Sequence[int],
    progress: Callable[[str], None] | None = None,
) -> SeedRuns:
    """:func:`defend` once per purifier seed (``cfg.seed`` replaced)."""
    from dataclasses import replace

    runs = []
    for s in seeds:
        if progress is not None:
            progress(f"{split.name} seed {s}")
        runs.append(defend(parts, split, replace(cfg, seed=int(s))))
    key = cfg.steps if cfg.method == "reverse" else 0
    return SeedRuns(
        runs[0].correct,
        torch.stack([r.correct_def[key] for r in runs]),
        [int(s) for s in seeds],
        sum(r.seconds for r in runs),
    )


@torch.no_grad()
def ssl_scores(
    parts: Parts,
    split: Split,
    negatives: str = "batch",
    n_views: int = 4,
    draws: int = 4,
    batch_size: int = 128,
    seed: int = 0,
    loss: str | None = None,
) -> torch.Tensor:
    """Per-image SSL loss of the split's images as given (no purification), mean over ``draws``.

    ``batch``: in-batch negatives (batches of the split itself); ``bank``: the head's bank
    (batch-independent). Seeds: draw d uses seed ``seed * 1000 + d`` per batch / per image.
    """
    # only the purifier's SSL loss is used (no step is taken)
    cfg = DefenseConfig(steps=1, n_views=n_views, batch_size=batch_size, negatives=negatives)
    cfg.loss = loss
    purifier = make_purifier(parts, cfg)
    total = torch.zeros(len(split))
    for d in range(draws):
        parts_d = []
        for s in range(0, len(split), batch_size):
            xb, ib = split.x[s : s + batch_size], split.idx[s : s + batch_size]
            parts_d.append(purifier.ssl_loss(xb, generators(cfg, ib, seed * 1000 + d)))
        total += torch.cat(parts_d)
    return total / draws


# ------------------------------------------------------------------------------ statistics
def bootstrap_ci(
    values: torch.Tensor, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of ``values`` (N,) and its percentile-bootstrap ``level`` interval over the N items."""
    v = values.double().reshape(-1)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(v), (n_boot, len(v)), generator=g)
    means = v[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=v.dtype))
    return float(v.mean()), float(lo), float(hi)


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0


def fmt_ci(mean: float, lo: float, hi: float, scale: float = 100.0, digits: int = 1) -> str:
    """``12.3 [10.1, 14.5]`` (percent by default)."""
    f = f"{{:.{digits}f}}"
    return f"{f.format(mean * scale)} [{f.format(lo * scale)}, {f.format(hi * scale)}]"


# ------------------------------------------------------------------------------ quick mode
def apply_quick(args, quick: dict, add_args: Callable) -> None:
    """Quick mode: replace every option the user left at its default by its ``quick`` value.

    ``n`` is replaced only when not given. Options the user passed explicitly are kept.
    """
    import argparse

    p = argparse.ArgumentParser()
    add_args(p)
    defaults = vars(p.parse_args([]))
    for key, value in quick.items():
        if key == "n":
            if getattr(args, "n", None) is None:
                args.n = value
        elif getattr(args, key, defaults.get(key)) == defaults.get(key):
            setattr(args, key, value)


# ------------------------------------------------------------------------------ outputs
def sha12(info: dict | None) -> str:
    return str((info or {}).get("sha256", ""))[:12]


class StudyOutput:
    """Collects a study's rows and writes rows.jsonl, <name>.json, <name>.md and <name>.png."""

    def __init__(self, out_dir: str | os.PathLike, name: str) -> None:
        self.dir = Path(out_dir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()

    def add(self, **row) -> dict:
        self.rows.append(row)
        return row

    @property
    def state_path(self) -> Path:
        return self.dir / "state.pt"

    def timing(self) -> dict:
        """Wall and CPU seconds since this output was created (the measurement's cost)."""
        return {
            "wall": time.perf_counter() - self.t0,
            "cpu": time.process_time() - self.cpu0,
        }

    def save_state(self, state: dict) -> None:
        """Keep what a study measured (tensors and plain data), so ``--rerender`` can rebuild the
        table, figure and findings without measuring again."""
        torch.save(state, self.state_path)

    def load_state(self) -> dict:
        if not self.state_path.is_file():
            raise FileNotFoundError(
                f"no measured state at {self.state_path}: run the study without --rerender first"
            )
        return torch.load(self.state_path, weights_only=False)

    @property
    def png(self) -> Path:
        return self.dir / f"{self.name}.png"

    def save_figure(self, fig, caption: str) -> Path:
        """Save ``fig`` with ``caption`` (n, seeds, settings) printed under the axes."""
        import textwrap

        lines = textwrap.wrap(caption, int(fig.get_figwidth() * 17))
        fig.text(0.01, 0.005, "\n".join(lines), fontsize=7, va="bottom", ha="left", color="0.25")
        fig.subplots_adjust(bottom=0.12 + 0.028 * len(lines))
        fig.savefig(self.png, dpi=130)
        import matplotlib.pyplot as plt

        plt.close(fig)
        return self.png

    def finish(
        self,
        title: str,
        settings: dict,
        caption: str,
        table: str,
        findings: Sequence[str],
        docs_dir: str | os.PathLike | None = None,
        timing: dict | None = None,
    ) -> dict:
        """Write every output; copy the PNG and the markdown to ``docs_dir`` if given.

        ``timing``: the measurement's ``{"wall", "cpu"}`` seconds (default: since creation).
        """
        t = timing or self.timing()
        wall, cpu = t["wall"], t["cpu"]  # cpu: all threads of this process
        with open(self.dir / "rows.jsonl", "w") as f:
            for r in self.rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        summary = {
            "study": self.name,
            "title": title,
            "settings": settings,
            "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1),
            "findings": list(findings),
            "rows": len(self.rows),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            from revlit.io import git_commit

            summary["commit"] = git_commit()
        except Exception:  # pragma: no cover - no git
            summary["commit"] = None
        (self.dir / f"{self.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
        md = [
            f"### {title}",
            "",
            f"{caption} Wall time {wall / 60:.1f} min ({cpu / 60:.1f} CPU-min on a shared "
            "2-core machine).",
            "",
            table.rstrip(),
            "",
        ]
        if findings:
            md += ["**What it says.**", ""] + [f"- {s}" for s in findings] + [""]
        md += [f"![{title}]({self.name}.png)", ""]
        (self.dir / f"{self.name}.md").write_text("\n".join(md))
        if docs_dir is not None:
            d = Path(docs_dir)
            d.mkdir(parents=True, exist_ok=True)
            for suffix in (".md", ".png"):
                src = self.dir / f"{self.name}{suffix}"
                if src.exists():
                    shutil.copyfile(src, d / src.name)
        summary["dir"] = str(self.dir)
        return summary


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def figure(ncols: int = 1, width: float = 5.2, height: float = 4.2):
    """A matplotlib (Agg) figure with ``ncols`` axes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def bank_loss_name(parts: Parts) -> str:
    """What the bank rows are contrasted with (for captions)."""
    if parts.bank is None:
        return "no bank"
    return f"bank M={parts.bank.shape[0]} ({sha12(parts.bank_info)})"


__all__ = [
    "DefenseConfig",
    "DefenseResult",
    "Parts",
    "Split",
    "StudyOutput",
    "apply_quick",
    "batch_seed",
    "bootstrap_ci",
    "budget_text",
    "defend",
    "describe_sets",
    "figure",
    "fmt_ci",
    "load_parts",
    "load_splits",
    "make_purifier",
    "markdown_table",
    "mean_std",
    "predict",
    "purify_traced",
    "seed_runs",
    "ssl_scores",
]


def run_measured(
    args, ctx, name: str, quick: dict, add_args: Callable, measure: Callable, report: Callable
) -> dict:
    """A study's ``run``: measure (or, with ``--rerender``, reload) its state, save it, report.

    ``measure(args, ctx, out) -> state`` does the expensive part; ``report(state, out, ctx)``
    writes the table, figure and findings from the state alone.
    """
    if ctx.quick:
        apply_quick(args, quick, add_args)
    out = StudyOutput(ctx.out, name)
    if args.rerender:
        return report(out.load_state(), out, ctx)
    state = measure(args, ctx, out)
    out.save_state(state)
    return report(state, out, ctx)


def splits_info(splits: dict, names, classifier_sha256: str, quick: bool) -> dict:
    """The ``info`` block of a study's state: n, split labels, set description, classifier."""
    return {
        "n": len(splits["clean"]),
        "labels": {nm: splits[nm].label for nm in names},
        "sets": describe_sets(splits),
        "classifier_sha256": classifier_sha256,
        "quick": quick,
    }
