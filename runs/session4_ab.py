"""Bench run 4's "which change bought what": the views' backward paths and the backbone chunk size.

    python runs/session4_ab.py views [REPS]   # views fwd+bwd (ms per step), fast vs plain autograd
    python runs/session4_ab.py chunk [REPS]   # purifier img/s and fraction of the bound, chunk 512/256/128

``views``: SimCLRViews forward + backward on 512 images x 4 views and 256 x 2 (the two bench
settings), over 8 view draws, with the fast paths of run 4 (clamp via hardtanh, the hue weight's
one-product backward, the fused hue node, shared-mode runs on slices) against the plain autograd
expressions they replace (the reference functions of ``revlit.ssl.views``), interleaved; and the
hue rotation alone, fused against the HSV round trip, per 512 images. ``chunk``: the purifier at
(K 10, V 2, B 256) and (K 5, V 4, B 512) with backbone chunks of 512, 256 and 128 views,
interleaved with bound@256 passes (fractions against the best of those). Run it under the
Makefile's allocator: ``make bench``'s environment (mimalloc), e.g.
``LD_PRELOAD=$(ls .venv/lib/python3.11/site-packages/cmeel.prefix/lib/libmimalloc.so)
MIMALLOC_PURGE_DELAY=-1 MIMALLOC_ALLOW_LARGE_OS_PAGES=1 .venv/bin/python runs/session4_ab.py views``.
ResNet-20 with random weights, SSL head 64 -> 256 -> 16, NT-Xent.
"""

import contextlib
import statistics
import sys
import time

import torch

import revlit.ssl.views as V
from revlit.bench import _frozen, _images, input_grad_pass
from revlit.defenses.reverse import ReversePurifier
from revlit.losses import ContrastiveLoss
from revlit.models.resnet import CifarResNet
from revlit.ssl.head import SSLHead
from revlit.ssl.views import SimCLRViews


@contextlib.contextmanager
def plain_views():
    """The views as before run 4: autograd's clamp / minimum / HSV round trip, sort-and-gather."""
    saved = (V.clamp01, V.tent, V.adjust_hue, V.MAX_RUNS)
    V.clamp01 = lambda x: x.clamp(0.0, 1.0)
    V.tent = lambda k: torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    V.adjust_hue = V.adjust_hue_reference
    V.MAX_RUNS = 0
    try:
        yield
    finally:
        V.clamp01, V.tent, V.adjust_hue, V.MAX_RUNS = saved


def _ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts) * 1e3


def views(reps: int) -> None:
    views = SimCLRViews()
    for n_views, n in ((4, 512), (2, 256)):
        x = _images(n, 1)

        def step(seed: int, x=x, n_views=n_views) -> None:  # this iteration's images and views
            xr = x.detach().requires_grad_(True)
            v = views(xr, n_views, torch.Generator().manual_seed(seed))
            v = v.contiguous(memory_format=torch.channels_last)
            torch.autograd.grad(v, xr, torch.ones_like(v))

        fast, plain = [], []
        for seed in range(8):
            fast.append(_ms(lambda s=seed: step(s), reps))
            with plain_views():
                plain.append(_ms(lambda s=seed: step(s), reps))
        print(
            f"views V={n_views} B={n}: fwd+bwd per step, mean over 8 draws: "
            f"fast {statistics.mean(fast):.1f} ms, plain autograd {statistics.mean(plain):.1f} ms "
            f"(range {min(fast):.0f}-{max(fast):.0f} vs {min(plain):.0f}-{max(plain):.0f})"
        )
    x = torch.rand(512, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    shift = torch.rand(512, generator=torch.Generator().manual_seed(1)) * 0.4 - 0.2
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    for name, fn in (("fused", V.adjust_hue), ("HSV round trip", V.adjust_hue_reference)):

        def hue(fn=fn) -> None:
            xr = x.clone().requires_grad_(True)
            torch.autograd.grad(fn(xr, shift), xr, g)

        print(f"hue rotation, 512 images, fwd+bwd: {name} {_ms(hue, reps):.1f} ms")


def chunk(reps: int) -> None:
    torch.manual_seed(0)
    model = _frozen(CifarResNet(20))
    head = SSLHead(64).eval()
    loss = ContrastiveLoss("nt_xent", 0.2)
    xb = _images(256)
    for k, nv, b in ((10, 2, 256), (5, 4, 512)):
        pur = ReversePurifier(model, head, loss, SimCLRViews(), steps=k, n_views=nv)
        x = _images(b, 1)
        res: dict[int, list[float]] = {512: [], 256: [], 128: []}
        bound = []
        pur.purify(x, torch.Generator().manual_seed(0))
        for _ in range(reps):
            for c in res:
                pur.chunk_size = c
                t = time.perf_counter()
                pur.purify(x, torch.Generator().manual_seed(0))
                res[c].append(b / (time.perf_counter() - t))
                for _ in range(3):
                    t = time.perf_counter()
                    input_grad_pass(model, xb)
                    bound.append(256 / (time.perf_counter() - t))
        best = max(bound)
        for c, v in res.items():
            print(
                f"K={k} V={nv} B={b} chunk {c}: best {max(v):.2f} img/s, fraction "
                f"{max(v) * k * nv / best:.3f} (median {statistics.median(v) * k * nv / best:.3f})"
                f", bound@256 best {best:.1f}"
            )


if __name__ == "__main__":
    torch.set_num_threads(2)
    what, reps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    {"views": views, "chunk": chunk}[what](reps)
