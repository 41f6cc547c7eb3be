"""Rules on rendered queries for engine semantics the schema cannot see (docs/engine.md).

* :func:`subpath_problem`: a directory handed to ``publish``, ``withRootfs``, ``export`` or a
  backend must be a whole snapshot (a fresh directory, a root filesystem, a mount's content),
  never a non-root sub-path of another directory: ``publish`` exports snapshots and ignores the
  sub-path (``core/container.go``, ``getVariantRefs``), so such a directory ships its parent.
* :func:`auth_address_problem`: ``withRegistryAuth`` takes a registry host, not a repository
  (``auth/registry.go``, ``parseAuthAddress`` maps ``registry:5000/acme/x`` to ``docker.io``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Any

from .session import OfflineSession, Step

__all__ = ["auth_address_problem", "handed_directories", "subpath_problem"]


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
