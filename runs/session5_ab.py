"""Bench run 5's "which change bought what": float ReLU outputs under a budget against masks.

    python runs/session5_ab.py pass [REPS]       # one backbone pass at batch 256: fwd / bwd ms
    python runs/session5_ab.py purifier [REPS]   # purifier (K 10, V 2, B 256): img/s, paired ratio
    python runs/session5_ab.py forward [REPS]    # undefended forward, batch 512: s per image

``pass``: a ResNet-20 forward + backward to the input at batch 256, interleaved: autograd
("plain"), the lean path with masks only ("mask", ``relu_float_bytes=0``), the lean path with every
ReLU output kept as floats ("float"), and a no-grad forward; medians and paired per-repetition
ratios against plain. ``purifier``: ``ReversePurifier`` at (10, 2, 256) with ``relu_float_mb`` 0
(masks only, the default before run 5) and 512 (all floats at this setting, as the 384 default),
and the plain path (``lean=False``), in alternating order, interleaved with a window of bound@256
passes of the same work; it also checks that the three return the same images. Run it under the
Makefile's allocator (``make bench``'s environment), e.g. ``LD_PRELOAD=$(ls
.venv/lib/python3.11/site-packages/cmeel.prefix/lib/libmimalloc.so) MIMALLOC_PURGE_DELAY=-1
MIMALLOC_ALLOW_LARGE_OS_PAGES=1 .venv/bin/python runs/session5_ab.py purifier 6``.
ResNet-20 with random weights, SSL head 64 -> 256 -> 16, NT-Xent.
"""

import statistics
import sys
import time

import torch

import revlit.models.lean as lean
from revlit.bench import _frozen, _images, input_grad_pass
from revlit.defenses.reverse import ReversePurifier
from revlit.losses import ContrastiveLoss
from revlit.models.registry import build
from revlit.ssl.head import SSLHead
from revlit.ssl.views import SimCLRViews


def ab_pass(reps: int) -> None:
    model = _frozen(build("resnet20"))
    x = _images(256)
    arena = lean.MaskArena(reuse=True)

    def run(kind: str) -> tuple[float, float]:
        xr = x.detach().requires_grad_(True)
        t0 = time.perf_counter()
        if kind == "nograd":
            with torch.no_grad():
                model.features(x)
            return time.perf_counter() - t0, 0.0
        if kind == "plain":
            f = model.features(xr)
        else:
            arena.reset()
            with lean.lean_input_grad(arena, 0 if kind == "mask" else 2**40):
                f = model.features(xr)
        t1 = time.perf_counter()
        torch.autograd.grad(f, xr, torch.ones_like(f))
        return t1 - t0, time.perf_counter() - t1

    kinds = ("plain", "mask", "float", "nograd")
    for k in kinds:
        run(k), run(k)
    fwd = {k: [] for k in kinds}
    bwd = {k: [] for k in kinds}
    for _ in range(reps):
        for k in kinds:
            a, b = run(k)
            fwd[k].append(a)
            bwd[k].append(b)
    med = statistics.median
    for k in kinds:
        print(f"{k:7s} fwd med {med(fwd[k]) * 1e3:6.1f}  bwd med {med(bwd[k]) * 1e3:6.1f} ms")
    for k in ("mask", "float"):
        rf = med([a / b for a, b in zip(fwd[k], fwd["plain"])])
        rb = med([a / b for a, b in zip(bwd[k], bwd["plain"])])
        print(f"{k} / plain, paired: fwd ratio {rf:.3f}, bwd ratio {rb:.3f}")


def ab_purifier(reps: int, k: int = 10, v: int = 2, b: int = 256) -> None:
    torch.manual_seed(0)
    model = _frozen(build("resnet20"))
    head = SSLHead(model.feature_dim).eval()
    loss = ContrastiveLoss("nt_xent", 0.2)
    variants = {}
    for name, mb in (("mask", 0), ("float512", 512), ("plain", 0)):
        opts = {"relu_float_mb": mb, "lean": name != "plain"}
        variants[name] = ReversePurifier(
            model, head, loss, SimCLRViews(), steps=k, n_views=v, **opts
        )
    x, xb = _images(b, 1), _images(256)
    res = {name: [] for name in (*variants, "bound256")}
    outs = {}
    for r in range(reps + 1):  # repetition 0 warms up
        t = time.perf_counter()
        for _ in range(k * v * b // 256):
            input_grad_pass(model, xb)
        if r:
            res["bound256"].append(k * v * b / (time.perf_counter() - t))
        order = list(variants.items())
        for name, pur in order if r % 2 else order[::-1]:
            t = time.perf_counter()
            outs[name], _ = pur.purify(x, torch.Generator().manual_seed(0))
            if r:
                res[name].append(b / (time.perf_counter() - t))
    print(
        "same images:", torch.equal(outs["mask"], outs["float512"]),
        torch.equal(outs["mask"], outs["plain"]),
    )  # fmt: skip
    med = statistics.median
    for name in ("mask", "plain"):
        ratio = med([a / c for a, c in zip(res["float512"], res[name])])
        print(f"float512 / {name}: paired median speed ratio {ratio:.3f}")
    ceiling = med(res["bound256"]) / (k * v)
    for name, vals in res.items():
        line = f"{name}: best {max(vals):.2f} img/s, median {med(vals):.2f}"
        if name != "bound256":
            line += f", fraction of the bound's median: best {max(vals) / ceiling:.3f}"
            line += f", median {med(vals) / ceiling:.3f}"
        print(line)


def undefended_forward(reps: int) -> None:
    """The classifier's no-grad forward at batch 512: the cost of an undefended image."""
    model = _frozen(build("resnet20"))
    x = _images(512)
    ts = []
    with torch.no_grad():
        for i in range(reps + 3):  # 3 warm-up calls
            t = time.perf_counter()
            model(x)
            if i >= 3:
                ts.append(time.perf_counter() - t)
    best, med = min(ts) / 512, statistics.median(ts) / 512
    print(f"undefended forward, batch 512, no grad: best {best:.5f} s/img, median {med:.5f}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "purifier"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    {"pass": ab_pass, "purifier": ab_purifier, "forward": undefended_forward}[what](n)
