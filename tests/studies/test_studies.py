"""Every study's quick mode runs end to end (tiny model, tiny data) and writes sane outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from revlit.studies import STUDIES
from revlit.studies.__main__ import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    """One output root per module: the quick assets are built once and reused."""
    return tmp_path_factory.mktemp("studies")


def run_quick(out_dir: Path, study: str, *extra: str) -> tuple[dict, list[dict], str]:
    docs = out_dir / "docs"
    rc = main([study, "--quick", "--quiet", "--out", str(out_dir), "--docs", str(docs), *extra])
    assert rc == 0
    d = out_dir / study
    summary = json.loads((d / f"{study}.json").read_text())
    rows = [json.loads(line) for line in (d / "rows.jsonl").read_text().splitlines()]
    md = (d / f"{study}.md").read_text()
    png = (d / f"{study}.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    assert (docs / f"{study}.png").read_bytes() == png and (docs / f"{study}.md").read_text() == md
    assert summary["study"] == study and summary["wall_seconds"] >= 0 and summary["findings"]
    assert f"n = {summary['settings']['n']} test images" in md and "\n|---|" in md
    assert md.count("\n|") >= 3 and f"({study}.png)" in md
    return summary, rows, md


def test_detection_quick(out_dir):
    summary, rows, _ = run_quick(out_dir, "detection")
    assert {(r["split"], r["negatives"]) for r in rows} == {
        (s, neg) for s in ("l_1", "l_2", "l_inf") for neg in ("batch", "bank")
    }
    for r in rows:
        assert 0.0 <= r["auroc_lo"] <= r["auroc"] <= r["auroc_hi"] <= 1.0
        assert r["n"] == summary["settings"]["n"]


def test_cost_frontier_quick(out_dir):
    summary, rows, _ = run_quick(out_dir, "cost_frontier")
    ref_k, ref_v = summary["settings"]["reference"]
    for split in ("clean", "l_inf"):
        ref = [
            r for r in rows if r["split"] == split and (r["steps"], r["views"]) == (ref_k, ref_v)
        ]
        assert len(ref) == 1 and ref[0]["delta_vs_reference"] == 0.0
        grid = {(r["steps"], r["views"]) for r in rows if r["split"] == split}
        assert len(grid) == len(summary["settings"]["steps_grid"]) * len(
            summary["settings"]["views_grid"]
        )
        assert all(r["passes"] == r["steps"] * r["views"] for r in rows)
        assert all(r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1] for r in rows)
    # --rerender rebuilds the outputs from state.pt without measuring, keeping the timing
    png = out_dir / "cost_frontier" / "cost_frontier.png"
    png.unlink()
    rc = main(["cost_frontier", "--quick", "--quiet", "--out", str(out_dir), "--rerender"])
    assert rc == 0 and png.exists()
    again = json.loads((out_dir / "cost_frontier" / "cost_frontier.json").read_text())
    assert (
        again["wall_seconds"] == summary["wall_seconds"]
        and again["findings"] == summary["findings"]
    )


def test_batch_size_quick(out_dir):
    summary, rows, md = run_quick(out_dir, "batch_size")
    bank = [r for r in rows if r["negatives"] == "bank"]
    batch = [r for r in rows if r["negatives"] == "batch"]
    assert {r["batch_size"] for r in bank} >= {1}  # B = 1 works with the bank
    assert 1 not in {r["batch_size"] for r in batch}  # and is absent for the authors' loss
    assert "n/a (no negatives)" in md
    for split in ("clean", "l_inf"):
        accs = {r["accuracy"] for r in bank if r["split"] == split}
        assert len(accs) == 1  # batch-independent
    assert any("differ between B" in f and " 0 of " in f for f in summary["findings"])


def test_head_batch_quick(out_dir):
    summary, rows, _ = run_quick(out_dir, "head_batch")
    budget = summary["settings"]["budget"]
    assert [r["head_batch"] for r in rows] == summary["settings"]["head_batches"]
    assert all(r["head_steps"] == budget // r["head_batch"] for r in rows)
    assert len({r["head_sha256"] for r in rows}) == len(rows)


def test_loss_functions_quick(out_dir):
    summary, rows, _ = run_quick(out_dir, "loss_functions")
    by = {r["label"]: r for r in rows}
    assert {
        "nt_xent",
        "nt_xent_multi",
        "alignment",
        "nt_xent head, alignment purify",
        "noise",
    } <= set(by)
    # with 2 training views both NT-Xent variants are one head
    assert by["nt_xent"]["head_sha256"] == by["nt_xent_multi"]["head_sha256"]
    assert by["alignment"]["head_sha256"] != by["nt_xent"]["head_sha256"]
    assert all(len(by[k]["clean_defended"]) == 3 for k in ("nt_xent", "alignment"))
    # the alignment loss lies in [0, 4]; the NT-Xent losses are positive
    assert 0.0 <= by["alignment"]["ssl_clean"] <= 4.0 and by["nt_xent"]["ssl_clean"] > 0


def test_every_study_has_a_quick_test():
    names = [n for n in globals() if n.startswith("test_") and n.endswith("_quick")]
    tested = {n[len("test_") : -len("_quick")] for n in names}
    assert tested == set(STUDIES)


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    missing = str(tmp_path / "missing_classifier.pt")
    rc = main(["detection", "--quiet", "--classifier", missing, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("revlit: error: ")
    assert "missing_classifier.pt" in err[0]
    rc = main(["cost_frontier", "--quick", "--quiet", "--out", str(tmp_path), "--reference", "3,7"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        "revlit: error: the reference 3,7 must be on the grid [0, 1, 2] x [2, 3]"
    ]


def test_config_file_sets_defaults_flags_win_unknown_keys_refused(out_dir, tmp_path, capsys):
    cfg = tmp_path / "cost.yaml"
    cfg.write_text("steps-grid: [0, 1]\nviews_grid: 2\nreference: '1,2'\nn: 8\n")
    rc = main(["cost_frontier", "--quick", "--quiet", "--out", str(out_dir), "--config", str(cfg),
               "--n", "6"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out_dir / "cost_frontier" / "cost_frontier.json").read_text())
    s = summary["settings"]
    assert (s["steps_grid"], s["views_grid"], s["reference"], s["n"]) == ([0, 1], [2], [1, 2], 6)
    cfg.write_text("stepz: 3\n")
    capsys.readouterr()
    rc = main(["cost_frontier", "--quick", "--quiet", "--out", str(out_dir), "--config", str(cfg)])
    assert rc == 2 and "unknown option 'stepz'" in capsys.readouterr().err
