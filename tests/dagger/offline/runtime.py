"""Do what the v0.21.8 Python runtime does to load a module, minus the engine.

``sdk/python/runtime`` (main.go, discovery.go, python.go): copy the module's upload set, drop
``.venv``/``sdk``, install with ``uv pip install -e ./sdk -e .`` then ``uv pip check`` (no
``uv.lock``), set ``DAGGER_DEFAULT_PYTHON_PACKAGE``/``DAGGER_MAIN_OBJECT``, and run the SDK's
entry point with ``--register``. Substitution: ``./sdk`` is the SDK generated for the engine's
schema at load time; here it is ``dagger-io==0.21.8`` from PyPI (the same client, generated from
the same schema, without the bindings of the module's dependencies).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .upload import ModuleUpload, copy_upload, module_upload

__all__ = [
    "DEFAULT_BASE_IMAGE",
    "SDK_REQUIREMENT",
    "LoadedModule",
    "base_image",
    "has_python_files",
    "install_module",
    "normalize_object_name",
    "normalize_package_name",
    "normalize_project_name",
    "register_module",
    "runtime_names",
]

SDK_REQUIREMENT = "dagger-io==0.21.8"
PROBE = Path(__file__).resolve().with_name("probe.py")


def _words(name: str) -> list[str]:
    # iancoleman/strcase splits on separators and on lower->upper / letter->digit changes.
    return re.findall(r"[A-Z]+(?=[A-Z][a-z]|\b|[^A-Za-z]|$)|[A-Z]?[a-z]+|[A-Z]+|\d+", name)


def normalize_object_name(name: str) -> str:
    """python.go ``NormalizeObjectName`` (``strcase.ToCamel``): ``remote-cache`` -> ``RemoteCache``."""
    return "".join(w[:1].upper() + w[1:] for w in re.split(r"[\s_.\-]+", name) if w)


def normalize_project_name(name: str) -> str:
    """python.go ``NormalizeProjectNameFromModule``: PascalCase, then kebab, then PEP 503."""
    kebab = "-".join(w.lower() for w in _words(normalize_object_name(name)))
    kebab = re.sub(r"[._-]+", "-", kebab.lower())
    return re.sub(r"[^a-z0-9-]+", "", kebab).strip("-")


def normalize_package_name(project_name: str) -> str:
    """python.go ``NormalizePackageName``: ``-`` becomes ``_``."""
    return project_name.replace("-", "_")


def runtime_names(module_dir: Path) -> dict[str, str]:
    """The env the runtime sets (``WithSource``): ``DAGGER_MODULE``, package, main object."""
    config = json.loads((module_dir / "dagger.json").read_text())
    mod_name = str(config["name"])
    project = normalize_project_name(mod_name)
    pyproject = module_dir / "pyproject.toml"
    if pyproject.is_file():
        # discovery.go loadConfig: an existing project name wins, used as is.
        project = tomllib.loads(pyproject.read_text()).get("project", {}).get("name") or project
    return {
        "DAGGER_MODULE": mod_name,
        "DAGGER_DEFAULT_PYTHON_PACKAGE": normalize_package_name(project),
        "DAGGER_MAIN_OBJECT": normalize_object_name(mod_name),
    }


#: ``sdk/python/runtime/images/base/Dockerfile`` at v0.21.8 (``FROM python:3.14-slim@sha256:486b8092...``).
DEFAULT_BASE_IMAGE = "python:3.14-slim"


def base_image(module_dir: Path) -> str:
    """The image the runtime runs the module on (discovery.go ``parseBaseImage``, digest left out):
    ``[tool.dagger] base-image``, else ``.python-version``, else a ``>=X``/``==X`` requires-python
    as ``python:X-slim`` (``findPythonVersion``), else the default."""
    pyproject = module_dir / "pyproject.toml"
    config = tomllib.loads(pyproject.read_text()) if pyproject.is_file() else {}
    explicit = config.get("tool", {}).get("dagger", {}).get("base-image")
    if explicit:
        return str(explicit)
    version_file = module_dir / ".python-version"
    version = version_file.read_text().strip() if version_file.is_file() else ""
    if not version:
        minimum = str(config.get("project", {}).get("requires-python", "")).strip()
        if minimum.startswith(("==", ">=")):
            version = minimum[2:].strip()
    return f"python:{version}-slim" if version else DEFAULT_BASE_IMAGE


def has_python_files(source_files: list[str]) -> bool:
    """discovery.go's ``Glob("src/**/*.py|*.py")`` check, read as intended: ``src/**`` or top level.

    (Read literally with v0.21.8's patternmatcher, ``|`` is escaped and the glob matches
    nothing, which would fail every module; the engine evidently doesn't behave that way.)
    """
    return any(f.endswith(".py") and (f.startswith("src/") or "/" not in f) for f in source_files)


@dataclass(frozen=True)
class LoadedModule:
    """A module copied from its upload set and installed into its own venv."""

    upload: ModuleUpload
    module_dir: Path  #: the module's source dir inside the copy (the runtime's workdir)
    python: Path  #: the venv's interpreter
    env: dict[str, str]  #: what the runtime puts in the environment


def _uv() -> str:
    candidate = Path(sys.executable).with_name("uv")
    return str(candidate) if candidate.exists() else "uv"


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def _clean_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "UV_", "DAGGER_"))
    }
    if cache := os.environ.get("UV_CACHE_DIR"):
        env["UV_CACHE_DIR"] = cache
    return env


def install_module(module_dir: Path, workdir: Path, *, python: str = "3.11") -> LoadedModule:
    """Copy ``module_dir``'s upload set under ``workdir`` and install it like the runtime."""
    upload = module_upload(module_dir)
    copied = copy_upload(upload, workdir / "context")
    env = _clean_env()
    venv = workdir / "venv"
    _run([_uv(), "venv", "--quiet", "--python", python, str(venv)], copied, env)
    env["VIRTUAL_ENV"] = str(venv)
    _run([_uv(), "pip", "install", "--quiet", SDK_REQUIREMENT, "-e", "."], copied, env)
    _run([_uv(), "pip", "check"], copied, env)
    return LoadedModule(upload, copied, venv / "bin" / "python", runtime_names(copied))


def register_module(loaded: LoadedModule, schema: Path, out: Path) -> dict[str, Any]:
    """Run the SDK's main-object lookup and registration offline in the module's venv."""
    env = _clean_env() | loaded.env | {"VIRTUAL_ENV": str(loaded.python.parent.parent)}
    proc = subprocess.run(
        [str(loaded.python), str(PROBE), str(schema), str(out)],
        cwd=loaded.module_dir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"registration failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result
