"""The engine-independent core must not depend on Dagger: checked by import and by source.

The core is ``remote_cache`` and every ``remote_cache/*.py`` outside the ``mod`` package (the
Dagger glue). Importing all of it must leave ``dagger`` out of ``sys.modules``, and no core file
may import ``dagger`` or anything from ``remote_cache.mod``, even lazily inside a function.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "remote_cache"
#: The one sanctioned route from the core to the glue: the runtime's lazy main-object lookup.
LAZY_MAIN_OBJECT = ("__init__.py", "__getattr__")


def core_files() -> list[Path]:
    return sorted(p for p in PACKAGE.glob("*.py"))


def core_modules() -> list[str]:
    return ["remote_cache"] + [
        f"remote_cache.{p.stem}" for p in core_files() if p.stem not in ("__init__", "__main__")
    ]


def test_core_files_exist() -> None:
    assert len(core_files()) > 3, "the core package was not found"


def test_importing_the_core_does_not_import_dagger() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'dagger' or m.startswith('dagger.')"
        " or m.startswith('remote_cache.mod'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [], "importing the core pulled in the Dagger SDK or the glue"


def test_the_import_check_can_fail() -> None:
    # The same probe sees dagger once something imports it: the check above is not vacuous.
    code = "import sys, remote_cache, dagger; print('dagger' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "True"


def _imports(tree: ast.AST) -> list[tuple[str, int, str]]:
    """(imported module, line, enclosing function) for each import in a core file."""
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            here = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, func) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    # Every core file sits directly in remote_cache/: "." is the package itself.
                    parent = "remote_cache" if child.level == 1 else ""
                    base = f"{parent}.{base}".strip(".") if base else parent
                found.append((base, child.lineno, func))
                found.extend((f"{base}.{a.name}", child.lineno, func) for a in child.names)
            visit(child, here)

    visit(tree, "")
    return found


@pytest.mark.parametrize("path", core_files(), ids=lambda p: p.name)
def test_core_source_imports_no_dagger_and_no_glue(path: Path) -> None:
    for name, line, func in _imports(ast.parse(path.read_text())):
        where = f"{path.name}:{line}"
        assert name != "dagger" and not name.startswith("dagger."), f"{where} imports {name}"
        if name == "remote_cache.mod" or name.startswith("remote_cache.mod."):
            assert (path.name, func) == LAZY_MAIN_OBJECT, f"{where} imports the Dagger glue ({name})"


def test_ast_check_catches_imports() -> None:
    bad = "import dagger\nfrom .mod import RemoteCache\ndef f():\n    from dagger import dag\n"
    names = [n for n, _, _ in _imports(ast.parse(bad))]
    assert "dagger" in names and "remote_cache.mod" in names and "dagger.dag" in names
