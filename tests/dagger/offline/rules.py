"""Rules on rendered queries for engine semantics the schema cannot see (docs/engine.md).

* :func:`subpath_problem`: a directory handed to ``publish``, ``withRootfs``, ``export`` or a
  backend must be a whole snapshot (a fresh directory, a root filesystem, a mount's content),
  never a non-root sub-path of another directory: ``publish`` exports snapshots and ignores the
  sub-path (``core/container.go``, ``getVariantRefs``), so such a directory ships its parent.
* :func:`auth_address_problem`: ``withRegistryAuth`` takes a registry host, not a repository
  (``auth/registry.go``, ``parseAuthAddress`` maps ``registry:5000/acme/x`` to ``docker.io``).
* :func:`workdir_path_problem`: ``currentModule.workdir`` takes a path inside the runtime workdir
  (``core/schema/module.go``, ``currentModuleWorkdir``: ``filepath.IsLocal``, else an error).
* :func:`exec_problem`: a helper exec runs its own argv and fails on a non-zero exit: no
  ``useEntrypoint`` (``withRootfs`` keeps the user's entrypoint; ``core/schema/container.go``,
  ``withExec``: "Ignored by default") and no ``expect`` other than ``SUCCESS``.
* :func:`nonce_problem`: a helper exec over a cache volume carries a fresh value in an env var:
  the engine looks an exec up by its call (``dagql/cache.go``, ``deriveRecipeDigest``), where
  a volume is its ``cacheVolume`` call, not its content.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Any

from .session import OfflineSession, Step

__all__ = [
    "auth_address_problem",
    "exec_problem",
    "handed_directories",
    "nonce_problem",
    "subpath_problem",
    "workdir_path_problem",
]


def _clean(path: Any) -> str:
    return posixpath.normpath("/" + str(path).lstrip("/")) if str(path) not in ("", ".") else "/"


def subpath_problem(session: OfflineSession, chain: Sequence[Step]) -> str | None:
    """Why the directory ``chain`` selects is a non-root sub-path of another one; None if it is not."""
    steps = session.expand(chain)
    for i in range(len(steps) - 1, -1, -1):
        step = steps[i]
        if step.on == "Directory" and step.name != "directory":
            continue  # an operation on a directory keeps where it came from
        if step.name != "directory":
            return None  # Query.directory, Container.rootfs, Host.directory, a workdir, ...
        path = _clean(step.args.get("path", "/"))
        if path == "/":
            return None
        if step.on == "Directory":
            return f"{step} takes a sub-path of another directory"
        mounted = [
            s for s in steps[:i] if s.name == "withMountedDirectory" and _clean(s.args.get("path")) == path
        ]
        if mounted:
            return None  # the mount's whole content
        return f"{step} is a sub-path of the container's root filesystem, not a mount"
    return None


def handed_directories(session: OfflineSession) -> list[tuple[str, tuple[Step, ...]]]:
    """Every directory a recorded query hands to ``withRootfs`` or exports: (what, its chain)."""
    found: list[tuple[str, tuple[Step, ...]]] = []
    for rec in session.recorded:
        steps = session.expand(rec.chain)
        for i, step in enumerate(steps):
            if step.name == "withRootfs" and "directory" in step.args:
                found.append((str(step), session.chain_of(str(step.args["directory"]))))
            if step.on == "Directory" and step.name == "export":
                found.append((str(step), steps[:i]))
    return found


def auth_address_problem(session: OfflineSession) -> str | None:
    """The first ``withRegistryAuth`` whose address is not a bare host[:port]; None if none."""
    for rec in session.recorded:
        for step in session.expand(rec.chain):
            if step.name == "withRegistryAuth" and "/" in str(step.args.get("address", "")):
                return f"{step} passes a repository where the engine wants the registry host"
    return None


def _is_local(path: str) -> bool:
    """Go's ``filepath.IsLocal`` on a POSIX path: non-empty, relative, never above its start."""
    clean = posixpath.normpath(path) if path else ""
    return bool(path) and not path.startswith("/") and clean != ".." and not clean.startswith("../")


def workdir_path_problem(session: OfflineSession) -> str | None:
    """The first ``currentModule.workdir`` whose path the engine refuses; None if none."""
    for rec in session.recorded:
        for step in session.expand(rec.chain):
            workdir = step.on == "CurrentModule" and step.name == "workdir"
            if workdir and not _is_local(str(step.args["path"])):
                return f"{step} is not a path inside the runtime workdir (filepath.IsLocal)"
    return None


def exec_problem(session: OfflineSession) -> str | None:
    """The first ``withExec`` that applies an entrypoint or accepts a failure; None if none."""
    for rec in session.recorded:
        for step in session.expand(rec.chain):
            if step.name != "withExec":
                continue
            if step.args.get("useEntrypoint"):
                return f"{step} prepends the container's entrypoint"
            if step.args.get("expect", "SUCCESS") != "SUCCESS":
                return f"{step} does not fail on a non-zero exit"
    return None


def nonce_problem(session: OfflineSession, env: str) -> str | None:
    """The first helper exec (one after a ``withRootfs``) over a cache volume without ``env`` set
    since that ``withRootfs``; None if none."""
    for rec in session.recorded:
        steps = session.expand(rec.chain)
        for i, step in enumerate(steps):
            if step.name != "withExec" or not any(s.name == "withMountedCache" for s in steps[:i]):
                continue
            roots = [j for j in range(i) if steps[j].name == "withRootfs"]
            if roots and not any(
                s.name == "withEnvVariable" and s.args.get("name") == env for s in steps[roots[-1] : i]
            ):
                return f"{step} runs over a cache volume with no {env}: the engine may answer it from cache"
    return None
