"""The package layout's rules, checked on the source: processes start and stop in one place."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"
PROCESS_MODULE = PACKAGE / "command.py"

pytestmark = pytest.mark.timeout(30)


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` names in the file, at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.add(node.module)
    return found


def test_only_the_process_module_imports_subprocess() -> None:
    offenders = sorted(
        str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py")
        if path != PROCESS_MODULE
        and any(m == "subprocess" or m.startswith("subprocess.") for m in imported_modules(path)))
    assert offenders == [], f"import subprocess outside gateway/command.py: {offenders}"


def test_the_check_sees_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import subprocess as sp\n    from subprocess import run\n")
    assert imported_modules(probe) == {"subprocess"}
    assert "subprocess" in imported_modules(PROCESS_MODULE)
