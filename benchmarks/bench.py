"""``make bench``: the purifier and PGD against the hardware bound (one process, interleaved).

The unit of work of the reverse attack (Mao et al., ICCV 2021) is one backbone forward +
backward-to-input pass per view: K steps × V views per image (160 at the authors' 40 × 4). So the
purifier can never beat ``bound / (K·V)`` images/s, where ``bound`` is the backbone's own
forward + backward-to-input throughput at its best batch size (parameters frozen, channels_last).
This module measures that bound, the purifier at two settings, the plain reference loop of
:mod:`revlit.defenses.reference` at the same settings (the "before" rows), PGD-10 generation, the
peak resident memory of each (every variant once more in a fresh child process, ``VmHWM``),
(``--ddp``) the defended ``predict`` with 1 process vs 2 DDP processes, and (``--bf16``) the bound,
the purifier and PGD-10 once more under bfloat16 autocast, with every row's fraction against both
bounds.

Usage, from the repository root::

    python -m benchmarks [--model resnet20] [--reps 3] [--out results/bench/bench.json]
                         [--no-reference] [--no-memory] [--ddp] [--bf16]

Variants are interleaved across repetitions (timings on a shared machine drift between minutes);
min and median over repetitions are reported; every workload also runs between two windows of
the bound at its best batch size, and its "bracketed" fraction compares it with the bound of the
same minutes. A bound repetition repeats its single pass until it has done as much work
(images × passes) as the smallest workload, so the bound and the workloads are averaged over
windows of about the same length (the fastest single pass is kept in the record as
``bound_single_call_images_per_s``, with every row's fraction against it). How to read the
estimators: ``docs/speed.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from revlit.attacks.norms import Norm
from revlit.attacks.pgd import pgd
from revlit.defenses.reference import reference_purify
from revlit.defenses.reverse import RELU_FLOAT_MB, ReversePurifier
from revlit.io import git_commit
from revlit.losses import ContrastiveLoss
from revlit.models.fold import fold_batchnorm
from revlit.models.lean import MaskArena, lean_input_grad
from revlit.models.precision import autocast_to, bf16_supported
from revlit.models.registry import build
from revlit.ssl.head import SSLHead
from revlit.ssl.views import SimCLRViews

#: the default purifier's float ReLU budget, in bytes (the "bound lean" rows run the same path)
LEAN_RELU_FLOAT_BYTES = int(RELU_FLOAT_MB * 2**20)
#: the repository root: the memory children run ``python -m benchmarks`` from there
ROOT = Path(__file__).resolve().parents[1]


def precision(bf16: bool, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The backbone work's precision: bfloat16 autocast on ``device``, or float32 (autocast off)."""
    return autocast_to(torch.bfloat16 if bf16 else torch.float32, device)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from ``/proc/stat`` (Linux), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(t) for t in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(t0: tuple[int, int] | None, t1: tuple[int, int] | None) -> float | None:
    """Share of the CPUs' time between two :func:`cpu_ticks` the hypervisor gave to others."""
    if t0 is None or t1 is None or t1[1] <= t0[1]:
        return None
    return (t1[0] - t0[0]) / (t1[1] - t0[1])


def bracketed_fractions(
    seconds: list[float], brackets: list[tuple[float, float]], work: int, bracket_work: int
) -> list[float]:
    """Per repetition: a workload's throughput over that of the bound windows run around it.

    Args:
        seconds: the workload's seconds per repetition.
        brackets: per repetition, the seconds of the bound window run just before and just
            after it (the same pass at the best batch size, ``bracket_work`` image-passes each).
        work: image-passes of one repetition of the workload (images × K·V).

    Returns:
        ``(work / t) / (2·bracket_work / (t_before + t_after))`` per repetition: the fraction
        of the bound, with the bound measured at the same minutes as the workload, so a drift
        of the machine that is linear over the bracket cancels.
    """
    return [
        (work / t) / (2 * bracket_work / (before + after))
        for t, (before, after) in zip(seconds, brackets)
    ]


class PeakRSS:
    """Context manager sampling the resident set size every ``interval`` seconds; ``.peak``.

    A thread that wakes often preempts torch's worker threads and slows a loop of many small ops
    (the purifier) more than the bound's few big kernels, so the default interval is long
    (``docs/speed.md``). The memory figures come from the fresh children's ``VmHWM``; this
    in-process peak is a diagnostic.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)  # returns at once when stopped

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def input_grad_pass(
    model: nn.Module,
    x: torch.Tensor,
    lean: bool = False,
    arena: MaskArena | None = None,
    bf16: bool = False,
) -> torch.Tensor:
    """One backbone forward + backward to the input (the unit of work of PGD and the purifier).

    ``lean``: the forward runs under :func:`revlit.models.lean.lean_input_grad` (same gradient)
    as the default purifier runs it: float ReLU outputs up to ``ReversePurifier``'s default
    ``relu_float_mb``, masks beyond, from ``arena`` (reset here; default a fresh one).
    ``bf16``: the forward runs under bfloat16 autocast (the backward follows its dtypes).
    """
    xr = x.detach().requires_grad_(True)
    if lean and arena is not None:
        arena.reset()
    ctx = lean_input_grad(arena, LEAN_RELU_FLOAT_BYTES) if lean else contextlib.nullcontext()
    with ctx, precision(bf16, x.device):
        f = model.features(xr)
    (g,) = torch.autograd.grad(f.float().square().sum(), xr)
    return g


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(memory_format=torch.channels_last)


def _images(n: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last)


class Variant:
    """A named workload: ``fn()`` processes ``images`` images; timed per repetition.

    A repetition calls ``fn`` ``repeat`` times back to back (the bound's single passes are
    repeated so that a repetition lasts about as long as a purifier run: see
    :func:`run_bench`); ``times`` holds the repetitions' totals, ``call_times`` every call.
    """

    def __init__(self, name: str, fn: Callable[[], object], images: int, passes: int) -> None:
        self.name, self.fn, self.images, self.passes = name, fn, images, passes
        self.repeat = 1
        self.times: list[float] = []
        self.call_times: list[float] = []
        self.cpu_times: list[float] = []
        self.steal: list[float | None] = []
        #: per repetition: the seconds of the bracketing bound windows (before, after)
        self.brackets: list[tuple[float, float]] = []
        #: the same for the bfloat16 bound's windows (``--bf16`` only)
        self.brackets_bf16: list[tuple[float, float]] = []
        self.peak_rss = 0

    def run_once(self) -> None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        stat0, cpu0 = cpu_ticks(), time.process_time()
        with PeakRSS() as mem:
            total = 0.0
            for _ in range(self.repeat):
                t0 = time.perf_counter()
                self.fn()
                if cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.call_times.append(dt)
                total += dt
            self.times.append(total)
        self.cpu_times.append(time.process_time() - cpu0)
        self.steal.append(steal_share(stat0, cpu_ticks()))
        self.peak_rss = max(self.peak_rss, mem.peak)
        if cuda:
            self.peak_gpu = max(getattr(self, "peak_gpu", 0), torch.cuda.max_memory_allocated())

    def summary(self) -> dict:
        best, med = min(self.times), statistics.median(self.times)
        images = self.images * self.repeat  # per repetition
        return (
            {
                "name": self.name,
                "images": self.images,
                "calls_per_rep": self.repeat,
                "images_per_s_single_call_max": round(self.images / min(self.call_times), 2),
                "passes_per_image": self.passes,
                "seconds_min": round(best, 4),
                "seconds_median": round(med, 4),
                "images_per_s_max": round(images / best, 2),
                "images_per_s_median": round(images / med, 2),
                "peak_rss_mb": round(self.peak_rss / 2**20, 1),
                "reps": len(self.times),
                "seconds_per_rep": [round(t, 4) for t in self.times],
                "cpu_seconds_per_rep": [round(t, 4) for t in self.cpu_times],
                "steal_share_per_rep": [None if f is None else round(f, 4) for f in self.steal],
            }
            | (
                {"bracket_seconds_per_rep": [[round(a, 4), round(b, 4)] for a, b in self.brackets]}
                if self.brackets
                else {}
            )
            | (
                {
                    "bf16_bracket_seconds_per_rep": [
                        [round(a, 4), round(b, 4)] for a, b in self.brackets_bf16
                    ]
                }
                if self.brackets_bf16
                else {}
            )
            | (
                {"peak_gpu_mb": round(self.peak_gpu / 2**20, 1)}
                if hasattr(self, "peak_gpu")
                else {}
            )
        )


#: the purifier settings of the bench: (K, V, B, options); options is "" (the default path: lean
#: input gradients, :mod:`revlit.models.lean`, with float ReLU outputs up to ``relu_float_mb``),
#: "plain" (autograd's own bookkeeping, no lean path), "masks" (lean with ReLU masks only,
#: ``relu_float_mb=0``), "recompute" (memory bounded by the chunk), "fold_bn" (BatchNorm folded),
#: "bf16" (bfloat16 autocast), or several joined by "+"
PURIFIER_SETTINGS = (
    (40, 4, 512, "plain"),
    (40, 4, 512, ""),
    (10, 2, 256, "plain"),
    (10, 2, 256, "masks"),
    (10, 2, 256, ""),
)
#: ``--bf16`` adds the default purifier at both settings under bfloat16 autocast
BF16_SETTINGS = ((40, 4, 512, "bf16"), (10, 2, 256, "bf16"))
#: ``--variants all`` adds the opt-in memory/speed options
EXTRA_SETTINGS = (
    (40, 4, 512, "masks"),
    (40, 4, 512, "recompute"),
    (40, 4, 512, "fold_bn"),
    (40, 4, 512, "fold_bn+recompute"),
    (10, 2, 256, "recompute"),
)


def _setting(p) -> tuple[int, int, int, str]:
    k, v, b, *rest = p
    return int(k), int(v), int(b), (rest[0] if rest else "")


def purifier_name(k: int, v: int, b: int, opts: str = "") -> str:
    return f"purifier K={k} V={v} B={b}" + (f" {opts}" if opts else "")


def build_variants(
    model: nn.Module,
    batches: list[int],
    purifier_settings: list,
    pgd_batch: int,
    reference: bool = True,
    steps_cap: int | None = None,
    bf16: bool = False,
) -> tuple[list[Variant], list[Variant], list[Variant]]:
    """The bound variants (one per batch size), the purifier variants and the PGD variant(s).

    With ``reference``, each (K, V, B) also gets a "reference" variant: the plain loop of
    :func:`revlit.defenses.reference.reference_purify` on an unfrozen, contiguous (NCHW) copy of
    the model and head, i.e. the purifier before the speed work, on the same images and seed.
    If a setting folds BatchNorm, "bound folded@B" variants measure the folded backbone's own
    bound. ``steps_cap`` limits K (memory children: a step's memory does not grow with K).
    ``bf16``: also "bound bf16@B" (the bound's pass under bfloat16 autocast) and PGD-10 under
    bfloat16 autocast; a purifier setting with the "bf16" option runs the purifier's own
    ``precision="bf16"`` (:mod:`revlit.models.precision`), the others ``precision="32"``.
    """
    settings = [_setting(p) for p in purifier_settings]
    dev = next(model.parameters()).device
    bound = []
    for b in batches:
        x = _images(b, device=dev)
        bound.append(Variant(f"bound@{b}", lambda x=x: input_grad_pass(model, x), b, 1))
    if bf16:
        for b in batches:
            x = _images(b, device=dev)
            bound.append(
                Variant(f"bound bf16@{b}", lambda x=x: input_grad_pass(model, x, bf16=True), b, 1)
            )
    arena = MaskArena(reuse=True)  # as the purifier's: its blocks are handed out again
    for b in batches:
        x = _images(b, device=dev)
        bound.append(
            Variant(f"bound lean@{b}", lambda x=x: input_grad_pass(model, x, True, arena), b, 1)
        )
    if any("fold_bn" in o for *_, o in settings):
        folded = fold_batchnorm(model)[0].to(memory_format=torch.channels_last)
        for b in batches:
            if b <= 1024:
                x = _images(b, device=dev)
                bound.append(
                    Variant(f"bound folded@{b}", lambda x=x: input_grad_pass(folded, x), b, 1)
                )
    head = SSLHead(model.feature_dim).to(dev).eval()
    loss = ContrastiveLoss("nt_xent", 0.2)
    plain_model = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
    plain_head = copy.deepcopy(head).eval()
    for p in list(plain_model.parameters()) + list(plain_head.parameters()):
        p.requires_grad_(True)
    purifiers = []
    seen_ref = set()
    for k, v, b, opts in settings:
        ks = min(k, steps_cap) if steps_cap else k
        pur = ReversePurifier(
            model, head, loss, SimCLRViews(), steps=ks, n_views=v,
            fold_bn="fold_bn" in opts, recompute="recompute" in opts, lean="plain" not in opts,
            precision="bf16" if "bf16" in opts else "32",
            **({"relu_float_mb": 0} if "masks" in opts else {}),
        )  # fmt: skip
        x = _images(b, 1, dev)

        def run(pur=pur, x=x):
            return pur.purify(x, torch.Generator().manual_seed(0))

        if reference and (k, v, b) not in seen_ref and "bf16" not in opts:
            seen_ref.add((k, v, b))
            xc = x.contiguous()

            def run_ref(ks=ks, v=v, xc=xc):
                return reference_purify(
                    plain_model, plain_head, loss, SimCLRViews(), xc, steps=ks, n_views=v,
                    generator=torch.Generator().manual_seed(0),
                )  # fmt: skip

            purifiers.append(Variant(f"reference K={k} V={v} B={b}", run_ref, b, k * v))
        purifiers.append(Variant(purifier_name(k, v, b, opts), run, b, k * v))
    x = _images(pgd_batch, 2, dev)
    y = torch.randint(0, 10, (pgd_batch,), generator=torch.Generator().manual_seed(0)).to(dev)
    attacks = []
    for half in (False, True) if bf16 else (False,):

        def run_pgd(half=half):
            with precision(half, dev):
                return pgd(model, x, y, Norm.LINF, 8 / 255, 2 / 255, 10)

        name = f"PGD-10 Linf B={pgd_batch}" + (" bf16" if half else "")
        attacks.append(Variant(name, run_pgd, pgd_batch, 10))
    return bound, purifiers, attacks


def run_bench(
    model_name: str = "resnet20",
    reps: int = 3,
    batches: tuple[int, ...] = (128, 256, 512, 1024, 2048),
    purifier_settings: tuple = PURIFIER_SETTINGS,
    pgd_batch: int = 512,
    reference: bool = True,
    memory: bool = True,
    ddp: bool = False,
    ddp_n: int = 128,
    device: str = "cpu",
    bf16: bool = False,
) -> dict:
    """Measure everything in one process, variants interleaved; return the JSON record.

    ``device``: where the model and the images live (``cpu``, ``cuda``). On a GPU, timings
    synchronise the device, each row also records ``peak_gpu_mb`` (``max_memory_allocated``), and
    the memory children (CPU resident memory) are skipped.

    The reference (plain-loop) variants run in the first repetition only (they are slow).
    ``memory``: afterwards, run every non-reference variant once more alone in a fresh child
    process and record its peak resident memory (``VmHWM``: the whole process, Python and torch
    included) as ``peak_rss_mb``; purifier children take 2 steps (a step's memory does not grow
    with K). The in-process sampler's figure (which only grows, since the allocator keeps what
    earlier variants used) is kept as ``peak_rss_mb_in_process``.
    ``ddp``: also time the defended ``predict`` (shipped classifier and head, CIFAR-10 test images,
    the authors' 40 × 4) with 1 process and with 2 DDP processes.
    ``bf16``: also the bound under bfloat16 autocast ("bound bf16@B") and PGD-10 under it (give
    the purifier settings with the "bf16" option as well); every workload then also runs between
    two windows of the bf16 bound, and every row gets its fractions against the bf16 bound
    (``fraction_of_bf16_bound``...) beside those against the FP32 one.
    """
    torch.manual_seed(0)
    model = _frozen(build(model_name)).to(device)
    memory = memory and torch.device(device).type == "cpu"
    bound, purifiers, attacks = build_variants(
        model, list(batches), list(purifier_settings), pgd_batch, reference, bf16=bf16
    )
    variants = bound + purifiers + attacks
    for v in variants:  # warm-up: allocator, kernels
        v.fn() if v.passes == 1 else None
    # A bound repetition repeats its single pass until it has done the work of the smallest
    # timed workload (images x passes per image: the cheap purifier's or PGD-10's), so bound and
    # workloads are timed over windows of about the same length: the best of a few half-second
    # passes on a shared machine is a lucky moment, not a throughput.
    work = min(v.images * v.passes for v in purifiers + attacks)
    for v in bound:
        v.repeat = max(1, -(-work // v.images))
    # Each workload runs between two windows of the bound at its best batch size (chosen from the
    # first repetition's sweep), so every repetition also gets a fraction against a bound timed
    # at the same minutes (the machine's speed drifts by 10-30 % between minutes).
    brackets: list[Variant] = []  # the FP32 bound's windows, then (bf16) the bf16 bound's

    def bracket_of(prefix: str, name: str) -> Variant:
        sweep = [v for v in bound if v.name.startswith(prefix)]
        top = max(sweep, key=lambda v: v.images * v.repeat / v.times[0])
        w = Variant(f"{name}@{top.images}", top.fn, top.images, 1)
        w.repeat = top.repeat
        return w

    for rep in range(reps):
        for v in bound:
            v.run_once()
        if not brackets:
            brackets.append(bracket_of("bound@", "bound bracket"))
            if bf16:
                brackets.append(bracket_of("bound bf16@", "bound bf16 bracket"))
            for w in brackets:
                w.run_once()
        for v in purifiers + attacks:
            if rep == 0 or not v.name.startswith("reference"):
                v.run_once()  # the slow reference loop runs once (its "before" figure)
                for w, into in zip(brackets, (v.brackets, v.brackets_bf16)):
                    w.run_once()
                    into.append((w.times[-2], w.times[-1]))
    variants = bound + brackets + purifiers + attacks
    rows = [v.summary() for v in variants]
    bracket_work = [w.images * w.repeat for w in brackets]
    for r in rows:
        r["peak_rss_mb_in_process"] = r.pop("peak_rss_mb")
        if memory and not r["name"].startswith(
            ("reference", "bound bracket", "bound bf16 bracket")
        ):
            r["peak_rss_mb"], r["baseline_rss_mb"] = child_peak_rss_mb(
                model_name, r["name"], list(batches), list(purifier_settings), pgd_batch,
                with_baseline=True, bf16=bf16,
            )  # fmt: skip

    def best(prefix: str) -> dict | None:  # the fastest bound row of one backbone variant
        found = [r for r in rows if r["name"].startswith(prefix)]
        return max(found, key=lambda r: r["images_per_s_max"]) if found else None

    best_bound, best_lean, best_folded = best("bound@"), best("bound lean@"), best("bound folded@")
    best_bf16 = best("bound bf16@")
    plain_rows = [r for r in rows if r["name"].startswith("bound@")]
    # a second estimator, kept for comparison: the fastest single pass of any batch size
    single_bound = max(r["images_per_s_single_call_max"] for r in plain_rows)
    # per repetition: the best plain bound window's img/s (for the paired fractions)
    sizes = [r["images"] * r["calls_per_rep"] for r in plain_rows]
    bound_per_rep = [
        max(n / t for n, t in zip(sizes, per_rep))
        for per_rep in zip(*(r["seconds_per_rep"] for r in plain_rows))
    ]
    for r in rows:
        if r["name"].startswith("bound"):
            continue
        # a variant is measured against the bound of the backbone it runs (folded or not)
        ref = best_folded if ("fold_bn" in r["name"] and best_folded) else best_bound
        ceiling = ref["images_per_s_max"] / r["passes_per_image"]
        r["bound_images_per_s"] = round(ceiling, 2)
        r["bound_of"] = ref["name"]
        r["fraction_of_bound"] = round(r["images_per_s_max"] / ceiling, 3)
        r["fraction_of_bound_median"] = round(r["images_per_s_median"] / ceiling, 3)
        # paired: each repetition against the best plain bound window of the same repetition
        # (measured minutes apart at most), then the median: robust to a machine whose speed
        # drifts between repetitions, where a best-of-3 against a best-of-15 is not
        paired = [
            (r["images"] / t) / (b / r["passes_per_image"])
            for t, b in zip(r["seconds_per_rep"], bound_per_rep)
        ]
        r["fraction_of_bound_paired_median"] = round(statistics.median(paired), 3)
        bracketed = bracketed_fractions(
            r["seconds_per_rep"], r["bracket_seconds_per_rep"],
            r["images"] * r["passes_per_image"], bracket_work[0],
        )  # fmt: skip
        r["fraction_of_bound_bracketed_per_rep"] = [round(f, 3) for f in bracketed]
        r["fraction_of_bound_bracketed_median"] = round(statistics.median(bracketed), 3)
        if best_bf16:  # the same fractions against the bfloat16 bound
            ceiling16 = best_bf16["images_per_s_max"] / r["passes_per_image"]
            r["fraction_of_bf16_bound"] = round(r["images_per_s_max"] / ceiling16, 3)
            r["fraction_of_bf16_bound_median"] = round(r["images_per_s_median"] / ceiling16, 3)
            bracketed16 = bracketed_fractions(
                r["seconds_per_rep"], r["bf16_bracket_seconds_per_rep"],
                r["images"] * r["passes_per_image"], bracket_work[1],
            )  # fmt: skip
            r["fraction_of_bf16_bound_bracketed_per_rep"] = [round(f, 3) for f in bracketed16]
            r["fraction_of_bf16_bound_bracketed_median"] = round(statistics.median(bracketed16), 3)
        single = single_bound / r["passes_per_image"]
        r["fraction_of_single_call_bound"] = round(r["images_per_s_max"] / single, 3)
        plain = best_bound["images_per_s_max"] / r["passes_per_image"]
        r["fraction_of_plain_bound"] = round(r["images_per_s_max"] / plain, 3)
        lean_row = "plain" not in r["name"] and "fold_bn" not in r["name"]
        if best_lean and r["name"].startswith("purifier") and lean_row:
            lean_ceiling = best_lean["images_per_s_max"] / r["passes_per_image"]
            r["fraction_of_lean_bound"] = round(r["images_per_s_max"] / lean_ceiling, 3)
    return {
        "kind": "revlit-bench/1",
        "model": model_name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else device,
        "malloc_env": {
            k: os.environ.get(k)
            for k in (
                "MALLOC_MMAP_THRESHOLD_",
                "MALLOC_TRIM_THRESHOLD_",
                "MALLOC_TOP_PAD_",
                "LD_PRELOAD",
                "MIMALLOC_PURGE_DELAY",
                "MIMALLOC_ALLOW_LARGE_OS_PAGES",
            )
        },  # fmt: skip
        "bound_images_per_s": best_bound["images_per_s_max"],
        "bound_batch": best_bound["images"],
        "bound_window_image_passes": work,
        "bracket": brackets[0].name,
        "bound_single_call_images_per_s": single_bound,
        "bound_folded_images_per_s": best_folded["images_per_s_max"] if best_folded else None,
        "bound_lean_images_per_s": best_lean["images_per_s_max"] if best_lean else None,
        "bf16": {
            "hardware": bf16_supported(device),
            "bound_images_per_s": best_bf16["images_per_s_max"],
            "bound_batch": best_bf16["images"],
            "bracket": brackets[1].name,
        }
        if best_bf16
        else None,
        "rows": rows,
        "ddp": ddp_predict(ddp_n) if ddp else None,
    }


def child_peak_rss_mb(
    model_name: str,
    name: str,
    batches: list[int],
    purifier_settings: list,
    pgd_batch: int,
    with_baseline: bool = False,
    bf16: bool = False,
) -> float | tuple[float, float]:
    """Peak RSS (MB) of a fresh process that builds the bench and runs only variant ``name`` once.

    With ``with_baseline``, also the child's peak before the variant ran (interpreter, torch,
    model and inputs): ``(peak, baseline)``.
    """
    spec = json.dumps(
        {"model": model_name, "name": name, "batches": batches,
         "purifier_settings": purifier_settings, "pgd_batch": pgd_batch, "bf16": bf16}
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--_child", spec],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    peak, base = (round(float(t), 1) for t in out.stdout.strip().splitlines()[-1].split())
    return (peak, base) if with_baseline else peak


def _child(spec: str) -> None:
    """Child of :func:`child_peak_rss_mb`: run one variant once, print peak and baseline in MB."""
    s = json.loads(spec)
    torch.manual_seed(0)
    model = _frozen(build(s["model"]))
    bound, purifiers, attacks = build_variants(
        model, s["batches"], s["purifier_settings"], s["pgd_batch"],
        reference=s["name"].startswith("reference"), steps_cap=2, bf16=s["bf16"],
    )  # fmt: skip
    (v,) = [v for v in bound + purifiers + attacks if v.name == s["name"]]
    base = vm_hwm_mb()
    v.fn()
    print(vm_hwm_mb(), base)


def vm_hwm_mb() -> float:
    """Peak resident memory of this process (``VmHWM``, Linux), in MB.

    Unlike ``ru_maxrss``, which a child inherits from the parent it was forked from, the
    high-water mark belongs to the process's own address space, so it starts afresh at exec.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ddp_problem() -> str | None:
    """Why the DDP comparison cannot run from here, in one line, or None if it can.

    It needs what ``python -m revlit.evaluate`` will read with its default arguments: the
    CIFAR-10 test set (``$REVLIT_DATA_DIR``, else ``data/``; the Makefile sets it) and the shipped
    checkpoints. ``main`` asks before the timing starts, so a missing file costs seconds, not a
    whole bench.
    """
    from revlit.data.cifar import default_data_dir, find_batches
    from revlit.evaluate import build_parser

    args = build_parser().parse_args([])  # the child's defaults, not a copy of them
    data = args.data_dir or default_data_dir()
    if find_batches(data) is None:
        return (
            f"--ddp needs CIFAR-10 in '{Path(data).resolve()}' ($REVLIT_DATA_DIR, else data/; "
            "`make bench` sets it)"
        )
    for path in (args.classifier, args.head):
        if not Path(path).is_file():
            return f"--ddp needs the shipped checkpoint {path} (run from the repository root)"
    return None


def _child_error(e: subprocess.CalledProcessError) -> str:
    lines = [ln for ln in (e.stderr or "").splitlines() if ln.strip()]
    return f"exit {e.returncode}: {lines[-1].strip() if lines else 'no message'}"


def ddp_predict(n: int = 128, batch: int = 64) -> dict:
    """Defended predict (``python -m revlit.evaluate``, shipped models) with 1 vs 2 DDP processes.

    Each run purifies the first ``n`` clean test images at the authors' setting (40 steps × 4
    views) with per-process batches of ``batch``; images/s come from the run's own record (images
    over the predict loop's wall time) and the process wall time (start-up and spawn included).
    If a run fails, the result holds ``error`` (the run's exit status and last stderr line)
    instead of raising: the caller keeps the rows it has already timed.
    """
    out: dict = {"n": n, "batch_per_process": batch, "steps": 40, "views": 4}
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable, "-m", "revlit.evaluate", "--n", str(n), "--batch-size", str(batch),
                "--sets", "clean", "--defenses", "reverse", "--out", tmp, "--log-dir", tmp,
                "--devices", str(devices), "--strategy", strategy,
            ]  # fmt: skip
            t0 = time.perf_counter()
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
            except subprocess.CalledProcessError as e:
                out["error"] = f"{devices} process(es), {strategy}: {_child_error(e)}"
                return out
            wall = time.perf_counter() - t0
            recs = [json.loads(line) for line in open(Path(tmp) / "records.jsonl")]
            rec = next(r for r in recs if r["defense"]["method"] == "reverse")
            out[f"processes_{devices}"] = {
                "strategy": strategy,
                "images_per_s": round(1 / rec["wall_seconds_per_image"], 2),
                "process_wall_s": round(wall, 1),
                "accuracy": rec["accuracy"],
            }
    out["speedup"] = round(
        out["processes_2"]["images_per_s"] / out["processes_1"]["images_per_s"], 2
    )
    out["note"] = (
        "both processes share the same CPU cores here: DDP exercises the multi-rank path, "
        "it is not expected to speed anything up on this machine"
    )
    return out


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(rec: dict) -> str:
    """Markdown table of a bench record."""
    lines = [
        f"bench: {rec['model']} · {rec['processor']} · torch {rec['torch']} · {rec['threads']} threads · "
        f"{rec['date']} · commit {rec['commit']}",
        "",
        "| variant | passes/img | img/s (best) | img/s (median) | bound÷passes | fraction of bound (best / median / paired median) | bracketed: median (per rep) | of the plain bound | of the lean bound | peak memory (MB) | before the variant (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rec["rows"]:
        frac = (
            f"{r['fraction_of_bound']:.3f} / {r['fraction_of_bound_median']:.3f}"
            + (
                f" / {r['fraction_of_bound_paired_median']:.3f}"
                if "fraction_of_bound_paired_median" in r
                else ""
            )
            if "fraction_of_bound" in r
            else ""
        )
        brk = (
            f"{r['fraction_of_bound_bracketed_median']:.3f} ("
            + ", ".join(f"{f:.3f}" for f in r["fraction_of_bound_bracketed_per_rep"])
            + ")"
            if "fraction_of_bound_bracketed_median" in r
            else ""
        )
        mem = r.get("peak_gpu_mb", r.get("peak_rss_mb", r.get("peak_rss_mb_in_process")))
        lines.append(
            f"| {r['name']} | {r['passes_per_image']} | {r['images_per_s_max']:.1f} | "
            f"{r['images_per_s_median']:.1f} | {r.get('bound_images_per_s', '')} | "
            f"{frac} | {brk} | {r.get('fraction_of_plain_bound', '')} | "
            f"{r.get('fraction_of_lean_bound', '')} | {mem:.0f} | {r.get('baseline_rss_mb', '')} |"
        )
    lines.append("")
    lines.append(
        "bound = the best bound@B (forward + backward to the input, frozen parameters, "
        "channels_last); paired median = the median over repetitions of the variant's img/s "
        "against the best bound@B window of the same repetition; bracketed = each repetition of the variant against the mean of the two windows of the bound at its best batch (the 'bound bracket' row) run just before and just after it, then the median (bracketing cancels the machine's drift between minutes, and no best-of-many bound window is picked); fold_bn rows are measured against the folded backbone's own best bound "
        "(bound folded@B) and, in the next column, against the plain one; lean purifier rows "
        "(no option: the default) are measured against the plain bound, and also against the "
        "lean backbone's own (bound lean@B); 'plain' rows are the purifier without the lean "
        "input gradients; 'reference' rows are the plain loop (revlit.defenses.reference) "
        "before any speed work; peak RSS = VmHWM of the whole process, each variant alone in a "
        "fresh child (purifiers: 2 steps; a step's memory does not grow with K), and the "
        "child's VmHWM before the variant ran (interpreter, torch, model, inputs); on a GPU, "
        "peak memory is torch.cuda.max_memory_allocated of the variant's run."
    )
    if rec.get("bound_single_call_images_per_s"):
        fr = ", ".join(
            f"{r['name']} {r['fraction_of_single_call_bound']:.3f}"
            for r in rec["rows"]
            if "fraction_of_single_call_bound" in r
        )
        lines.append(
            f"bound repetitions: each repeats its pass until {rec['bound_window_image_passes']} "
            "image-passes (the smallest workload's), so bound and workloads are timed over "
            "windows of about the same length; the fastest single pass, a second estimator, "
            f"gives {rec['bound_single_call_images_per_s']:.1f} img/s, and "
            f"against it: {fr}."
        )
    steal = [
        (r["name"], max(f for f in r["steal_share_per_rep"] if f is not None))
        for r in rec["rows"]
        if any(f is not None for f in r.get("steal_share_per_rep", []))
    ]
    if steal:
        worst = max(steal, key=lambda t: t[1])
        lines.append(
            "CPU time stolen by the hypervisor (/proc/stat), largest share over the repetitions "
            f"of any row: {worst[1]:.1%} ({worst[0]}); per row and repetition in the JSON."
        )
    env = rec.get("malloc_env") or {}
    lines.append(f"allocator environment: {env}")
    if rec.get("bf16"):
        b16 = rec["bf16"]
        lines += [
            "",
            f"FP32 against bfloat16 autocast: FP32 bound {rec['bound_images_per_s']} img/s "
            f"(@{rec['bound_batch']}), bf16 bound {b16['bound_images_per_s']} img/s "
            f"(@{b16['bound_batch']}); native bf16 arithmetic on this device: "
            f"{'yes' if b16['hardware'] else 'no'}.",
            "",
            "| variant | img/s (best / median) | of the FP32 bound: best / median / bracketed median | of the bf16 bound: best / median / bracketed median |",
            "|---|---:|---:|---:|",
        ]  # fmt: skip
        for r in rec["rows"]:
            if "fraction_of_bf16_bound" not in r or r["name"].startswith("reference"):
                continue
            lines.append(
                f"| {r['name']} | {r['images_per_s_max']:.1f} / {r['images_per_s_median']:.1f} | "
                f"{r['fraction_of_bound']:.3f} / {r['fraction_of_bound_median']:.3f} / "
                f"{r['fraction_of_bound_bracketed_median']:.3f} | "
                f"{r['fraction_of_bf16_bound']:.3f} / {r['fraction_of_bf16_bound_median']:.3f} / "
                f"{r['fraction_of_bf16_bound_bracketed_median']:.3f} |"
            )
    ddp = rec.get("ddp")
    if ddp and ddp.get("error"):
        lines += ["", f"defended predict, 1 vs 2 DDP processes: FAILED ({ddp['error']})."]
    elif ddp:
        p1, p2 = ddp["processes_1"], ddp["processes_2"]
        lines += [
            "",
            f"defended predict, {ddp['n']} clean test images, {ddp['steps']} steps x "
            f"{ddp['views']} views, batch {ddp['batch_per_process']} per process:",
            "",
            "| processes | strategy | img/s | process wall (s) | accuracy |",
            "|---:|---|---:|---:|---:|",
            f"| 1 | {p1['strategy']} | {p1['images_per_s']} | {p1['process_wall_s']} | {p1['accuracy']:.3f} |",
            f"| 2 | {p2['strategy']} | {p2['images_per_s']} | {p2['process_wall_s']} | {p2['accuracy']:.3f} |",
            "",
            f"speed-up {ddp['speedup']}x; {ddp['note']}.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20", help="registered model name (random weights)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds), for tests")
    p.add_argument("--out", default="results/bench/bench.json")
    p.add_argument("--no-reference", action="store_true", help="skip the plain-loop rows")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant child RSS runs")
    p.add_argument(
        "--ddp", action="store_true", help="also time defended predict, 1 vs 2 DDP processes"
    )
    p.add_argument("--ddp-n", type=int, default=128, help="images of the DDP comparison")
    p.add_argument(
        "--variants", choices=("default", "all"), default="default",
        help="'all' adds the recompute and fold_bn purifier rows",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU: peak memory is the GPU's)")
    p.add_argument(
        "--bf16", action="store_true",
        help="also the bound, the purifier at both settings and PGD-10 under bfloat16 autocast",
    )  # fmt: skip
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return _child(args._child)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device must be cpu or cuda, got '{args.device}'")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is visible to torch here")
    if args.ddp and (why := ddp_problem()):
        p.error(why)
    common = dict(
        reference=not args.no_reference, memory=not args.no_memory, ddp=args.ddp, ddp_n=args.ddp_n,
        device=args.device, bf16=args.bf16,
    )  # fmt: skip
    if args.quick:
        quick = (
            (2, 2, 8, "plain"), (2, 2, 8, "masks"), (2, 2, 8, ""), (2, 2, 8, "fold_bn+recompute")
        ) + (((2, 2, 8, "bf16"),) if args.bf16 else ())  # fmt: skip
        rec = run_bench(args.model, 1, (8, 16), quick, 8, **common)
    else:
        settings = PURIFIER_SETTINGS + (EXTRA_SETTINGS if args.variants == "all" else ())
        settings += BF16_SETTINGS if args.bf16 else ()
        rec = run_bench(args.model, args.reps, tuple(args.batches), settings, **common)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2))
    table = format_table(rec)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    if (rec.get("ddp") or {}).get("error"):
        print(f"python -m benchmarks: error: the DDP comparison failed: {rec['ddp']['error']}",
              file=sys.stderr)  # fmt: skip
        sys.exit(1)
