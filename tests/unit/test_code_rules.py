"""Rules the production code keeps, checked over its source."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "homeclust"


def test_no_assert_statements_guard_production_paths() -> None:
    """``assert`` vanishes under ``python -O`` and an AssertionError is no homeclust error:
    conditions that can happen must raise a HomeclustError with a message."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert found == []
