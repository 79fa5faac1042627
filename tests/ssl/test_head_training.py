"""The one reader of a head's training record (loss, temperature, views mode)."""

from __future__ import annotations

import pytest

from revlit.ssl import HEAD_DEFAULTS, head_training


@pytest.mark.parametrize(
    "meta, want",
    [
        ({"loss": "nt_xent_multi", "temperature": 0.5}, ("nt_xent_multi", 0.5, "shared")),
        ({"loss": {"name": "alignment", "temperature": 0.1}}, ("alignment", 0.1, "shared")),
        ({"loss_temperature": 0.3, "view_mode": "per_sample"}, ("nt_xent", 0.3, "per_sample")),
        ({"views": {"mode": "per_sample"}}, ("nt_xent", 0.2, "per_sample")),
        ({"views": "SimCLRViews(size=32, mode=per_sample)"}, ("nt_xent", 0.2, "per_sample")),
        ({"views_mode": "per_sample"}, ("nt_xent", 0.2, "per_sample")),
        ({}, ("nt_xent", 0.2, "shared")),
    ],
)
def test_reads_every_spelling_of_the_record(meta, want):
    rec = head_training({"meta": meta})
    assert (rec["loss"], rec["temperature"], rec["view_mode"]) == want


def test_without_defaults_only_what_the_record_states():
    assert head_training({"meta": {"loss": "nt_xent_multi"}}, defaults=False) == {
        "loss": "nt_xent_multi"
    }
    assert head_training({}, defaults=False) == {}
    assert head_training({"meta": None}) == HEAD_DEFAULTS
