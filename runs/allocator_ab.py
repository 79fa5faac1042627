"""Allocator x purifier-path A/B (bench run 3's "which change bought what"), one measurement per call.

    python runs/allocator_ab.py speed  K V B REPS   # img/s of the plain and the lean purifier, interleaved
    python runs/allocator_ab.py memory K V B PATH   # VmHWM (MB) of one purify call (PATH: lean | plain)

``runs/allocator_ab.sh`` calls it under glibc (the Makefile's malloc settings) and under mimalloc,
alternating. ResNet-20 with random weights, SSL head 64 -> 256 -> 16, NT-Xent, the authors' views.
"""

import sys
import time

import torch

from revlit.bench import vm_hwm_mb
from revlit.defenses.reverse import ReversePurifier
from revlit.losses import ContrastiveLoss
from revlit.models.resnet import CifarResNet
from revlit.ssl.head import SSLHead
from revlit.ssl.views import SimCLRViews


def purifier(k: int, v: int, lean: bool) -> ReversePurifier:
    torch.manual_seed(0)
    model = CifarResNet(20).eval().to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    head = SSLHead(64).eval()
    loss = ContrastiveLoss("nt_xent", 0.2)
    return ReversePurifier(model, head, loss, SimCLRViews(), steps=k, n_views=v, lean=lean)


def main() -> None:
    what, k, v, b = sys.argv[1], *map(int, sys.argv[2:5])
    x = torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    if what == "memory":
        pur = purifier(k, v, sys.argv[5] == "lean")
        before = vm_hwm_mb()
        pur.purify(x, torch.Generator().manual_seed(0))
        print(
            f"memory K={k} V={v} B={b} {sys.argv[5]}: peak {vm_hwm_mb():.0f} MB (before {before:.0f})"
        )
        return
    reps = int(sys.argv[5])
    purs = {"plain": purifier(k, v, False), "lean": purifier(k, v, True)}
    times: dict[str, list[float]] = {n: [] for n in purs}
    outs = {}
    for _ in range(reps):
        for name, pur in purs.items():
            t0 = time.perf_counter()
            outs[name] = pur.purify(x, torch.Generator().manual_seed(0))[0]
            times[name].append(time.perf_counter() - t0)
    same = torch.equal(outs["plain"], outs["lean"])
    rates = ", ".join(f"{n} {b / min(t):.2f} img/s" for n, t in times.items())
    print(f"speed K={k} V={v} B={b} (best of {reps}): {rates}; identical images: {same}")


if __name__ == "__main__":
    main()
