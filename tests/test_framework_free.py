"""The algorithms (attacks, losses, SSL, defenses, models) never import Lightning, even indirectly."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FREE = ("attacks", "losses", "ssl", "defenses", "models")
#: revlit modules that are (or import) the framework layer
FRAMEWORK = ("pytorch_lightning", "lightning", "revlit.callbacks", "revlit.modules", "revlit.cli")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_framework_import_anywhere_in_the_algorithms_source():
    """Also imports inside functions (a lazy import is still an import)."""
    bad = [
        f"{path.relative_to(REPO)}: {name}"
        for pkg in FREE
        for path in sorted((REPO / "revlit" / pkg).rglob("*.py"))
        for name in _imports(path)
        if name.split(".")[0] in ("pytorch_lightning", "lightning")
        or name.startswith(FRAMEWORK[2:])
    ]
    assert not bad, bad


def test_importing_every_algorithm_module_loads_no_framework():
    mods = [
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for pkg in FREE
        for p in sorted((REPO / "revlit" / pkg).rglob("*.py"))
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in "
        "('pytorch_lightning', 'lightning', 'lightning_fabric')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=240)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout[:500]
