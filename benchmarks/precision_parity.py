"""Defended accuracy with the purifier's backbone in bf16 against float32, paired, beside seed noise.

On the first ``n`` CIFAR-10 test images, clean and under Linf attack (a stored set given with
``--linf-set``, else PGD-10 at ε = 8/255 made here in float32 with revlit's PGD), the reverse
attack (:class:`revlit.defenses.ReversePurifier`) is run three times through the defended-evaluation
loop (:func:`revlit.defenses.evaluate.defend_batch`, the one DefenseModule runs):

* ``fp32``: float32, seed s;
* ``fp32_seed2``: float32, seed s + 1 (other random starts and views: the seed noise);
* ``bf16``: backbone and head under bf16 autocast, seed s (same starts and views as ``fp32``).

Reported per split: each accuracy with its 95 % Wilson interval; the paired differences
``bf16 − fp32`` and ``fp32_seed2 − fp32`` on the same images with 95 % intervals (normal
approximation for paired proportions, :func:`revlit.adaptive_report.paired_difference`); and the
prediction agreement of ``bf16`` with ``fp32`` beside that of ``fp32_seed2`` with ``fp32``.
bf16 is at parity when its difference lies within what a second float32 seed moves.

    python -m benchmarks.precision_parity --n 1000 --batch-size 512 --steps 40 --views 4

writes ``parity.json`` and ``parity.md`` (machine, date, commit inside) and ``outputs.pt`` (the
per-image predictions) into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

RUNS = {  # name -> (precision, seed offset)
    "fp32": ("32", 0),
    "fp32_seed2": ("32", 1),
    "bf16": ("bf16", 0),
}
PAIRS = (("bf16", "fp32"), ("fp32_seed2", "fp32"))
PROG = "python -m benchmarks.precision_parity"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from revlit.utils import ArgumentParser

    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="first n test images")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=40, help="purifier steps")
    p.add_argument("--views", type=int, default=4, help="purifier views per image per step")
    p.add_argument("--classifier", default="checkpoints/resnet20_at.pt")
    p.add_argument("--head", default="checkpoints/resnet20_at_head.pt")
    p.add_argument("--linf-set", default=None, help="stored Linf set folder (default: PGD-10 here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data-dir", default=os.environ.get("REVLIT_DATA_DIR", "data"))
    p.add_argument("--out", default="results/precision_parity")
    a = p.parse_args(argv)
    for name in ("n", "steps", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    if a.views < 2:
        p.error("--views must be >= 2 (a contrastive loss)")
    if a.batch_size < 2:
        p.error("--batch-size must be >= 2 (the contrastive loss takes negatives from the batch)")
    if a.n % a.batch_size == 1:
        p.error(f"--n {a.n} with --batch-size {a.batch_size} leaves a batch of one image")
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        p.error(f"{out} is not empty; choose another --out")
    for path in (a.classifier, a.head):
        if not Path(path).is_file():
            p.error(f"{path} not found")
    return a


def load(a: argparse.Namespace) -> dict:
    """Images, labels, the Linf set and the networks (raises ValueError/FileNotFoundError)."""
    from revlit.data.cifar import load_cifar10
    from revlit.models.checkpoint import load_classifier
    from revlit.ssl.head import load_head

    x, y = load_cifar10(a.data_dir, train=False, check_md5=False)
    if a.n > len(y):
        raise ValueError(f"--n {a.n} is more than the {len(y)} test images")
    x, y = x[: a.n].float().div_(255.0), y[: a.n].clone()
    net, info = load_classifier(a.classifier)
    net = net.requires_grad_(False).to(memory_format=torch.channels_last).eval()
    head, head_info = load_head(a.head, info["sha256"])
    linf, linf_meta = None, None
    if a.linf_set is not None:
        from revlit.data.stored import load_stored_set

        s = load_stored_set(a.linf_set)
        if s.meta.get("classifier_sha256") not in (None, info["sha256"]):
            raise ValueError(f"{a.linf_set} was made against another classifier")
        pos = {int(i): k for k, i in enumerate(s.indices)}
        missing = [i for i in range(a.n) if i not in pos]
        if missing:
            raise ValueError(f"{a.linf_set} lacks test index {missing[0]} (needs the first n)")
        order = torch.tensor([pos[i] for i in range(a.n)])
        linf, linf_meta = s.images[order].float(), {"stored": str(a.linf_set), **s.meta}
    return {"x": x, "y": y, "net": net, "info": info, "head": head, "head_info": head_info,
            "linf": linf, "linf_meta": linf_meta}  # fmt: skip


def make_linf(net, x, y, batch_size: int, seed: int) -> torch.Tensor:
    """PGD-10, Linf ε = 8/255, step 2/255, float32, per-example generators (revlit's PGD)."""
    from revlit.attacks.pgd import pgd
    from revlit.seeding import per_image_generators

    parts = []
    for s in range(0, len(y), batch_size):
        sl = slice(s, s + batch_size)
        gens = per_image_generators(seed, torch.arange(len(y))[sl])
        parts.append(pgd(net, x[sl], y[sl], "l_inf", 8 / 255, 2 / 255, 10, generator=gens))
    return torch.cat(parts).contiguous()


def defended_predictions(parts: dict, images, precision: str, seed: int, a) -> tuple:
    """Defended predictions (n,) of one run and its seconds (the module's loop, batch by batch)."""
    from revlit.defenses import ReversePurifier
    from revlit.defenses.evaluate import bind_defense, defend_batch

    pur = ReversePurifier(steps=a.steps, n_views=a.views, precision=precision)
    defense, _, _ = bind_defense(pur, parts["net"], parts["head"], parts["head_info"])
    y, preds = parts["y"], []
    t0 = time.perf_counter()
    for s in range(0, len(y), a.batch_size):
        sl = slice(s, s + a.batch_size)
        idx = torch.arange(len(y))[sl]
        res = defend_batch(parts["net"], defense, images[sl], y[sl], idx, seed)
        preds.append(res.rows["pred_def"])
    return torch.cat(preds), time.perf_counter() - t0


def summarize(y: torch.Tensor, preds: dict[str, torch.Tensor]) -> dict:
    """Accuracies with Wilson intervals, paired differences and prediction agreements."""
    from revlit.adaptive_report import paired_difference, wilson_interval

    n = len(y)
    out: dict = {"accuracy": {}, "paired": [], "agreement": {}}
    for run, p in preds.items():
        k = int((p == y).sum())
        out["accuracy"][run] = {"value": k / n, "ci95": list(wilson_interval(k, n))}
    for a, b in PAIRS:
        d = paired_difference({"final.robust": preds[a] == y, "b.static": preds[b] == y}, "b")
        out["paired"].append({"a": a, "b": b, "difference": d["difference"], "ci95": d["ci"],
                              "only_a": d["only_defended"], "only_b": d["only_static"]})  # fmt: skip
        k = int((preds[a] == preds[b]).sum())
        out["agreement"][f"{a}/{b}"] = {"value": k / n, "ci95": list(wilson_interval(k, n))}
    return out


def table(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Defended accuracy, bf16 backbone against float32",
        "",
        f"{m['cpu']} ({m['threads']} threads, bf16 in hardware: {m['bf16_supported']}), "
        f"torch {m['torch']}, {result['date']}, commit {result['commit']}; n = {result['n']}, "
        f"{result['settings']['steps']} steps × {result['settings']['views']} views, "
        f"batch {result['settings']['batch_size']}.",
        "",
        "| split | fp32 | fp32, other seed | bf16 | bf16 − fp32 (95 % CI) "
        "| other seed − fp32 (95 % CI) | agreement bf16/fp32 | agreement seed/seed |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: |",
    ]

    def pct(v: dict) -> str:
        return f"{100 * v['value']:.1f} %"

    def diff(p: dict) -> str:
        lo, hi = p["ci95"]
        return f"{100 * p['difference']:+.1f} pt ({100 * lo:+.1f} to {100 * hi:+.1f})"

    for split, s in result["splits"].items():
        acc, (pb, ps) = s["accuracy"], s["paired"]
        agree = s["agreement"]
        lines.append(
            f"| {split} | {pct(acc['fp32'])} | {pct(acc['fp32_seed2'])} | {pct(acc['bf16'])} | "
            f"{diff(pb)} | {diff(ps)} | {pct(agree['bf16/fp32'])} | "
            f"{pct(agree['fp32_seed2/fp32'])} |"
        )
    secs = result["seconds"]
    lines += ["", "Seconds per run (both splits): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def machine() -> dict:
    from revlit.models.precision import bf16_supported

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "bf16_supported": bf16_supported("cpu"), "python": platform.python_version()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    try:
        parts = load(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    from revlit.io import atomic_save, atomic_write_json, atomic_write_text, git_commit

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not machine()["bf16_supported"]:
        print("note: this CPU has no bf16 instructions (avx512_bf16 / AMX): the bf16 runs are "
              "emulated and slow; their accuracy is still what bf16 gives", flush=True)  # fmt: skip
    seconds: dict[str, float] = {}
    linf = parts["linf"]
    if linf is None:
        t0 = time.perf_counter()
        linf = make_linf(parts["net"], parts["x"], parts["y"], a.batch_size, a.seed)
        seconds["pgd10"] = time.perf_counter() - t0
        parts["linf_meta"] = {"made_here": "PGD-10, Linf 8/255, step 2/255, float32"}
    splits = {"clean": parts["x"], "linf": linf}
    preds: dict[str, dict[str, torch.Tensor]] = {s: {} for s in splits}
    for run, (precision, offset) in RUNS.items():
        seconds[run] = 0.0
        for split, images in splits.items():
            p, sec = defended_predictions(parts, images, precision, a.seed + offset, a)
            preds[split][run], seconds[run] = p, seconds[run] + sec
            acc = float((p == parts["y"]).double().mean())
            print(f"{run:>10} {split:>5}: {100 * acc:.1f} % ({sec:.0f} s)", flush=True)
        atomic_save({"label": parts["y"], "preds": preds}, out / "outputs.pt")
    result = {
        "n": a.n,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(),
        "machine": machine(),
        "settings": {**vars(a), "linf": parts["linf_meta"]},
        "classifier": {k: parts["info"][k] for k in ("path", "sha256")},
        "head": {k: parts["head_info"][k] for k in ("path", "sha256")},
        "splits": {s: summarize(parts["y"], preds[s]) for s in splits},
        "seconds": seconds,
    }
    atomic_write_json(result, out / "parity.json", default=str)
    md = table(result)
    atomic_write_text(md, out / "parity.md")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
