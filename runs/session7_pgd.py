"""Where PGD-10's time goes, against the bound (issue 8, session 7).

    python runs/session7_pgd.py parts    # PGD-10 at batch 512 against its parts
    python runs/session7_pgd.py chunks   # PGD-10 at batch 512 vs two chunks of 256, paired

``parts``: PGD-10 (Linf 8/255, step 2/255) against 10 bound passes at batch 512 (features +
squared sum), 10 passes of the classifier with its cross-entropy, one no-grad forward and 10
signed steps with their projections, 5 repetitions in alternating order; seconds (median and
each). ``chunks``: 20 bound passes at batch 256 (5,120 image-passes), PGD-10 on 512 images
and PGD-10 on two halves of 256, 6 repetitions in alternating order; each PGD repetition as a
fraction of the bound window of the same repetition. ResNet-20, random weights, channels_last,
frozen parameters, as ``make bench``. Run under the Makefile's allocator settings (LD_PRELOAD
mimalloc) to compare with the bench.
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from revlit.attacks.norms import Norm, project, step
from revlit.attacks.pgd import pgd
from revlit.bench import _frozen, _images, input_grad_pass
from revlit.models.registry import build


def _time(variants: dict, reps: int) -> dict:
    times = {k: [] for k in variants}
    for f in variants.values():  # warm-up
        f()
    for r in range(reps):
        for k in list(variants) if r % 2 == 0 else list(variants)[::-1]:
            t = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t)
    return times


def parts(model, x, y) -> None:
    g = torch.randn_like(x)

    def b10():
        for _ in range(10):
            input_grad_pass(model, x)

    def ce10():
        for _ in range(10):
            xr = x.detach().requires_grad_(True)
            loss = F.cross_entropy(model(xr), y, reduction="none")
            torch.autograd.grad(loss.sum(), xr)

    def fwd():
        with torch.no_grad():
            model(x)

    def proj10():
        xa = x
        for _ in range(10):
            xa = project(Norm.LINF, step(Norm.LINF, xa, g, 2 / 255, 0.0), x, 8 / 255)

    def p512():
        pgd(model, x, y, Norm.LINF, 8 / 255, 2 / 255, 10)

    times = _time(dict(b10=b10, ce10=ce10, fwd=fwd, proj10=proj10, p512=p512), 5)
    for k, v in times.items():
        print(k, round(statistics.median(v), 4), [round(a, 3) for a in v])


def chunks(model, x, y) -> None:
    x256 = _images(256)

    def bound():
        for _ in range(20):
            input_grad_pass(model, x256)

    def p512():
        pgd(model, x, y, Norm.LINF, 8 / 255, 2 / 255, 10)

    def p256():
        for s in (slice(0, 256), slice(256, 512)):
            pgd(model, x[s], y[s], Norm.LINF, 8 / 255, 2 / 255, 10)

    times = _time({"bound": bound, "p512": p512, "p256": p256}, 6)
    b = [5120 / t for t in times["bound"]]
    for k in ("p512", "p256"):
        ips = [512 / t for t in times[k]]
        fr = [i * 10 / bb for i, bb in zip(ips, b)]
        print(
            k, "img/s med", round(statistics.median(ips), 1), "frac vs same-rep bound",
            [round(f, 3) for f in fr], "median", round(statistics.median(fr), 3),
        )  # fmt: skip
    print("bound med", round(statistics.median(b), 1))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("parts", "chunks"):
        sys.exit("usage: python runs/session7_pgd.py parts|chunks")
    torch.manual_seed(0)
    net = _frozen(build("resnet20"))
    images = _images(512, 2)
    labels = torch.randint(0, 10, (512,), generator=torch.Generator().manual_seed(0))
    {"parts": parts, "chunks": chunks}[what](net, images, labels)
