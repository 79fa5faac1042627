"""Accuracy and loss of a classifier under PGD (L1, L2, Linf) at several iteration counts.

    python -m revlit.attacks.table --classifier checkpoints/resnet20_at.pt --n 1000 --steps 5 10 50

Prints a markdown table (clean row, then one row per norm and iteration count: accuracy, mean
cross-entropy, mean ‖δ‖/ε and the share of perturbations within 1 % of the boundary, attack
images per wall-clock second and per CPU-second of the process; on a shared machine the latter
divided by the thread count is the steadier number) and writes the same numbers to JSON. The attack is :func:`revlit.attacks.pgd_attack`
with the default budgets and steps and per-example seeding (the same noise as the stored sets of
``cli.py predict --config configs/attack/...``). Images are the first ``n`` CIFAR-10 test images.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from revlit.attacks.losses import get_loss
from revlit.attacks.norms import (
    DEFAULT_EPS,
    L1_TOPK_DEFAULT,
    Norm,
    default_step_size,
    example_generators,
    lp_norm,
)
from revlit.attacks.pgd import pgd_attack, resolve_args
from revlit.io import atomic_write_json
from revlit.utils import ArgumentParser, as_float, int_at_least


def evaluate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norms: list[Norm],
    steps_list: list[int],
    eps: dict[Norm, float] | None = None,
    restarts: int = 1,
    loss: str = "ce",
    seed: int = 0,
    batch_size: int = 250,
    l1_topk: float = L1_TOPK_DEFAULT,
    log=print,
) -> list[dict]:
    """Rows of the table: clean, then every (norm, steps). ``x`` (N,3,H,W) in [0,1], ``y`` (N,)."""
    eps = {**DEFAULT_EPS, **(eps or {})}
    model = model.eval().to(memory_format=torch.channels_last)
    idx = torch.arange(len(y))
    rows = []
    t0 = time.time()
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(y), batch_size)])
    sec = time.time() - t0
    rows.append(
        {
            "attack": "clean",
            "norm": None,
            "eps": 0.0,
            "steps": 0,
            "n": len(y),
            "accuracy": float((logits.argmax(1) == y).float().mean()),
            "loss": float(F.cross_entropy(logits, y)),
            "seconds": sec,
            "images_per_s": len(y) / max(sec, 1e-9),
        }
    )
    log(f"clean: acc {rows[-1]['accuracy']:.4f}")
    for norm in norms:
        e = eps[norm]
        st = default_step_size(norm, e)
        for steps in steps_list:
            t0, c0 = time.time(), time.process_time()
            accs, losses, dn = [], [], []
            for i in range(0, len(y), batch_size):
                xb, yb = x[i : i + batch_size], y[i : i + batch_size]
                res = pgd_attack(
                    model, xb, yb, norm, e, st, steps, restarts, loss,
                    generator=example_generators(seed, idx[i : i + batch_size]), l1_topk=l1_topk,
                )  # fmt: skip
                with torch.no_grad():
                    lg = model(res.x_adv)
                accs.append(lg.argmax(1) == yb)
                losses.append(F.cross_entropy(lg, yb, reduction="none"))
                dn.append(lp_norm(res.x_adv - xb, norm) / e)
            sec, cpu = time.time() - t0, time.process_time() - c0
            acc, ce, d = torch.cat(accs), torch.cat(losses), torch.cat(dn)
            rows.append(
                {
                    "attack": f"PGD-{steps} {norm.value}",
                    "norm": norm.value,
                    "eps": e,
                    "step_size": st,
                    "steps": steps,
                    "restarts": restarts,
                    "loss_fn": loss,
                    "l1_topk": l1_topk if norm is Norm.L1 else None,
                    "n": len(y),
                    "accuracy": float(acc.float().mean()),
                    "loss": float(ce.mean()),
                    "delta_over_eps_mean": float(d.mean()),
                    "delta_over_eps_min": float(d.min()),
                    "at_boundary": float((d >= 0.99).float().mean()),
                    "seconds": sec,
                    "images_per_s": len(y) / max(sec, 1e-9),
                    "cpu_seconds": cpu,
                    "images_per_cpu_s": len(y) / max(cpu, 1e-9),
                }
            )
            r = rows[-1]
            log(
                f"{r['attack']}: acc {r['accuracy']:.4f} loss {r['loss']:.3f} "
                f"|d|/eps {r['delta_over_eps_mean']:.3f} ({r['images_per_s']:.1f} img/s)"
            )
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    head = (
        "| attack | ε | step | accuracy | CE loss | ‖δ‖/ε mean | at boundary | attack img/s "
        "| img per CPU-s |"
    )
    out = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["norm"] is None:
            out.append(f"| clean | – | – | {r['accuracy']:.3f} | {r['loss']:.3f} | – | – | – | – |")
            continue
        per_cpu = r.get("images_per_cpu_s")
        out.append(
            f"| {r['attack']} | {r['eps']:.4g} | {r['step_size']:.4g} | {r['accuracy']:.3f} | "
            f"{r['loss']:.3f} | {r['delta_over_eps_mean']:.3f} | {100 * r['at_boundary']:.1f} % | "
            f"{r['images_per_s']:.1f} | {'–' if per_cpu is None else f'{per_cpu:.1f}'} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from revlit.data.cifar import default_data_dir, load_cifar10
    from revlit.io import git_commit
    from revlit.models.checkpoint import load_classifier

    p = ArgumentParser(prog="python -m revlit.attacks.table", description=__doc__.split("\n\n")[0])
    p.add_argument("--classifier", default="checkpoints/resnet20_at.pt")
    p.add_argument("--n", type=int_at_least(1), default=1000, help="first N CIFAR-10 test images")
    p.add_argument("--steps", type=int_at_least(0), nargs="+", default=[5, 10, 50])
    p.add_argument("--norms", nargs="+", default=["l_1", "l_2", "l_inf"])
    p.add_argument("--eps-l1", default=None)
    p.add_argument("--eps-l2", default=None)
    p.add_argument("--eps-linf", default=None)
    p.add_argument("--restarts", type=int_at_least(1), default=1)
    p.add_argument("--loss", default="ce")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--l1-topk", type=float, default=L1_TOPK_DEFAULT)
    p.add_argument("--batch-size", type=int_at_least(1), default=250)
    p.add_argument(
        "--threads", type=int_at_least(1), default=None, help="torch threads (default: torch's)"
    )
    p.add_argument(
        "--data-dir", default=None, help="CIFAR-10 folder (default $REVLIT_DATA_DIR or data/)"
    )
    p.add_argument(
        "--out", default=None, help="JSON output (default results/attacks/table_<classifier>.json)"
    )
    a = p.parse_args(argv)
    try:  # every check before any attack runs
        norms = [Norm.parse(v) for v in a.norms]
        eps = {}
        for norm, v in ((Norm.L1, a.eps_l1), (Norm.L2, a.eps_l2), (Norm.LINF, a.eps_linf)):
            if v is not None:
                eps[norm] = as_float(v, f"eps ({norm})")
        for norm in norms:
            resolve_args(norm, eps.get(norm), None, max(a.steps), a.restarts)
        get_loss(a.loss)
        if not 0.0 < a.l1_topk <= 1.0:
            raise ValueError(f"--l1-topk must be in (0, 1], got {a.l1_topk}")
        out = Path(a.out or f"results/attacks/table_{Path(a.classifier).stem}.json")
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; give a .json file")
        model, info = load_classifier(a.classifier)
        x, y = load_cifar10(a.data_dir or default_data_dir(), train=False)
        if a.threads:
            torch.set_num_threads(a.threads)
    except (ValueError, FileNotFoundError) as e:
        print(f"revlit: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    x, y = x[: a.n].float().div_(255), y[: a.n]
    rows = evaluate(
        model, x, y, norms, a.steps, eps, a.restarts, a.loss, a.seed, a.batch_size, a.l1_topk,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )  # fmt: skip
    table = markdown(rows)
    print(table)
    record = {
        "classifier": a.classifier,
        "classifier_sha256": info["sha256"],
        "classifier_meta": info.get("meta", {}),
        "n": len(y),
        "threads": torch.get_num_threads(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
        "markdown": table,
    }
    atomic_write_json(record, out)
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
