"""python -m revlit.attacks.table: rows, markdown, JSON, one-line errors."""

import json

import pytest

from revlit.attacks.table import main
from tests.helpers import write_tiny_cifar, write_tiny_classifier


def test_table_writes_rows_and_markdown(tmp_path, capsys):
    data = write_tiny_cifar(tmp_path / "cifar", n_train=10, n_test=6)
    clf = write_tiny_classifier(tmp_path / "clf.pt")
    out = tmp_path / "t.json"
    rc = main(
        ["--classifier", str(clf), "--n", "4", "--steps", "0", "2", "--data-dir", str(data),
         "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    rec = json.loads(out.read_text())
    rows = rec["rows"]
    assert [r["attack"] for r in rows] == [
        "clean", "PGD-0 l_1", "PGD-2 l_1", "PGD-0 l_2", "PGD-2 l_2", "PGD-0 l_inf", "PGD-2 l_inf",
    ]  # fmt: skip
    assert all(r["n"] == 4 for r in rows)
    for r in rows[1:]:
        assert r["delta_over_eps_mean"] <= 1 + 1e-4 and r["images_per_cpu_s"] > 0
        if r["steps"] == 2:
            assert r["loss"] >= rows[0]["loss"] - 1e-6  # the attack raises the loss
    table = capsys.readouterr().out
    assert table.count("\n| PGD-") == 6 and "| clean |" in table


def test_table_refuses_bad_arguments(tmp_path, capsys):
    assert main(["--norms", "l_3", "--classifier", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("revlit: error:") and "norm" in err[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--n", "-5"], "--n: -5 is below 1"),
        (["--n", "0"], "--n: 0 is below 1"),
        (["--batch-size", "0"], "--batch-size: 0 is below 1"),
        (["--restarts", "0"], "--restarts: 0 is below 1"),
        (["--steps", "-1"], "--steps: -1 is below 0"),
        (["--threads", "-2"], "--threads: -2 is below 1"),
        (["--n", "ten"], "'ten' is not an integer"),
        (["--bogus"], "unrecognized arguments"),
        (["--loss", "xx"], "unknown attack loss"),
        (["--l1-topk", "1.5"], "--l1-topk"),
        (["--eps-linf", "-1"], "eps"),
        (["--eps-l2", "abc"], "eps"),
        (["--norms", "l_inf", "--eps-linf", "nan"], "finite"),
    ],
)
def test_every_bad_flag_is_one_line_exit_2_before_any_work(tmp_path, capsys, args, words):
    data = write_tiny_cifar(tmp_path / "cifar", n_train=10, n_test=6)
    clf = write_tiny_classifier(tmp_path / "clf.pt")
    out = tmp_path / "t.json"
    base = ["--classifier", str(clf), "--data-dir", str(data), "--out", str(out)]
    try:
        rc = main(base + args)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()
