"""``python cli.py ...`` end to end.

The three help/print-config commands run as real subprocesses (started concurrently: each start
costs seconds); ``test`` and the bad-input cases call :func:`revlit.cli.main` in-process, which
is what ``cli.py`` runs, and check its exit status (``SystemExit``) and its stderr. Every command
runs with the working directory in a temporary folder, so logs and any checkpoint a config names
land there, never in the repository.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from revlit.cli import main
from revlit.data.cifar import load_cifar10
from revlit.models.checkpoint import load_classifier

REPO = Path(__file__).resolve().parents[1]
CLI = str(REPO / "cli.py")
AT_CONFIG = str(REPO / "configs" / "classifier" / "resnet20_at.yaml")
CLASSIFIER = ["--model", "revlit.modules.classifier.ClassifierModule"]
DATA = ["--data", "revlit.data.datamodule.CIFAR10DataModule"]
HELP_COMMANDS = {
    "help": ["--help"],
    "fit_help": ["fit", "--help"],
    "print_config": ["fit", "--config", AT_CONFIG, "--print_config"],
}


@pytest.fixture(scope="module")
def help_runs(tmp_path_factory) -> dict:
    """Run the help commands as subprocesses, all at once; ``{name: (rc, stdout, stderr)}``."""
    tmp = tmp_path_factory.mktemp("cli_help")
    env = {k: v for k, v in os.environ.items() if k != "REVLIT_DEBUG"}
    env.update(OMP_NUM_THREADS="1", REVLIT_LOG_DIR=str(tmp / "logs"))
    procs = {
        name: subprocess.Popen(
            [sys.executable, CLI, *args],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in HELP_COMMANDS.items()
    }
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = (p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("name", sorted(HELP_COMMANDS))
def test_help_and_print_config_exit_0(help_runs, name):
    rc, stdout, stderr = help_runs[name]
    assert rc == 0, stderr[-2000:]
    assert "revlit: error" not in stderr
    if name == "help":
        assert "fit" in stdout and "test" in stdout and "predict" in stdout
    if name == "fit_help":
        assert "--model" in stdout and "--data" in stdout and "--run_name" in stdout
    if name == "print_config":
        assert "revlit.models.resnet.CifarResNet" in stdout
        assert "adversarial: fgsm_rs" in stdout and "inference_mode: false" in stdout


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REVLIT_DEBUG", raising=False)
    monkeypatch.setenv("REVLIT_LOG_DIR", str(tmp_path / "logs"))
    return tmp_path


def _test_args(ckpt: Path, data_dir: Path) -> list[str]:
    return [
        "test",
        *CLASSIFIER,
        "--model.checkpoint",
        str(ckpt),
        *DATA,
        "--data.data_dir",
        str(data_dir),
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
    ]


def test_cli_test_reports_accuracy_of_the_checkpoint(
    in_tmp, tiny_cifar_dir, tiny_classifier_ckpt, capsys
):
    main(_test_args(tiny_classifier_ckpt, tiny_cifar_dir))
    out = capsys.readouterr().out
    m = re.search(r"test/acc\s+([0-9.]+)", out)
    assert m, out
    model, _ = load_classifier(tiny_classifier_ckpt)
    x, y = load_cifar10(tiny_cifar_dir, train=False)
    with torch.no_grad():
        expected = (model(x.float() / 255).argmax(1) == y).float().mean().item()
    assert float(m.group(1)) == pytest.approx(expected, abs=1e-6)
    assert list((in_tmp / "logs").glob("default/version_*/config.yaml"))


def test_output_has_no_adverts_and_no_args_warning(in_tmp, tiny_cifar_dir, tiny_classifier_ckpt):
    """Called from Python (as the demo does) while sys.argv holds the caller's own options."""
    args = _test_args(tiny_classifier_ckpt, tiny_cifar_dir)
    code = (
        "import sys; sys.argv = ['python -m revlit.demo', '--n', '16']\n"
        "from revlit.cli import main\n"
        f"main({args!r})\n"
        "assert sys.argv == ['python -m revlit.demo', '--n', '16'], sys.argv\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=in_tmp, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert "test/acc" in said
    for noise in (
        "💡",
        "litlogger",
        "GPU available",
        "Seed set to",
        "args parameter",
        "deprecated",
    ):
        assert noise not in said, noise


def _exit_2_one_line(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("revlit: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def test_missing_data_folder_exit_2(in_tmp, tiny_classifier_ckpt, capsys):
    line = _exit_2_one_line(_test_args(tiny_classifier_ckpt, in_tmp / "no_such_folder"), capsys)
    assert "no_such_folder" in line and "--data.data_dir" in line and "--data.download" in line


def test_bogus_adversarial_exit_2(in_tmp, tiny_cifar_dir, capsys):
    args = ["fit", "--config", AT_CONFIG, "--model.init_args.adversarial", "bogus"]
    line = _exit_2_one_line([*args, "--data.init_args.data_dir", str(tiny_cifar_dir)], capsys)
    assert "adversarial" in line and "bogus" in line
    assert not (in_tmp / "checkpoints").exists()  # nothing was trained or exported


def test_unsafe_checkpoint_exit_2(in_tmp, tiny_cifar_dir, capsys):
    evil = in_tmp / "evil.pt"
    evil.write_bytes(b"not a checkpoint at all")
    line = _exit_2_one_line(_test_args(evil, tiny_cifar_dir), capsys)
    assert "evil.pt" in line
