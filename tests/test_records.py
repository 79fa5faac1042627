"""The JSON result record: every field present, validated, rendered as a table."""

from __future__ import annotations

import json

import pytest

from revlit.records import (
    FIELDS,
    attack_from_meta,
    load_record,
    make_record,
    markdown_table,
    save_jsonl,
    save_record,
    validate_record,
)

STORED_META = {
    "name": "resnet20_at_l_inf",
    "norm": "l_inf",
    "eps": 8 / 255,
    "step_size": 2 / 255,
    "steps": 10,
    "restarts": 1,
    "loss": "ce",
    "classifier_sha256": "c" * 64,
    "files_sha256": {"images.pt": "x"},
}


def record(**over) -> dict:
    kw = dict(
        classifier={"path": "checkpoints/resnet20_at.pt", "sha256": "c" * 64, "arch": "resnet20"},
        head={"path": "checkpoints/resnet20_at_head.pt", "sha256": "h" * 64},
        data={"split": "resnet20_at_l_inf", "n": 100},
        attack=attack_from_meta("resnet20_at_l_inf", STORED_META),
        defense={"method": "reverse", "norm": "l_inf", "eps": 16 / 255, "steps": 40, "n_views": 4,
                 "batch_size": 128, "seed": 0},
        n=100,
        accuracy=0.42,
        loss=1.5,
        ssl_loss_before=3.0,
        ssl_loss_after=2.5,
        seconds_per_image=0.2,
        passes_per_image=325,
        wall_seconds_per_image=0.25,
    )  # fmt: skip
    kw.update(over)
    return make_record(**kw)


def test_record_carries_every_field_and_round_trips(tmp_path):
    rec = record()
    assert list(FIELDS) == [f for f in FIELDS if f in rec] and set(rec) == set(FIELDS)
    assert rec["commit"] and rec["date"].startswith("20")
    assert rec["attack"]["kind"] == "transfer" and rec["attack"]["steps"] == 10
    assert rec["attack"]["made_for_sha256"] == "c" * 64
    assert "files_sha256" not in rec["attack"]
    p = save_record(rec, tmp_path / "r.json")
    assert load_record(p) == rec
    save_jsonl([rec, rec], tmp_path / "r.jsonl")
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == rec


@pytest.mark.parametrize("field", FIELDS)
def test_every_missing_field_is_refused(field):
    rec = record()
    del rec[field]
    with pytest.raises(ValueError, match=field):
        validate_record(rec)


@pytest.mark.parametrize(
    "over,match",
    [
        ({"accuracy": 1.5}, "accuracy"),
        ({"n": 0}, "n must"),
        ({"defense": {"method": "reverse"}}, "defense"),
        ({"classifier": {"path": "x"}}, "classifier"),
        ({"loss": float("nan")}, "loss"),
    ],
)
def test_malformed_records_are_refused(over, match):
    with pytest.raises(ValueError, match=match):
        record(**over)


def test_clean_attack_and_table():
    clean = attack_from_meta("clean", {"name": "clean"})
    assert clean == {"name": "none", "kind": "none"}
    assert attack_from_meta("x", {**STORED_META, "adaptive": True})["kind"] == "adaptive"
    rows = [
        record(attack=clean, data={"split": "clean", "n": 100}, ssl_loss_after=float("nan")),
        record(),
    ]
    assert rows[0]["ssl_loss_after"] is None  # non-finite -> null, not NaN in JSON
    table = markdown_table(rows).splitlines()
    assert len(table) == 4
    assert "| clean | none | reverse (l_inf 16/255, 40×4 views) | 100 | 42.00 %" in table[2]
    assert "l_inf ε=8/255, 10 steps (transfer)" in table[3]
