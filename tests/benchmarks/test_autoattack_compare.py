"""The library comparison: option checks, the summary's intervals and pairs, a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from benchmarks.autoattack_compare import main, parse_args, summarize
from revlit.adaptive_report import wilson_interval
from revlit.io import sha256_file
from revlit.ssl import SSLHead, save_head

HAVE_ZOO = all(importlib.util.find_spec(m) for m in ("pyautoattack", "torchattacks"))


def test_bad_options_exit_2(capsys):
    for argv in (["--rows", "nope"], ["--n", "0"], ["--eot", "0"]):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2
    capsys.readouterr()


def test_summary_intervals_and_paired_differences():
    a = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)  # 5/8
    b = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0], dtype=torch.bool)  # 3/8
    s = summarize({"revlit_bpda_apgd.robust": a, "static_aa_standard.robust": b})
    r = s["rows"]["revlit_bpda_apgd"]
    assert r["accuracy"] == 5 / 8 and r["ci95"] == list(wilson_interval(5, 8))
    (p,) = s["paired"]
    assert (p["a"], p["b"]) == ("revlit_bpda_apgd", "static_aa_standard")
    assert p["difference"] == pytest.approx(2 / 8)
    assert (p["only_defended"], p["only_static"]) == (3, 1)  # images right only in a / only in b


def _head(tmp_path, clf):
    torch.manual_seed(0)
    head = SSLHead(64, 16, 8)
    with torch.no_grad():
        head.train()(torch.randn(32, 64))
    save_head(head.eval(), tmp_path / "head.pt", sha256_file(clf), meta={"loss": "nt_xent"})
    return tmp_path / "head.pt"


def test_tiny_run_writes_per_image_outputs(tmp_path, tiny_cifar_dir, tiny_classifier_ckpt, capsys):
    rows = "revlit_bpda_apgd" + (",aa_rand_bpda,torchattacks_apgd_bpda" if HAVE_ZOO else "")
    out = tmp_path / "cmp"
    args = ["--n", "4", "--iters", "1", "--draws", "2", "--batch-size", "4",
            "--purifier-steps", "1", "--purifier-views", "2", "--rows", rows,
            "--classifier", str(tiny_classifier_ckpt), "--head", str(_head(tmp_path, tiny_classifier_ckpt)),
            "--data-dir", str(tiny_cifar_dir), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    o = torch.load(out / "outputs.pt", weights_only=True)
    for row in rows.split(","):
        assert o[f"{row}.draws"].shape == (2, 4)
        assert torch.equal(o[f"{row}.robust"], o[f"{row}.draws"].all(0) & o[f"{row}.attack_ok"])
    s = json.loads((out / "summary.json").read_text())
    assert s["rows"]["defended_clean"]["n"] == 4 and "machine" in s
    assert main(args) == 2  # the output folder is not empty: nothing overwritten
    assert "not empty" in capsys.readouterr().err
