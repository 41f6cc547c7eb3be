"""Run inside remote-backend's venv: call the Registry's export or import as the engine would.

Usage: ``python export_probe.py SCHEMA.graphqls IN.json OUT.json`` (working directory: where the
function's runtime workdir stands). IN holds ``op`` (``export`` or ``import``), ``address``,
``repo``, ``key``, ``username``/``password`` (optional), ``tree`` (the directory the engine would
hand over) and ``busybox``. The engine's calls are answered from ``tree`` on disk
(:mod:`offline.engine_stub`); everything else -- the module's code, the core it runs, the
registry it talks to -- is real. OUT gets the queries sent and, for ``import``, the chain of the
directory returned.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio

from offline.engine_stub import exec_stdout_answer, export_answer
from offline.session import OfflineSession, install, load_schema


async def main(schema_path: Path, spec_path: Path, out: Path) -> None:
    spec: dict[str, Any] = json.loads(spec_path.read_text())
    session = OfflineSession(load_schema(schema_path))
    exported: list[str] = []
    session.answers["Directory.export"] = export_answer(Path(spec["tree"]), exported)
    session.answers["Container.stdout"] = exec_stdout_answer(spec["busybox"], Path(spec["tree"]))
    if spec.get("password"):
        session.answers["Secret.plaintext"] = spec["password"]
    install(session)

    import dagger
    from dagger import dag

    from remote_backend import RemoteBackend

    result: dict[str, Any] = {}
    async with await dagger.connect():
        password = dag.set_secret("registry-password", spec["password"]) if spec.get("password") else None
        registry = RemoteBackend().registry(
            address=spec["address"], repo=spec["repo"], username=spec.get("username", ""), password=password
        )
        if spec["op"] == "export":
            await registry.export(spec["key"], dag.directory())
        else:
            got = await registry.import_(spec["key"])
            result["imported"] = [str(step) for step in session.chain_of(await got.id())]
            result["from"] = [
                str(step.args["address"]) for step in session.chain_of(await got.id()) if step.name == "from"
            ]
    result["exported_to"] = exported
    result["queries"] = [r.text for r in session.recorded if "setSecret" not in r.text]
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    anyio.run(main, Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
