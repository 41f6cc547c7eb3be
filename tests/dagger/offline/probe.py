"""Run inside a module's venv: find the main object and register it, offline.

Usage: ``python probe.py SCHEMA.graphqls OUT.json`` from the module's source dir, with the env
the runtime sets. Does what ``runtime --register`` does (``dagger.mod.cli.main``): connect,
``load_module()`` through ``get_entry_point()``, ``Module.register()``; the connection is an
:class:`~offline.session.OfflineSession`. Writes the decoded module and every query to OUT.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio

from offline.session import OfflineSession, install, load_schema
from offline.typedefs import decode_module


async def main(schema_path: Path, out: Path) -> None:
    session = OfflineSession(load_schema(schema_path))
    install(session)

    import dagger
    from dagger.mod import cli

    with tempfile.TemporaryDirectory() as tmp:
        typedef_file = Path(tmp) / "module.json"
        os.environ["DAGGER_MODULE_FILE"] = str(typedef_file)
        # _module reads DAGGER_MODULE_FILE at import time; point the constant at our file.
        import dagger.mod._module as module_impl

        module_impl.TYPE_DEF_FILE = str(typedef_file)  # type: ignore[misc]
        async with await dagger.connect():
            ep = cli.get_entry_point()
            mod = cli.load_module()
            await mod.register()
        module_id = json.loads(typedef_file.read_text())

    result = {
        "entry_point": ep.value,
        "main_name": mod._main_name,
        "main_class": f"{mod.main_cls.__module__}.{mod.main_cls.__qualname__}",
        "dagger_modules": sorted(m for m in sys.modules if m == "dagger" or m.startswith("dagger.")),
        "module": decode_module(session, module_id),
        "queries": [{"text": r.text, "errors": list(r.errors)} for r in session.recorded],
    }
    out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    anyio.run(main, Path(sys.argv[1]), Path(sys.argv[2]))
