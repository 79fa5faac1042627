"""The allocator `make` runs the long jobs under: the preload works and the purifier runs with it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mimalloc_lib() -> Path | None:
    for site in map(Path, sys.path):
        lib = site / "cmeel.prefix" / "lib" / "libmimalloc.so"
        if lib.exists():
            return lib
    return None


def test_make_puts_the_long_jobs_under_mimalloc_and_can_opt_out():
    out = subprocess.run(
        ["make", "-n", "bench"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    line = next(ln for ln in out.splitlines() if "-m benchmarks" in ln)
    lib = _mimalloc_lib()
    if lib is not None and (ROOT / ".venv").exists():
        assert re.search(r"LD_PRELOAD=\S*libmimalloc\.so MIMALLOC_PURGE_DELAY=-1", line), line
    glibc = subprocess.run(
        ["make", "-n", "bench", "ALLOCATOR=glibc"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert "LD_PRELOAD" not in next(ln for ln in glibc.splitlines() if "-m benchmarks" in ln)


@pytest.mark.skipif(_mimalloc_lib() is None, reason="cmeel-mimalloc is not installed here")
def test_the_purifier_runs_under_the_preloaded_allocator():
    code = (
        "import torch\n"
        "from revlit.defenses.reverse import ReversePurifier\n"
        "from revlit.losses import ContrastiveLoss\n"
        "from revlit.models.resnet import CifarResNet\n"
        "from revlit.ssl.head import SSLHead\n"
        "from revlit.ssl.views import SimCLRViews\n"
        "m = CifarResNet(depth=8).eval()\n"
        "p = ReversePurifier(m, SSLHead(m.feature_dim, 16, 8).eval(), ContrastiveLoss(),\n"
        "                    SimCLRViews(), steps=2, n_views=2)\n"
        "x = torch.rand(4, 3, 32, 32)\n"
        "out, losses = p.purify(x, torch.Generator().manual_seed(0))\n"
        "print('ok', float((out - x).abs().max()) <= 16 / 255 + 1e-6)\n"
    )
    env = dict(os.environ, LD_PRELOAD=str(_mimalloc_lib()), MIMALLOC_PURGE_DELAY="-1")
    env["MIMALLOC_ALLOW_LARGE_OS_PAGES"] = "1"
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok True")
    maps = subprocess.run(
        [sys.executable, "-c", "print(open('/proc/self/maps').read())"],
        env=env, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "libmimalloc" in maps  # the preload really loaded
