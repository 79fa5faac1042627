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
