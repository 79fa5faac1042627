"""``python -m revlit.evaluate``: one table + one record per (split, defense), one-line errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from revlit.data.cifar import load_cifar10
from revlit.data.stored import save_stored_set
from revlit.evaluate import main
from revlit.models.checkpoint import sha256_file
from tests.modules.test_defense import write_head


def test_evaluate_table_and_records(tmp_path, tiny_cifar_dir, tiny_classifier_ckpt, capsys):
    clf = tiny_classifier_ckpt
    head = write_head(tmp_path / "head.pt", clf)
    x, y = load_cifar10(tiny_cifar_dir, train=False)
    meta = {"name": "tiny_l_inf", "norm": "l_inf", "eps": 8 / 255, "steps": 3,
            "classifier_sha256": sha256_file(clf)}  # fmt: skip
    xa = (x[:12].float() / 255 + 4 / 255).clamp(0, 1)
    save_stored_set(tmp_path / "pgd" / "tiny_l_inf", xa, y[:12], torch.arange(12), meta)
    out = tmp_path / "res"
    args = [
        "--classifier", str(clf), "--head", str(head), "--n", "8", "--batch-size", "4",
        "--sets", "clean,tiny_l_inf", "--defenses", "none,reverse,noise", "--steps", "1",
        "--n-views", "2", "--data-dir", str(tiny_cifar_dir), "--pgd-root", str(tmp_path / "pgd"),
        "--out", str(out), "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    assert main(args) == 0
    recs = [json.loads(ln) for ln in (out / "records.jsonl").read_text().splitlines()]
    assert [(r["data"]["split"], r["defense"]["method"]) for r in recs] == [
        (s, d) for s in ("clean", "tiny_l_inf") for d in ("none", "reverse", "noise")
    ]
    assert all(r["n"] == 8 for r in recs)
    assert recs[3]["attack"]["kind"] == "transfer" and recs[0]["attack"]["kind"] == "none"
    table = (out / "table.md").read_text()
    assert table.count("| tiny_l_inf |") == 3 and table.count("| clean |") == 3
    assert table.strip() in capsys.readouterr().out  # printed as well
    assert "ε_r=16/255, step 2/255, 1 steps, 2 views" in table  # the purifier's defaults, readable
    assert f"command: `python -m revlit.evaluate {' '.join(args)}`" in table  # called as main(args)
    assert (out / "tiny_l_inf" / "reverse" / "defense_grid.png").is_file()
    assert any((tmp_path / "logs").rglob("events.out.tfevents*"))

    # a missing set: one line and status 2, or skipped on request
    bad = [*args[:-4], "--out", str(tmp_path / "r2"), "--log-dir", str(tmp_path / "logs"),
           "--sets", "clean,nope", "--defenses", "none"]  # fmt: skip
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("revlit: error: stored set 'nope' not found")
    assert main([*bad, "--skip-missing"]) == 0
    assert "skipped (missing): nope" in (tmp_path / "r2" / "table.md").read_text()
    assert not os.path.exists(tmp_path / "r2" / "nope")

    # an existing output folder is refused before any work, then resumed or replaced on request
    before = {q: q.read_bytes() for q in sorted(out.rglob("*")) if q.is_file()}
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err.strip().splitlines()[-1]
    assert {q: q.read_bytes() for q in sorted(out.rglob("*")) if q.is_file()} == before
    assert main([*args, "--resume", "--no-progress"]) == 0  # same settings: rows reused
    again = [json.loads(ln) for ln in (out / "records.jsonl").read_text().splitlines()]
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in recs]
    four = list(args)
    four[four.index("--n") + 1] = "4"
    assert main([*four, "--overwrite"]) == 0
    assert all(json.loads(ln)["n"] == 4 for ln in (out / "records.jsonl").read_text().splitlines())
    assert sorted(q.name for q in tmp_path.iterdir() if q.name.startswith(".")) == []


@pytest.mark.parametrize(
    "change, words",
    [
        (["--n", "-5"], "--n: -5 is below 0"),
        (["--n", "20000"], "CIFAR-10 has 10000 test images"),
        (["--batch-size", "1"], "--batch-size: 1 is below 2"),
        (["--n", "9"], "a batch of one image"),
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--step-size", "0"], "step_size must be > 0"),
        (["--sets", "clean,foreign"], "made against classifier"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_before_any_work(
    tmp_path, tiny_cifar_dir, tiny_classifier_ckpt, capsys, monkeypatch, change, words
):
    import revlit.evaluate as ev

    clf = tiny_classifier_ckpt
    head = write_head(tmp_path / "head.pt", clf)
    x, y = load_cifar10(tiny_cifar_dir, train=False)
    save_stored_set(tmp_path / "pgd" / "foreign", x[:8].float() / 255, y[:8], torch.arange(8),
                    {"classifier_sha256": "f" * 64})  # fmt: skip
    monkeypatch.setattr(ev, "_run_one", lambda *a, **k: pytest.fail("work started"))
    args = [
        "--classifier", str(clf), "--head", str(head), "--n", "8", "--batch-size", "4",
        "--sets", "clean", "--defenses", "none,reverse", "--data-dir", str(tiny_cifar_dir),
        "--pgd-root", str(tmp_path / "pgd"), "--out", str(tmp_path / "res"),
    ]  # fmt: skip
    for i in range(0, len(change) - 1, 2):  # replace a flag's value, or append the flag
        if change[i] in args:
            args[args.index(change[i]) + 1] = change[i + 1]
            change = change[:i] + change[i + 2 :]
    try:
        rc = main([*args, *change])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "error" in ln]
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "res").exists()


def test_purifier_options_are_the_purifiers_own_defaults():
    """Every ReversePurifier setting is an option with the signature's default (no drift)."""
    from enum import Enum

    from revlit.defenses import SETTINGS, RandomNoise, ReversePurifier
    from revlit.evaluate import build_parser, make_defense

    args = build_parser().parse_args([])
    for name, default in SETTINGS.items():
        assert getattr(args, name) == (default.value if isinstance(default, Enum) else default)
    pur = make_defense(args, "reverse")
    assert isinstance(pur, ReversePurifier)
    assert pur.settings() | {"view_mode": None} == ReversePurifier().settings() | {
        "view_mode": None
    }
    args = build_parser().parse_args(["--eps", "8/255", "--no-lean", "--chunk-size", "64"])
    pur, noise = make_defense(args, "reverse"), make_defense(args, "noise")
    assert (pur.eps, pur.lean, pur.chunk_size) == (8 / 255, False, 64)
    assert isinstance(noise, RandomNoise) and noise.eps == 8 / 255
