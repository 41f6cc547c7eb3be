"""Decode what a Python module registered, from the queries the SDK's ``Module._typedefs`` built.

Registration ends with ``await dag.module().with_object(<TypeDef ID>)...id()``; each ID is one
the offline session minted, so expanding the IDs walks the ``typeDef``/``withObject``/
``withFunction``/``withArg`` calls back into a plain, JSON-able description.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .session import OfflineSession, Step

__all__ = ["decode_module", "render_type"]

_KINDS = {
    "STRING_KIND": "String",
    "INTEGER_KIND": "Int",
    "FLOAT_KIND": "Float",
    "BOOLEAN_KIND": "Boolean",
    "VOID_KIND": "Void",
}


def _steps(session: OfflineSession, id_: str, root: str) -> list[Step]:
    chain = session.chain_of(id_)
    if not chain or chain[0].name != root:
        raise AssertionError(f"ID {id_} was not built from Query.{root}: {[str(s) for s in chain]}")
    return list(chain[1:])


def render_type(session: OfflineSession, id_: str) -> str:
    """A TypeDef ID as GraphQL-ish text: ``String!``, ``Container``, ``[String!]!``."""
    name, optional = "?", False
    for step in _steps(session, id_, "typeDef"):
        if step.name == "withKind":
            name = _KINDS.get(str(step.args["kind"]), str(step.args["kind"]))
        elif step.name in ("withObject", "withInterface", "withEnum", "withScalar"):
            name = str(step.args["name"])
        elif step.name == "withListOf":
            name = f"[{render_type(session, str(step.args['elementType']))}]"
        elif step.name == "withOptional":
            optional = bool(step.args["optional"])
    return name if optional else name + "!"


def _function(session: OfflineSession, id_: str) -> dict[str, Any]:
    chain = session.chain_of(id_)
    assert chain[0].name == "function", chain
    fn: dict[str, Any] = {
        "name": chain[0].args["name"],
        "returns": render_type(session, str(chain[0].args["returnType"])),
        "args": {},
        "cache_policy": None,
        "time_to_live": None,
        "description": "",
    }
    for step in chain[1:]:
        if step.name == "withArg":
            fn["args"][step.args["name"]] = {
                "type": render_type(session, str(step.args["typeDef"])),
                "default": step.args.get("defaultValue"),
                "description": step.args.get("description", ""),
                "default_path": step.args.get("defaultPath"),
                "ignore": step.args.get("ignore"),
            }
        elif step.name == "withCachePolicy":
            fn["cache_policy"] = step.args["policy"]
            fn["time_to_live"] = step.args.get("timeToLive")
        elif step.name == "withDescription":
            fn["description"] = step.args["description"]
        else:
            fn.setdefault("flags", []).append(step.name)
    return fn


def _typedef(session: OfflineSession, id_: str) -> dict[str, Any]:
    obj: dict[str, Any] = {"kind": "?", "name": "?", "functions": {}, "fields": {}, "constructor": None}
    for step in _steps(session, id_, "typeDef"):
        if step.name in ("withObject", "withInterface", "withEnum"):
            obj["kind"] = step.name.removeprefix("with").lower()
            obj["name"] = step.args["name"]
            obj["description"] = step.args.get("description", "")
        elif step.name == "withFunction":
            fn = _function(session, str(step.args["function"]))
            obj["functions"][fn["name"]] = fn
        elif step.name == "withConstructor":
            obj["constructor"] = _function(session, str(step.args["function"]))
        elif step.name == "withField":
            obj["fields"][step.args["name"]] = render_type(session, str(step.args["typeDef"]))
        elif step.name == "withEnumMember":
            obj.setdefault("members", []).append(step.args["name"])
    return obj


def decode_module(session: OfflineSession, module_id: str) -> dict[str, Any]:
    """The module registered under ``module_id``: description, objects, interfaces, enums."""
    out: dict[str, Any] = {"description": "", "objects": {}, "interfaces": {}, "enums": {}}
    steps: Sequence[Step] = _steps(session, module_id, "module")
    for step in steps:
        if step.name == "withDescription":
            out["description"] = step.args["description"]
        elif step.name in ("withObject", "withInterface", "withEnum"):
            arg = {"withObject": "object", "withInterface": "iface", "withEnum": "enum"}[step.name]
            td = _typedef(session, str(step.args[arg]))
            out[{"withObject": "objects", "withInterface": "interfaces", "withEnum": "enums"}[step.name]][
                td["name"]
            ] = td
    return out
