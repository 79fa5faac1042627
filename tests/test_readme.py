"""The README's Python example runs as written (fewer purifier steps), on the shipped checkpoints."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from revlit.data.cifar import default_data_dir, find_batches

ROOT = Path(__file__).resolve().parents[1]
#: the example's purifier line, and the same with fewer steps (seconds instead of a minute)
PURIFIER = "ReversePurifier(classifier=net, head=head)"
FEWER_STEPS = "ReversePurifier(classifier=net, head=head, steps=2, n_views=2)"


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_has_one_short_python_example():
    (block,) = readme_python_blocks()
    code = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith(("import", "from"))]
    assert len(code) <= 12, "\n".join(code)
    assert PURIFIER in block  # the line the next test shortens


@pytest.mark.skipif(
    find_batches(default_data_dir()) is None, reason="CIFAR-10 is not at $REVLIT_DATA_DIR"
)
def test_the_readme_example_purifies_and_classifies(monkeypatch):
    (block,) = readme_python_blocks()
    monkeypatch.chdir(ROOT)  # the example names the shipped checkpoints by relative path
    ns: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.replace(PURIFIER, FEWER_STEPS), "README.md", "exec"), ns)
    x, x_adv, x_def, y = ns["x"], ns["x_adv"], ns["x_def"], ns["y"]
    assert x.shape == x_def.shape == (8, 3, 32, 32) and y.shape == (8,)
    # the attack stays in its ball, the repair in the purifier's, both inside the image box
    assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6
    assert float((x_def - x_adv).abs().max()) <= 16 / 255 + 1e-6
    assert 0 <= float(x_def.min()) and float(x_def.max()) <= 1
    assert not torch.equal(x_def, x_adv)  # the purifier moved the images
    printed = re.findall(r"\d+", out.getvalue())
    assert out.getvalue().startswith("correct, attacked:") and len(printed) == 2
    assert all(0 <= int(n) <= 8 for n in printed)
