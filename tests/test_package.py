"""The package's own surface: its re-exports resolve and are listed, and importing the package (or
the CLI's, which the console script imports before its entry point can catch a Ctrl-C) loads none
of them, nor ``typing``."""

from __future__ import annotations

import json
import subprocess
import sys

import remote_cache
from remote_cache import errors, keys, version


def test_every_re_export_resolves_and_is_listed() -> None:
    for name in remote_cache.__all__:
        home = version if name == "__version__" else keys if hasattr(keys, name) else errors
        expected = version.VERSION if name == "__version__" else getattr(home, name)
        assert getattr(remote_cache, name) is expected, name
        assert name in dir(remote_cache), name


def test_importing_the_packages_loads_nothing_else_of_ours() -> None:
    code = (
        "import json, sys\n"
        "import remote_cache, remote_cache.cli\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('remote_cache') or m == 'typing')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == ["remote_cache", "remote_cache.cli"]


def test_the_entry_point_collects_cycles_less_often_than_python_would() -> None:
    # Loading the tool makes tens of thousands of objects that live as long as it does: the
    # default young generation (700 allocations) went over each of them twice (remote_cache.cli.main).
    code = (
        "import gc, os, sys\n"
        "leave = os._exit\n"
        "def report(code):\n"
        "    sys.stderr.write(f'threshold={gc.get_threshold()[0]} enabled={gc.isenabled()}\\n')\n"
        "    sys.stderr.flush()\n"
        "    leave(code)\n"
        "os._exit = report\n"
        "sys.argv = ['remote-cache', '--version']\n"
        "from remote_cache.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr.splitlines()[-1] == "threshold=100000 enabled=True"
