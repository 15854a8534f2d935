"""The arrows point down: every import of every module, lazy ones included, is checked.

``shared`` holds what both sides use and imports neither ``api`` nor ``worker`` (nor the
``lookalike`` command that wires them); ``api`` never reaches ``worker``, torch or
transformers (the front end stays light); ``worker`` never reaches ``api``. Only the command
package, ``lookalike``, imports from all of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "shared", "worker", "lookalike")
FORBIDDEN = {
    "shared": {"api", "worker", "lookalike"},
    "api": {"worker", "lookalike", "torch", "transformers"},
    "worker": {"api", "lookalike"},
    "lookalike": set(),
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, anywhere in the file (inside functions too)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(package: str) -> list[str]:
    forbidden = FORBIDDEN[package]
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imports_of(path):
            if module.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_points_up(package: str) -> None:
    assert violations(package) == []


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from worker.engine import get_engine\n    import torch\n")
    assert imports_of(module) == [(2, "worker.engine"), (3, "torch")]
