"""cli.py predict with the shipped attack configs: DDP on 2 CPU processes, one-line CLI errors.

Runs ``cli.py`` in a subprocess whose working directory is a temporary folder, so the configs'
relative paths (``checkpoints/resnet20_at.pt``, ``data/pgd``, ``logs``) land there.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from revlit.attacks import Norm, lp_norm, pgd_attack
from revlit.data.stored import load_stored_set
from revlit.models import load_classifier
from revlit.modules.attack import example_generators
from tests.helpers import tiny_images, write_tiny_cifar, write_tiny_classifier

ROOT = Path(__file__).resolve().parents[2]
N_TEST = 42


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working folder holding ``cifar/`` (42 test images) and ``checkpoints/resnet20_at.pt``."""
    wd = tmp_path_factory.mktemp("attack_cli")
    write_tiny_cifar(wd / "cifar", n_train=10, n_test=N_TEST, seed=0)
    write_tiny_classifier(wd / "checkpoints" / "resnet20_at.pt")
    return wd, tiny_images(N_TEST, 1)  # the test split of write_tiny_cifar(seed=0)


def _cli(wd: Path, *args: str, timeout=600) -> subprocess.CompletedProcess:
    # ~10-30 s each on an idle 2-core machine; the generous limit only guards against a hang when
    # the cores are shared with training jobs.
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["REVLIT_DATA_DIR"] = str(wd / "cifar")
    env.pop("REVLIT_DEBUG", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "predict", *args],
        cwd=wd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ddp_two_cpu_processes_write_each_index_once(workdir):
    wd, (data, labels) = workdir
    n = N_TEST - 1  # odd: Lightning's sampler repeats an index to even the two shards
    r = _cli(
        wd,
        "--config", str(ROOT / "configs/attack/pgd_linf.yaml"),
        "--model.init_args.steps", "2",
        "--model.init_args.set_name", "ddp_set",
        "--data.init_args.test_subset", str(n),
        "--data.init_args.eval_batch_size", "8",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "2",
        "--trainer.strategy", "ddp",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    folder = wd / "data" / "pgd" / "ddp_set"
    st = load_stored_set(folder)
    assert torch.equal(st.indices, torch.arange(n))  # every index once, in order
    assert torch.equal(st.labels, torch.from_numpy(labels[:n]).long())
    assert st.images.dtype == torch.float32 and st.images.shape == (n, 3, 32, 32)
    m = st.meta
    assert m["world_size"] == 2 and m["n"] == n and m["norm"] == "l_inf" and m["steps"] == 2
    assert (
        m["classifier_sha256"]
        == load_classifier(wd / "checkpoints" / "resnet20_at.pt")[1]["sha256"]
    )
    for key in (
        "eps",
        "step_size",
        "restarts",
        "loss",
        "seed",
        "accuracy",
        "seconds",
        "seconds_per_image",
        "commit",
        "date",
        "classifier",
    ):
        assert key in m, key
    assert (folder / "grid.png").is_file()
    assert not any(p.name.startswith(".") for p in (wd / "data" / "pgd").iterdir())  # no leftovers
    # the stored images are exactly what the attack gives each example, whatever the sharding
    clean = torch.from_numpy(data[:n]).float() / 255
    assert (lp_norm(st.images - clean, Norm.LINF) <= 8 / 255 + 1e-6).all()
    net, _ = load_classifier(wd / "checkpoints" / "resnet20_at.pt")
    ref = pgd_attack(
        net,
        clean,
        st.labels,
        Norm.LINF,
        8 / 255,
        2 / 255,
        steps=2,
        generator=example_generators(0, st.indices),
    )
    close = (ref.x_adv - st.images).abs() <= 1e-5
    assert close.float().mean() > 0.999, close.float().mean()


def test_steps_alias_and_single_process(workdir):
    wd, _ = workdir
    r = _cli(
        wd,
        "--config", str(ROOT / "configs/attack/pgd_l1.yaml"),
        "--model.init_args.attack_iters", "1",
        "--data.init_args.test_subset", "6",
        "--trainer.accelerator", "cpu",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((wd / "data" / "pgd" / "resnet20_at_l_1" / "meta.json").read_text())
    assert meta["steps"] == 1 and meta["norm"] == "l_1" and meta["n"] == 6


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model.init_args.norm", "l_3"], "unknown norm"),
        (["--model.init_args.eps", "-0.5"], "eps"),
        (
            ["--trainer.inference_mode", "true", "--data.init_args.test_subset", "2"],
            "inference_mode",
        ),
        (["--bogus", "1"], "unrecognized arguments: --bogus"),  # usage errors: one line too
        (["--model.init_args.steps", "abc"], "model.init_args.steps"),
    ],
)
def test_cli_refuses_bad_arguments_with_one_line_and_exit_2(workdir, args, words):
    wd, _ = workdir
    r = _cli(
        wd,
        "--config",
        str(ROOT / "configs/attack/pgd_l2.yaml"),
        "--trainer.accelerator",
        "cpu",
        *args,
    )
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("revlit: error:")]
    assert len(errors) == 1 and words in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "usage:" not in r.stderr
