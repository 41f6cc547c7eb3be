"""Load each Dagger module the way the v0.21.8 Python runtime does, with no engine.

Upload set (engine) -> copy -> fresh venv -> ``uv pip install dagger-io==0.21.8 -e .`` and
``uv pip check`` (runtime, no uv.lock; ``./sdk`` replaced by the PyPI SDK) -> entry point and
``Module.register()`` in that venv against an offline session validating every query.
The harness itself is first checked against a throwaway module built here.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.dagger.offline.runtime import (
    DEFAULT_BASE_IMAGE,
    LoadedModule,
    base_image,
    has_python_files,
    install_module,
    normalize_object_name,
    normalize_project_name,
    register_module,
    runtime_names,
)
from tests.dagger.offline.session import SCHEMA_FILE
from tests.dagger.offline.upload import Pattern, PatternMatcher, module_upload, rebase_patterns

Load = Callable[[str], tuple[LoadedModule, dict[str, Any]]]


# -- the harness's own pieces --------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("*", "a.py", True),
        ("*", "pkg/a.py", False),
        ("**/*.py", "a/b/c.py", True),
        ("**/*.py", "c.py", True),
        ("remote_cache/**", "remote_cache/dagger/x.py", True),
        ("remote_cache/**", "remote_cachex/y.py", False),
        ("a?c", "abc", True),
        ("a?c", "a/c", False),
        ("**/foo", "foo", True),
        ("**/foo", "xfoo", False),
        ("[ab].txt", "b.txt", True),
        ("src/**/*.py|*.py", "src/a/b.py", False),  # '|' is escaped by v0.21.8's matcher
    ],
)
def test_pattern_port(pattern: str, path: str, expected: bool) -> None:
    assert Pattern(pattern).match(path) is expected


def test_matcher_exclusions_and_reinclusion() -> None:
    pm = PatternMatcher(["dagger.json", "*", "!tests", "tests/keep.py", "!**/*.pyc"])
    files = ["dagger.json", "a/b.py", "a/b.pyc", "tests/x.py", "tests/keep.py", "c"]
    assert pm.select(files) == ["a/b.py", "c", "dagger.json", "tests/keep.py"]


def test_rebase_patterns() -> None:
    assert rebase_patterns(["../pyproject.toml", "!../remote_cache/**/*.pyc"], "remote_backend") == [
        "pyproject.toml",
        "!remote_cache/**/*.pyc",
    ]
    with pytest.raises(ValueError, match="escapes context"):
        rebase_patterns(["../../etc"], "remote_backend")


def test_normalized_names() -> None:
    assert normalize_object_name("remote-cache") == "RemoteCache"
    assert normalize_object_name("remote_backend") == "RemoteBackend"
    assert normalize_project_name("remoteBackend") == "remote-backend"
    assert normalize_project_name("Example") == "example"


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))


TINY_MODULE = '''\
    """A throwaway module for the harness's own test."""

    from typing import Annotated, Protocol

    import dagger
    from dagger import Doc, dag, function, interface, object_type

    from tiny_core import GREETING


    @interface
    class Store(Protocol):
        @function
        async def load(self, key: str) -> dagger.Directory: ...


    @object_type
    class TinyModHelper:
        @function
        def mount(self, ctr: dagger.Container) -> dagger.Container:
            """Mount a cache."""
            return ctr.with_mounted_cache("/cache", dag.cache_volume("tiny"))


    @object_type
    class TinyMod:
        store: Store | None = None

        @function(cache="session")
        def hello(self, name: Annotated[str, Doc("who")] = "world") -> str:
            return f"{GREETING}, {name}"

        @function(cache="never")
        def helper(self, paths: list[str]) -> TinyModHelper:
            return TinyModHelper()
'''


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repo with a module in ``mod/`` that includes a sibling package via ``../``."""
    repo = tmp_path_factory.mktemp("tiny-repo")
    _write(
        repo,
        {
            ".gitignore": "junk/\n*.log\n",
            "tiny_core/pyproject.toml": """\
                [project]
                name = "tiny-core"
                version = "0.1.0"
                [build-system]
                requires = ["hatchling"]
                build-backend = "hatchling.build"
                [tool.hatch.build.targets.wheel]
                packages = ["tiny_core"]
            """,
            "tiny_core/tiny_core/__init__.py": 'GREETING = "hello"\n',
            "tiny_core/tiny_core/secret_notes.txt": "not uploaded\n",
            "unrelated/big.bin": "not uploaded\n",
            "mod/dagger.json": json.dumps(
                {
                    "name": "tiny-mod",
                    "engineVersion": "v0.21.8",
                    "sdk": {"source": "python"},
                    "include": ["../tiny_core/**", "!../tiny_core/**/*.txt"],
                }
            ),
            "mod/pyproject.toml": """\
                [project]
                name = "tiny-mod"
                version = "0.1.0"
                requires-python = ">=3.11"
                dependencies = ["dagger-io", "tiny-core"]
                [tool.uv.sources]
                tiny-core = { path = "../tiny_core", editable = true }
                [build-system]
                requires = ["hatchling"]
                build-backend = "hatchling.build"
                [tool.hatch.build.targets.wheel]
                packages = ["src/tiny_mod"]
            """,
            "mod/src/tiny_mod/__init__.py": TINY_MODULE,
            "mod/junk/ignored.py": "raise SystemExit('gitignored file was uploaded')\n",
            "mod/debug.log": "ignored\n",
            "mod/.venv/bin/python": "dropped by the runtime\n",
        },
    )
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    return repo


def test_upload_set_of_tiny_module(tiny_repo: Path) -> None:
    upload = module_upload(tiny_repo / "mod")
    assert upload.root_subpath == "mod"
    assert upload.source_subpath == "mod"
    assert upload.files == [
        "mod/dagger.json",
        "mod/pyproject.toml",
        "mod/src/tiny_mod/__init__.py",
        "tiny_core/pyproject.toml",
        "tiny_core/tiny_core/__init__.py",
    ]
    assert has_python_files([f.removeprefix("mod/") for f in upload.files if f.startswith("mod/")])
    assert runtime_names(tiny_repo / "mod") == {
        "DAGGER_MODULE": "tiny-mod",
        "DAGGER_DEFAULT_PYTHON_PACKAGE": "tiny_mod",
        "DAGGER_MAIN_OBJECT": "TinyMod",
    }


def test_tiny_module_loads_and_registers(tiny_repo: Path, tmp_path: Path) -> None:
    loaded = install_module(tiny_repo / "mod", tmp_path)
    got = register_module(loaded, SCHEMA_FILE, tmp_path / "out.json")
    assert got["entry_point"] == "tiny_mod:TinyMod"
    mod = got["module"]
    assert set(mod["objects"]) == {"TinyMod", "TinyModHelper"}
    assert set(mod["interfaces"]) == {"Store"}
    assert mod["interfaces"]["Store"]["functions"]["load"]["returns"] == "Directory!"
    hello = mod["objects"]["TinyMod"]["functions"]["hello"]
    assert hello["cache_policy"] == "PerSession"
    assert hello["args"]["name"]["type"] == "String!"  # a default is not nullability
    assert hello["args"]["name"]["default"] == json.dumps("world")
    helper = mod["objects"]["TinyMod"]["functions"]["helper"]
    assert helper["cache_policy"] == "Never"
    assert helper["args"]["paths"]["type"] == "[String!]!"
    assert helper["returns"] == "TinyModHelper!"
    mount = mod["objects"]["TinyModHelper"]["functions"]["mount"]
    assert mount["args"] == {"ctr": mount["args"]["ctr"]} and mount["args"]["ctr"]["type"] == "Container!"
    assert mod["objects"]["TinyMod"]["fields"] == {}
    assert all(not q["errors"] for q in got["queries"]) and len(got["queries"]) > 5


def test_tiny_module_with_broken_import_fails(tiny_repo: Path, tmp_path: Path) -> None:
    # The gitignored junk/ is not uploaded; a module importing from it must fail to load.
    broken = tmp_path / "repo"
    subprocess.run(["cp", "-a", str(tiny_repo), str(broken)], check=True)
    init = broken / "mod/src/tiny_mod/__init__.py"
    init.write_text(init.read_text().replace("from tiny_core import GREETING", "from junk.ignored import X"))
    loaded = install_module(broken / "mod", tmp_path / "work")
    with pytest.raises(AssertionError, match="registration failed"):
        register_module(loaded, SCHEMA_FILE, tmp_path / "out.json")


# -- the project's three modules -------------------------------------------------------------

REAL = ["remote-cache", "remote-backend", "example"]


@pytest.mark.parametrize("name", REAL)
def test_upload_set(name: str) -> None:
    from tests.dagger.conftest import find_module

    upload = module_upload(find_module(name))
    files = set(upload.files)
    prefix = "" if upload.root_subpath == "." else upload.root_subpath + "/"
    assert {prefix + "dagger.json", prefix + "pyproject.toml"} <= files
    assert not any("/sdk/" in f or f.startswith(("sdk/", ".venv/")) or "__pycache__" in f for f in files)
    if name == "remote-cache":
        assert {"remote_cache/__init__.py", "remote_cache/dagger/__init__.py"} <= files
        assert not any(f.startswith(("tests/", "example/", "remote_backend/")) for f in files), files
    if name == "remote-backend":
        # The core comes along through `../` includes, landing where `path = ".."` points.
        assert {"pyproject.toml", "remote_cache/__init__.py", "remote_cache/keys.py"} <= files
        assert not any(f.startswith(("tests/", "example/")) for f in files)


# The root module keeps its package in remote_cache/ (not src/); the top-level conftest.py is
# the *.py file that discovery.go's Glob("src/**/*.py|*.py") needs to find.
@pytest.mark.parametrize("name", ["remote-cache", "remote-backend", "example"])
def test_runtime_python_file_check(name: str) -> None:
    from tests.dagger.conftest import find_module

    upload = module_upload(find_module(name))
    prefix = "" if upload.source_subpath == "." else upload.source_subpath + "/"
    source = [f.removeprefix(prefix) for f in upload.files if f.startswith(prefix)]
    assert has_python_files(source), "discovery.go: 'no python files found in module source'"


@pytest.mark.parametrize("name", ["remote-cache", "remote-backend"])
def test_modules_run_on_python_3_11_slim(name: str) -> None:
    """docs/engine.md relies on it: the core runs in python:3.11-slim (as root, the image's default
    user), not the runtime's default python:3.14-slim."""
    from tests.dagger.conftest import find_module

    assert base_image(find_module(name)) == "python:3.11-slim"


@pytest.mark.parametrize("name", REAL)
def test_modules_install_what_pyproject_declares(name: str) -> None:
    """docs/engine.md relies on it: without a uv.lock or requirements.lock, `dagger call` installs
    a module with `uv pip install -e ./sdk -e .`, resolving the dependencies pyproject.toml declares
    (the core's: tests/test_boundaries.py checks they cover what it imports)."""
    from tests.dagger.conftest import find_module

    root = find_module(name)
    assert (root / "pyproject.toml").is_file()
    assert [f for f in ("uv.lock", "requirements.lock") if (root / f).exists()] == []


def test_base_image_rules(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nrequires-python = "~=3.12"\n')
    assert base_image(tmp_path) == DEFAULT_BASE_IMAGE
    (tmp_path / ".python-version").write_text("3.13\n")
    assert base_image(tmp_path) == "python:3.13-slim"
    (tmp_path / "pyproject.toml").write_text('[tool.dagger]\nbase-image = "acme/py:1"\n')
    assert base_image(tmp_path) == "acme/py:1"


EXPECTED_MAIN = {
    "remote-cache": ("remote_cache:RemoteCache", "RemoteCache"),
    "remote-backend": ("remote_backend:RemoteBackend", "RemoteBackend"),
    "example": ("example:Example", "Example"),
}


@pytest.mark.parametrize("name", REAL)
def test_module_loads_and_registers(name: str, loaded_module: Load) -> None:
    loaded, got = loaded_module(name)
    entry, main = EXPECTED_MAIN[name]
    assert loaded.env["DAGGER_MAIN_OBJECT"] == main
    assert got["entry_point"] == entry and got["main_name"] == main
    assert main in got["module"]["objects"]
    assert got["module"]["description"], "the package docstring becomes the module's description"
    assert all(not q["errors"] for q in got["queries"])


def _fn(got: dict[str, Any], obj: str, fn: str) -> dict[str, Any]:
    objects = {**got["module"]["objects"], **got["module"]["interfaces"]}
    assert obj in objects, sorted(objects)
    assert fn in objects[obj]["functions"], sorted(objects[obj]["functions"])
    result: dict[str, Any] = objects[obj]["functions"][fn]
    return result


def test_remote_cache_registration(loaded_module: Load) -> None:
    _, got = loaded_module("remote-cache")
    mount = _fn(got, "RemoteCacheVolume", "mount")
    assert {k: v["type"] for k, v in mount["args"].items()} == {"ctr": "Container!"}
    assert mount["returns"] == "Container!" and mount["cache_policy"] == "PerSession"
    export = _fn(got, "RemoteCache", "export")
    assert {k: v["type"] for k, v in export["args"].items()} == {"ctr": "Container!"}
    assert export["returns"] == "Container!" and export["cache_policy"] == "Never"
    assert "Backend" in got["module"]["interfaces"] and "Backend" not in got["module"]["objects"]
    backend = got["module"]["interfaces"]["Backend"]["functions"]
    assert set(backend) == {"resolve", "import", "export"}
    assert backend["import"]["returns"] == "Directory!"
    assert backend["resolve"]["returns"] == "String!"
    assert {k: v["type"] for k, v in backend["resolve"]["args"].items()} == {
        "key": "String!",
        "restore_keys": "[String!]!",
    }
    volume = _fn(got, "RemoteCache", "cache_volume")
    assert volume["returns"] == "RemoteCacheVolume!"
    assert volume["args"]["restore_keys"]["type"] == "[String!]"
    # The switches are constructor arguments of the main object (dag.remote_cache(backend, ...)).
    # (The SDK registers Python names; the engine camel-cases them: restoreKeys, readOnly, ...)
    ctor = got["module"]["objects"]["RemoteCache"]["constructor"]
    assert {k: v["type"] for k, v in ctor["args"].items()} == {
        "backend": "Backend!",
        "strict": "Boolean!",
        "read_only": "Boolean!",
        "max_size": "String!",
        "timeout": "Int!",
    }


@pytest.mark.parametrize("backend_type", ["Registry", "S3Bucket"])
def test_backends_match_the_backend_interface(loaded_module: Load, backend_type: str) -> None:
    _, cache = loaded_module("remote-cache")
    _, backend = loaded_module("remote-backend")
    iface = cache["module"]["interfaces"]["Backend"]["functions"]
    for fn in ("resolve", "import", "export"):
        impl = _fn(backend, backend_type, fn)
        want = iface[fn]
        assert impl["returns"] == want["returns"], fn
        assert {k: v["type"] for k, v in impl["args"].items()} == {
            k: v["type"] for k, v in want["args"].items()
        }
    assert _fn(backend, backend_type, "import")["cache_policy"] == "PerSession"
    assert _fn(backend, backend_type, "resolve")["cache_policy"] == "PerSession"
    assert _fn(backend, backend_type, "export")["cache_policy"] == "Never"
    grace = {"grace": "String!"} if backend_type == "S3Bucket" else {}
    # Only a registry deletes a manifest with every tag naming it (copies): see Registry.remove.
    copies = {"with_copies": "Boolean!"} if backend_type == "Registry" else {}
    housekeeping = {
        "entries": {"prefix": "String!", "json": "Boolean!"},
        "remove": {"key": "String!", **grace, **copies},
        "prune": {
            "older_than": "String!", "keep": "Int!", "prefix": "String!", "dry_run": "Boolean!", **grace
        },
    }  # fmt: skip
    for fn, args in housekeeping.items():
        got = _fn(backend, backend_type, fn)
        assert got["cache_policy"] == "Never" and got["returns"] == "String!", fn
        assert {k: v["type"] for k, v in got["args"].items()} == args, fn


def test_backend_constructors(loaded_module: Load) -> None:
    _, backend = loaded_module("remote-backend")
    registry = _fn(backend, "RemoteBackend", "registry")
    assert registry["returns"] == "Registry!"
    assert registry["args"]["password"]["type"] == "Secret"
    assert registry["args"]["immutable"]["type"] == "Boolean!"
    s3 = _fn(backend, "RemoteBackend", "s3")
    assert s3["returns"] == "S3Bucket!"
    assert {k: v["type"] for k, v in s3["args"].items()} == {
        "bucket": "String!", "prefix": "String!", "region": "String!", "endpoint": "String!",
        "access_key_id": "Secret", "secret_access_key": "Secret", "session_token": "Secret",
        "compression": "ImageLayerCompression!", "immutable": "Boolean!", "plain_http": "Boolean!",
        "sse": "String!", "sse_kms_key_id": "String!", "storage_class": "String!",
    }  # fmt: skip


def test_example_registration(loaded_module: Load) -> None:
    _, got = loaded_module("example")
    for fn in ("check_cache", "prime_cache"):  # the SDK registers Python names
        _fn(got, "Example", fn)


def _cli_flag(name: str) -> str:
    """The flag ``dagger call`` makes of a function argument: the SDK registers the Python name,
    the CLI kebab-cases it (``cmd/dagger/module_inspect.go`` ``cliName``: ``strcase.ToKebab``)."""
    return "--" + name.replace("_", "-")


def _readme_backend_calls(readme: str) -> list[list[str]]:
    """The README's ``dagger call -m ./remote_backend ...`` commands, split into words (without
    ``-m`` and the module), continuation lines joined and comments cut."""
    import shlex

    text = readme.replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        if line.startswith("dagger call -m ./remote_backend "):
            calls.append(shlex.split(line.split(" #")[0])[4:])
    return calls


def test_the_readme_names_only_flags_the_backend_module_has(loaded_module: Load) -> None:
    """Every flag in the README's ``dagger call`` examples of the backend module, and in its
    mentions of a backend function with a flag (``remove --with-copies``, which the core's
    refusal names too), is one the loaded module has, spelled as the CLI spells it; a Boolean
    takes no value."""
    import re

    _, backend = loaded_module("remote-backend")
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    calls = _readme_backend_calls(readme)
    assert len(calls) >= 4, calls
    for words in calls:
        obj, fn, i = "RemoteBackend", words[0], 1
        flags = {_cli_flag(n): a["type"] for n, a in _fn(backend, obj, fn)["args"].items()}
        while i < len(words):
            word = words[i]
            if word == "...":  # the constructor's flags, given in the line before
                i += 1
            elif word.startswith("--"):
                assert word in flags, (words, word, sorted(flags))
                i += 1 if flags[word] == "Boolean!" else 2
            else:  # the next function, on the object the last one returned
                obj, fn = _fn(backend, obj, fn)["returns"].rstrip("!"), word
                flags = {_cli_flag(n): a["type"] for n, a in _fn(backend, obj, fn)["args"].items()}
                i += 1
    mentions = re.findall(r"`(remove|prune|entries) (--[a-z-]+)", readme)
    assert ("remove", "--with-copies") in mentions
    for fn, flag in mentions:
        names = {_cli_flag(n) for obj in ("Registry", "S3Bucket") for n in _fn(backend, obj, fn)["args"]}
        assert flag in names, (fn, flag)
