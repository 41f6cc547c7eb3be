"""An offline stand-in for the Dagger SDK's engine session: it validates and records queries.

The SDK builds every query lazily (``dagger/client/_core.py``: ``Context.select`` appends a
``Field``, ``Context.build`` turns the chain into a gql DSL document using the schema from
``conn.session.get_schema()``, ``Context.execute`` sends it with ``conn.session.execute``).
:func:`install` puts an :class:`OfflineSession` on the SDK's shared connection (the one ``dag``
uses), so module code runs unchanged: each query it executes is validated against the pinned
schema with ``graphql.validate``, recorded, and answered from a small explicit table. IDs are
minted as ``offline:N`` and remember the selection chain that produced them, so a test can
expand any ID back into the calls that built the object.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import graphql
from gql.transport.exceptions import TransportQueryError

__all__ = [
    "SCHEMA_FILE",
    "Answer",
    "NoAnswer",
    "OfflineSession",
    "Recorded",
    "Step",
    "install",
    "load_schema",
    "query_error",
    "uninstall",
]

#: The pinned engine's schema, vendored beside the harness.
SCHEMA_FILE = Path(__file__).resolve().parents[1] / "schema-v0.21.8.graphqls"

#: An answer is a constant, or a function of (args of the field, the chain up to it).
Answer = Any | Callable[[dict[str, Any], "tuple[Step, ...]"], Any]


class NoAnswer(LookupError):
    """A query asked for a value the canned table does not have: add it explicitly."""


@dataclass(frozen=True)
class Step:
    """One selected field: the type it is selected on, its name, its (Python-valued) arguments."""

    on: str
    name: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        inner = ", ".join(f"{k}: {v!r}" for k, v in self.args.items())
        return f"{self.on}.{self.name}({inner})"


@dataclass(frozen=True)
class Recorded:
    """One executed query: its text, the chain of steps to its leaf, and validation errors."""

    text: str
    chain: tuple[Step, ...]
    leaves: tuple[str, ...]
    errors: tuple[str, ...]


def load_schema(path: Path = SCHEMA_FILE) -> graphql.GraphQLSchema:
    """Parse the pinned ``.graphqls`` into a schema usable by the SDK's DSL and by ``validate``."""
    return graphql.build_schema(path.read_text())


def query_error(message: str, path: Sequence[str] = ()) -> TransportQueryError:
    """An error the SDK turns into ``dagger.QueryError``, like the engine's failed field."""
    return TransportQueryError(message, errors=[{"message": message, "path": list(path)}])


def _is_false_rejection(error: graphql.GraphQLError) -> bool:
    # graphql-core rejects `node(id:) { ... on SomeInterface }` when no object type implements
    # the interface in the schema; the engine's validator accepts it (see the SDK's
    # _session.py, which turns client-side validation off for this reason). Only that is waived.
    return error.message.startswith("Fragment cannot be spread here as objects of type 'Node'")


class OfflineSession:
    """A ``ClientSession`` look-alike: schema from the ``.graphqls``, queries recorded not sent."""

    def __init__(
        self,
        schema: graphql.GraphQLSchema | None = None,
        answers: Mapping[str, Answer] | None = None,
    ) -> None:
        self.schema = schema or load_schema()
        self.answers: dict[str, Answer] = dict(answers or {})
        self.recorded: list[Recorded] = []
        self.ids: dict[str, tuple[Step, ...]] = {}
        #: Called with each new ID and its expanded chain (an engine stand-in acts on some).
        self.on_mint: list[Callable[[str, tuple[Step, ...]], None]] = []
        self._counter = itertools.count(1)

    # -- the ClientSession surface the SDK uses ------------------------------------------
    async def start(self) -> OfflineSession:
        return self

    def has_session(self) -> bool:
        return True

    async def get_schema(self) -> graphql.GraphQLSchema:
        return self.schema

    async def close(self) -> None:
        return None

    async def execute(self, request: Any) -> dict[str, Any]:
        """Validate, record and answer one query (a ``gql.GraphQLRequest``)."""
        document: graphql.DocumentNode = request.document
        errors = tuple(
            e.message for e in graphql.validate(self.schema, document) if not _is_false_rejection(e)
        )
        op = document.definitions[0]
        assert isinstance(op, graphql.OperationDefinitionNode)
        chain: list[Step] = []
        leaves: list[str] = []
        self._walk(op.selection_set, self.schema.query_type, chain, leaves)
        self.recorded.append(Recorded(graphql.print_ast(document), tuple(chain), tuple(leaves), errors))
        if errors:
            raise AssertionError(
                "invalid query against the v0.21.8 schema:\n"
                + "\n".join(errors)
                + "\n"
                + graphql.print_ast(document)
            )
        return self._answer(op.selection_set, self.schema.query_type, ())

    # -- helpers -------------------------------------------------------------------------
    def _fields(
        self, selection_set: graphql.SelectionSetNode, parent: Any
    ) -> Iterator[tuple[graphql.FieldNode, Any]]:
        for sel in selection_set.selections:
            if isinstance(sel, graphql.FieldNode):
                yield sel, parent
            elif isinstance(sel, graphql.InlineFragmentNode):
                assert sel.type_condition is not None
                yield from self._fields(
                    sel.selection_set, self.schema.get_type(sel.type_condition.name.value)
                )

    def _step(self, node: graphql.FieldNode, parent: Any) -> Step:
        args = {a.name.value: graphql.value_from_ast_untyped(a.value) for a in node.arguments or ()}
        return Step(parent.name, node.name.value, args)

    def _walk(
        self, sset: graphql.SelectionSetNode, parent: Any, chain: list[Step], leaves: list[str]
    ) -> None:
        fields = list(self._fields(sset, parent))
        if len(fields) == 1 and fields[0][0].selection_set is not None:
            node, on = fields[0]
            chain.append(self._step(node, on))
            assert node.selection_set is not None
            self._walk(node.selection_set, self._field_type(on, node), chain, leaves)
            return
        for node, on in fields:
            if node.selection_set is None:
                chain_leaf = self._step(node, on)
                leaves.append(str(chain_leaf))
        if len(fields) == 1:
            chain.append(self._step(*fields[0]))

    def _field_type(self, parent: Any, node: graphql.FieldNode) -> Any:
        name = node.name.value
        if name == "__typename":
            return graphql.GraphQLString
        return graphql.get_named_type(parent.fields[name].type)

    def _answer(self, sset: graphql.SelectionSetNode, parent: Any, chain: tuple[Step, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for node, on in self._fields(sset, parent):
            key = node.alias.value if node.alias else node.name.value
            step = self._step(node, on)
            here = (*chain, step)
            if node.selection_set is not None:
                field_def = on.fields[node.name.value]
                if isinstance(graphql.get_nullable_type(field_def.type), graphql.GraphQLList):
                    items = self._lookup(on.name, node.name.value, dict(step.args), here)
                    out[key] = [
                        self._answer(
                            node.selection_set, self._field_type(on, node), (*here, Step("[]", str(i)))
                        )
                        for i in range(int(items))
                    ]
                else:
                    out[key] = self._answer(node.selection_set, self._field_type(on, node), here)
            elif (
                graphql.get_named_type(on.fields[node.name.value].type).name == "ID"
                and f"{on.name}.{node.name.value}" not in self.answers
            ):
                # `id` and `sync` both stand for the object they are selected on.
                out[key] = self.mint(chain)
            else:
                out[key] = self._lookup(on.name, node.name.value, dict(step.args), here)
        return out

    def _lookup(self, type_name: str, field_name: str, args: dict[str, Any], chain: tuple[Step, ...]) -> Any:
        for key in (f"{type_name}.{field_name}", field_name):
            if key in self.answers:
                answer = self.answers[key]
                return answer(args, self.expand(chain)) if callable(answer) else answer
        raise NoAnswer(f"no canned answer for {type_name}.{field_name}: add one to the session's table")

    def mint(self, chain: tuple[Step, ...]) -> str:
        """A fresh ID standing for the object that ``chain`` selects."""
        new = f"offline:{next(self._counter)}"
        self.ids[new] = tuple(chain)
        for hook in self.on_mint:
            hook(new, self.expand(chain))
        return new

    def expand(self, chain: Sequence[Step]) -> tuple[Step, ...]:
        """Replace a leading ``node(id:)`` by the chain that made that ID, recursively."""
        if chain and chain[0].name == "node" and str(chain[0].args.get("id", "")) in self.ids:
            return (*self.expand(self.ids[str(chain[0].args["id"])]), *chain[1:])
        return tuple(chain)

    def chain_of(self, id_: str) -> tuple[Step, ...]:
        """The expanded chain of calls behind an ID minted here."""
        return self.expand(self.ids[id_])


def install(session: OfflineSession) -> None:
    """Make the SDK's shared connection (used by ``dag`` and every default ``Context``) offline."""
    from dagger.client._session import SharedConnection

    conn = SharedConnection()
    conn._session = session  # type: ignore[assignment]


def uninstall() -> None:
    """Detach the offline session from the shared connection."""
    from dagger.client._session import SharedConnection

    SharedConnection()._session = None
