"""Fault injection: a generation and an evaluation killed (SIGKILL) at random moments resume to the
outputs of an uninterrupted run, recompute no finished batch, and leave nothing behind."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from revlit.io import sha256_file
from tests.callbacks import resume_job
from tests.helpers import write_tiny_cifar, write_tiny_classifier

ROOT = Path(__file__).resolve().parents[2]
N_BATCHES = resume_job.N // resume_job.BATCH
TRIALS = 3
RESULTS = ("pgd/killme", "results/defense", "results/run")  # the folders resume_job.run writes


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    wd = tmp_path_factory.mktemp("resume_template")
    write_tiny_cifar(wd / "cifar", n_train=10, n_test=resume_job.N, seed=0)
    clf = write_tiny_classifier(wd / "clf.pt")
    from revlit.io import sha256_file as sha
    from revlit.ssl import SSLHead, save_head

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = SSLHead(64, 32, 8)
        with torch.no_grad():
            head.train()(torch.randn(64, 64))
    save_head(head.eval(), wd / "head.pt", sha(clf), {"loss": "nt_xent", "temperature": 0.2})
    return wd


def _fresh(template: Path, dst: Path) -> Path:
    shutil.copytree(template, dst)
    return dst


def _parts(wd: Path) -> list[Path]:
    return [p for p in wd.rglob(".*.partial/parts/*/*.pt") if ".tmp" not in p.name]


def _kill_at_random_moment(kind: str, wd: Path, rng: random.Random) -> dict:
    """Start the job as a process; SIGKILL it once ``k`` batches are kept, plus a random delay."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.callbacks.resume_job", kind, str(wd)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    k, delay = rng.randint(0, N_BATCHES), rng.uniform(0.0, 0.2)
    deadline = time.time() + 120
    while proc.poll() is None and len(_parts(wd)) < k and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    rc = proc.wait()
    info = {"job": kind, "k": k, "delay": round(delay, 3), "rc": rc, "kept": len(_parts(wd))}
    # killed after its result was moved into place: the re-run reuses the whole result
    info["complete"] = any((wd / f).is_dir() for f in RESULTS)
    print("trial", info)  # shown with pytest -s
    return info


def _missing(info: dict, reuses_result: bool = True) -> int:
    """Batches the re-run must compute. A run killed after its result was in place: an evaluation
    reuses the whole result (none); a stored set holds no per-batch outputs, so it is rebuilt."""
    if info["complete"]:
        return 0 if reuses_result else N_BATCHES
    return N_BATCHES - info["kept"]


def _count_calls(monkeypatch, target: str, name: str) -> list:
    import importlib

    mod = importlib.import_module(target)
    real, calls = getattr(mod, name), []

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(mod, name, counted)
    return calls


def _count_hits(monkeypatch) -> list:
    from revlit.parts import PartStore

    real, hits = PartStore.get, []

    def get(self, index):
        out = real(self, index)
        if out is not None:
            hits.append(index)
        return out

    monkeypatch.setattr(PartStore, "get", get)
    return hits


def _leftovers(folder: Path) -> list[str]:
    """Anything beside or inside the result that a finished run should not leave."""
    beside = [p.name for p in folder.parent.iterdir() if p != folder]
    inside = [p.name for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    return beside + inside


def test_killed_attack_generation_resumes_byte_identical(template, tmp_path, monkeypatch):
    ref = resume_job.run("attack", _fresh(template, tmp_path / "ref"))
    files = ("images.pt", "labels.pt", "indices.pt")
    want = {f: sha256_file(ref / f) for f in files}
    rng = random.Random(20)
    for t in range(TRIALS):
        wd = _fresh(template, tmp_path / f"trial{t}")
        info = _kill_at_random_moment("attack", wd, rng)
        calls = _count_calls(monkeypatch, "revlit.modules.attack", "pgd_attack")
        hits = _count_hits(monkeypatch)
        out = resume_job.run("attack", wd)
        assert len(hits) == info["kept"], (info, len(hits))
        got = {f: sha256_file(out / f) for f in files}
        assert got == want, info
        # nothing finished is recomputed
        assert len(calls) == _missing(info, reuses_result=False), info
        assert _leftovers(out) == [], info
        monkeypatch.undo()


def test_killed_evaluation_resumes_to_identical_predictions(template, tmp_path, monkeypatch):
    ref = resume_job.run("evaluate", _fresh(template, tmp_path / "ref"))
    want = torch.load(ref / "predictions.pt", weights_only=True)
    rng = random.Random(21)
    for t in range(TRIALS):
        wd = _fresh(template, tmp_path / f"trial{t}")
        info = _kill_at_random_moment("evaluate", wd, rng)
        calls = _count_calls(monkeypatch, "torch", "rand")
        hits = _count_hits(monkeypatch)
        out = resume_job.run("evaluate", wd)
        assert len(hits) == info["kept"], (info, len(hits))
        got = torch.load(out / "predictions.pt", weights_only=True)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), info
        assert sha256_file(out / "predictions.pt") == sha256_file(ref / "predictions.pt"), info
        assert len(calls) == _missing(info) * resume_job.STEPS, info
        assert _leftovers(out) == [], info
        monkeypatch.undo()


def test_killed_defended_evaluation_resumes_prediction_identical(template, tmp_path, monkeypatch):
    """The DefenseModule and its writer: same predictions and losses (timings aside)."""
    ref = resume_job.run("defense", _fresh(template, tmp_path / "ref"))
    want = torch.load(ref / "predictions.pt", weights_only=True)
    rng = random.Random(22)
    for t in range(2):
        wd = _fresh(template, tmp_path / f"trial{t}")
        info = _kill_at_random_moment("defense", wd, rng)
        calls = _count_calls(monkeypatch, "revlit.modules.defense", "defend_batch")
        hits = _count_hits(monkeypatch)
        out = resume_job.run("defense", wd)
        assert len(hits) == info["kept"], (info, len(hits))
        got = torch.load(out / "predictions.pt", weights_only=True)
        assert got.keys() == want.keys(), info
        for k in want:
            if not k.startswith("sec"):  # wall-clock columns differ between any two runs
                assert torch.equal(got[k], want[k]), (k, info)
        assert len(calls) == _missing(info), info
        assert _leftovers(out) == [], info
        monkeypatch.undo()


def test_other_settings_never_reuse_parts(template, tmp_path):
    """Parts left by a killed run with another seed are never served to this run (and go)."""
    from revlit.parts import PartStore

    ref = resume_job.run("evaluate", _fresh(template, tmp_path / "ref"))
    want = torch.load(ref / "predictions.pt", weights_only=True)
    wd = _fresh(template, tmp_path / "wd")
    import json

    settings = json.loads((ref / "run.json").read_text())["settings"]
    settings["module"]["seed"] = 7  # what a seed-7 run's parts are keyed by
    stale = PartStore(wd / "results" / ".run.partial" / "parts", settings)
    for b in range(N_BATCHES):
        idx = torch.arange(b * resume_job.BATCH, (b + 1) * resume_job.BATCH)
        rows = {k: v[idx] for k, v in want.items()}
        stale.put({**rows, "pred": (rows["pred"] + 1) % 10})  # different outputs
    out = resume_job.run("evaluate", wd)
    got = torch.load(out / "predictions.pt", weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not stale.folder.exists() and _leftovers(out) == []
