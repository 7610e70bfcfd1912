"""Rules of docs/DESIGN.md that a tool can check: short functions in the library, a repository that speaks
of the product only."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80


def _functions(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node.name, node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("folder", ["plugin", "graph_passes"])
def test_no_function_over_80_lines(folder):
    long = [f"{p}:{name} ({n} lines)" for p, name, n in _functions(folder) if n > MAX_FUNCTION_LINES]
    assert not long, f"split these (or name the exception and why in docs/DESIGN.md): {long}"


# Words about how and where the product was built, not what it does (spelt in pieces so that this file
# does not match itself).
_BUILD_TALK = "|".join(
    [
        "sess" + r"ion [0-9]",
        "work" + "place",
        "shared " + "machine",
        "GPU " + "machine",
        "/tmp/" + "s[0-9]",
        "see the " + "report",
        "FA" + "CTS",
    ]
)


def test_the_repository_speaks_of_the_product_only():
    try:
        out = subprocess.run(
            ["git", "grep", "-n", "-i", "-E", _BUILD_TALK],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if out.returncode not in (0, 1) or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert out.stdout == "", out.stdout
    assert re.compile(_BUILD_TALK, re.I).search("measured in " + "sess" + "ion 3")  # the pattern bites
