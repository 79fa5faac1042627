"""``make demo`` / ``python -m revlit.demo``: one definition of the default N, one-line refusals."""

from __future__ import annotations

import re
from pathlib import Path

from revlit.demo import DEMO_N, main

REPO = Path(__file__).resolve().parents[1]


def test_make_demo_leaves_the_default_n_to_the_python_module():
    text = (REPO / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    assert "revlit.demo" in recipe and "$(if $(N),--n $(N))" in recipe
    assert not re.search(r"^N\s*[?:]?=", text, re.M)  # no second default of N
    assert DEMO_N >= 2


def test_bad_n_and_missing_checkpoint_are_refused(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["--n", "1"])
    assert e.value.code == 2
    assert main(["--classifier", str(tmp_path / "none.pt")]) == 2
    assert "none.pt not found" in capsys.readouterr().err


def test_a_bad_batch_is_refused_in_one_line_before_any_attack_set(capsys, monkeypatch):
    import pytest

    import revlit.demo as demo

    monkeypatch.setattr(demo, "_cli", lambda *a, **k: pytest.fail("an attack set was started"))
    for args, words in (
        (["--n", "9", "--batch-size", "4"], "a batch of one image"),
        (["--batch-size", "1"], "--batch-size: 1 is below 2"),
        (["--batch-size", "x"], "'x' is not an integer"),
    ):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err
