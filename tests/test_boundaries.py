"""The layers of ``remote_cache`` and their dependency directions, checked by import and by source.

* shared: ``cpus``, ``errors``, ``home``, ``keys``, ``records``, ``units``, ``tasks``,
  ``version`` -- import nothing else of ours;
* ``oci/`` -- the OCI vocabulary and the stores: knows nothing of caches, archives, the CLI or Dagger;
* ``archive/`` -- the archive format: knows nothing of OCI, HTTP, caches, the CLI or Dagger;
* ``cache/`` -- cache semantics over both: knows nothing of the CLI or Dagger;
* ``cli/`` -- the command line: anything but the Dagger glue;
* ``dagger/`` -- the Dagger glue: anything but the CLI.

Everything outside ``dagger/`` is importable without the Dagger SDK (checked by importing it all
in a fresh interpreter), and no file outside ``dagger/`` imports ``dagger`` or the glue, even
lazily inside a function, except the runtime's lazy main-object lookup. ``remote_backend``
imports only public names of ``remote_cache``. Each rule is shown able to fail.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "remote_cache"
BACKEND = ROOT / "remote_backend" / "src" / "remote_backend"
SHARED = {"cpus", "errors", "home", "keys", "records", "units", "tasks", "version"}
#: Layer -> the layers of ours it may import (besides itself and the shared modules).
ALLOWED: dict[str, set[str]] = {
    "shared": set(),
    "oci": set(),
    "archive": set(),
    "cache": {"oci", "archive"},
    "cli": {"oci", "archive", "cache"},
    "dagger": {"oci", "archive", "cache"},
    "package": set(),  # remote_cache/__init__.py and __main__.py: see EXCEPTIONS
}
#: Third-party packages a layer must not import.
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "shared": {"dagger", "typer", "rich"},
    "oci": {"dagger", "typer", "rich", "zstandard"},
    "archive": {"dagger", "typer", "rich"},
    "cache": {"dagger", "typer", "rich"},
    "cli": {"dagger"},
    "dagger": {"typer", "rich"},
    "package": {"dagger", "typer", "rich"},
}
#: Packages no layer imports: the registry client is http.client (oci/registry/threaded.py),
#: httpx measured slower; record classes are msgspec Structs (records.py): a dataclass is compiled
#: when its module is imported, which every command paid for.
FORBIDDEN_EVERYWHERE = {"httpx", "dataclasses"}
#: (file, enclosing function, imported layer) allowed anyway: the runtime finds the main object
#: as `remote_cache:RemoteCache`, and `python -m remote_cache` runs the CLI.
EXCEPTIONS = {("__init__.py", "__getattr__", "dagger"), ("__main__.py", "", "cli")}


def layer_of(module: str) -> str:
    """The layer a ``remote_cache...`` module belongs to."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__init__", "__main__"):
        return "package"
    return "shared" if parts[1] in SHARED else parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imports(source: str, module: str, is_package: bool) -> list[tuple[str, int, str]]:
    """(imported module or name, line, enclosing function) for every import in ``source``."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            here = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, func) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base]) if base else ".".join(anchor)
                found.append((base, child.lineno, func))
                found.extend((f"{base}.{a.name}", child.lineno, func) for a in child.names)
            visit(child, here)

    visit(ast.parse(source), "")
    return found


def violations(path_name: str, module: str, source: str, is_package: bool) -> list[str]:
    """Every import in ``source`` (of ``module``) that breaks the layer rules."""
    layer = layer_of(module)
    bad: list[str] = []
    for name, line, func in imports(source, module, is_package):
        top = name.split(".")[0]
        where = f"{module} line {line}"
        if top in FORBIDDEN_THIRD_PARTY[layer] | FORBIDDEN_EVERYWHERE:
            bad.append(f"{where}: the {layer} layer imports {name}")
        if top != "remote_cache" or name in ("remote_cache", "remote_cache.__version__"):
            continue
        target = layer_of(name)
        if target in (layer, "shared") or target in ALLOWED[layer]:
            continue
        if (path_name, func, target) in EXCEPTIONS:
            continue
        bad.append(f"{where}: the {layer} layer imports {name} (layer {target})")
    return bad


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path) -> None:
    module = module_name(path)
    assert violations(path.name, module, path.read_text(), path.name == "__init__.py") == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("remote_cache.archive.pack", "from ..oci.media import OCI_LAYER_ZSTD\n", "layer oci"),
        ("remote_cache.archive.pack", "import httpx\n", "imports httpx"),
        ("remote_cache.oci.descriptor", "from dataclasses import dataclass\n", "imports dataclasses"),
        ("remote_cache.oci.registry.transport", "def f():\n    import httpx\n", "imports httpx"),
        ("remote_cache.oci.store", "def f():\n    from ..cache import save\n", "layer cache"),
        ("remote_cache.oci.registry.store", "from ...archive.tar import Member\n", "layer archive"),
        ("remote_cache.cache.save", "from ..cli.app import app\n", "layer cli"),
        ("remote_cache.cache.save", "def f():\n    import dagger\n", "imports dagger"),
        ("remote_cache.units", "from .oci.digest import is_digest\n", "layer oci"),
        ("remote_cache.cli.app", "from ..dagger import sdk\n", "layer dagger"),
        ("remote_cache.dagger.main", "from ..cli.app import app\n", "layer cli"),
        ("remote_cache", "from .dagger import RemoteCache\n", "layer dagger"),  # only lazily
    ],
)
def test_layer_check_can_fail(module: str, source: str, expected: str) -> None:
    found = violations("x.py", module, source, module == "remote_cache")
    assert found and all(expected in f for f in found), found


def test_relative_imports_resolve_from_nested_packages() -> None:
    names = [
        n
        for n, _, _ in imports(
            "from ...errors import X\nfrom . import y\n", "remote_cache.oci.registry.store", False
        )
    ]
    assert names == [
        "remote_cache.errors",
        "remote_cache.errors.X",
        "remote_cache.oci.registry",
        "remote_cache.oci.registry.y",
    ]


def test_importing_everything_but_the_glue_does_not_import_dagger() -> None:
    modules = [module_name(p) for p in package_files() if layer_of(module_name(p)) != "dagger"]
    assert "remote_cache.oci.registry.transport" in modules and "remote_cache.cli.commands" in modules
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'dagger' or m.startswith('dagger.')"
        " or m.startswith('remote_cache.dagger'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [], "importing the core or the CLI pulled in the Dagger SDK or the glue"


def test_the_import_check_can_fail() -> None:
    # The same probe sees dagger once something imports it: the check above is not vacuous.
    code = "import sys, remote_cache, dagger; print('dagger' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "True"


def undeclared(sources: dict[str, tuple[str, bool]], declared: set[str]) -> list[str]:
    """Third-party packages ``sources`` (module -> source, is a package) import whose distributions
    ``declared`` (normalised names) lacks: a Dagger module's runtime installs only what
    pyproject.toml declares (docs/engine.md)."""
    dists = importlib.metadata.packages_distributions()
    missing = set()
    for module, (source, is_package) in sources.items():
        for name, _line, _func in imports(source, module, is_package):
            top = name.split(".")[0]
            if not top or top in sys.stdlib_module_names or top in ("remote_cache", "__future__"):
                continue
            names = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
            if not names & declared:
                missing.add(f"{module} imports {top} ({', '.join(sorted(names))})")
    return sorted(missing)


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["aws"]]
    return {re.split(r"[\s<>=!~;\[]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_every_package_the_core_imports_is_declared() -> None:
    sources = {module_name(p): (p.read_text(), p.name == "__init__.py") for p in package_files()}
    assert undeclared(sources, _declared()) == []


def test_the_declaration_check_can_fail() -> None:
    source = "import msgspec\nfrom obstore import store\n"
    found = undeclared({"remote_cache.records": (source, False)}, _declared() - {"msgspec"})
    assert found == ["remote_cache.records imports msgspec (msgspec)"]


def private_uses(source: str) -> list[str]:
    """Names of ``remote_cache`` that ``source`` imports and that are private (a ``_`` segment)."""
    found = []
    for name, _line, _func in imports(source, "remote_backend.x", False):
        if name.split(".")[0] == "remote_cache" and any(
            part.startswith("_") and part != "__version__" for part in name.split(".")
        ):
            found.append(name)
    return found


@pytest.mark.parametrize("path", sorted(BACKEND.rglob("*.py")), ids=lambda p: p.name)
def test_remote_backend_uses_only_public_names(path: Path) -> None:
    assert private_uses(path.read_text()) == []


def test_private_name_check_can_fail() -> None:
    source = "from remote_cache.dagger import _toolbox\nfrom remote_cache.oci.reference import _invalid\n"
    assert private_uses(source) == ["remote_cache.dagger._toolbox", "remote_cache.oci.reference._invalid"]
    assert private_uses("from remote_cache import __version__\n") == []


#: The files where a foreign client's names and exceptions may appear: everything else sees ours.
CLIENT_BOUNDARIES = {
    "obstore": {"oci/objectstore/calls.py", "oci/objectstore/client.py", "oci/objectstore/errors.py"},
    "urllib3": {"oci/registry/proxytls.py"},
}


def client_leaks(rel: str, source: str) -> list[str]:
    """Imports of a foreign client outside its boundary files."""
    return [
        f"{rel} line {line} imports {name}"
        for name, line, _func in imports(source, "remote_cache.x", False)
        for client, allowed in CLIENT_BOUNDARIES.items()
        if name.split(".")[0] == client and rel not in allowed
    ]


@pytest.mark.parametrize("path", [*package_files(), *sorted(BACKEND.rglob("*.py"))], ids=str)
def test_foreign_clients_stop_at_their_boundary(path: Path) -> None:
    rel = str(path.relative_to(PACKAGE)) if path.is_relative_to(PACKAGE) else path.name
    assert client_leaks(rel, path.read_text()) == []


def test_client_boundary_check_can_fail() -> None:
    assert client_leaks("oci/objectstore/store.py", "from obstore.exceptions import BaseError\n") == [
        "oci/objectstore/store.py line 1 imports obstore.exceptions",
        "oci/objectstore/store.py line 1 imports obstore.exceptions.BaseError",
    ]
    assert client_leaks("cache/save.py", "def f():\n    import obstore\n") == [
        "cache/save.py line 2 imports obstore"
    ]
