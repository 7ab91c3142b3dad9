"""The package's layering rules, read from the source: the model knows no algorithm."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_model_imports_nothing_of_dummy_forcing():
    files = sorted((ROOT / "dfjax" / "model").glob("*.py"))
    assert files
    bad = {f.name: sorted(m for m in imports(f) if m.startswith(("dfjax.dummy", "dfjax.pipeline", "dfjax.stream")))
           for f in files}
    assert not any(bad.values()), bad
