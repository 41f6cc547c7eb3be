"""Credential files as ``docker login`` and the containers tools write them (docker's config.json,
auth.json): shared by the credential tests of the core and of the console script."""

from __future__ import annotations

import base64
import json
from pathlib import Path

__all__ = ["auth", "auths", "write"]


def auth(username: str, password: str) -> str:
    """An ``auths`` entry's ``auth`` field: base64 of ``username:password``."""
    return base64.b64encode(f"{username}:{password}".encode()).decode()


def auths(host: str, username: str, password: str) -> dict[str, object]:
    """A credential file's content with one entry, for ``host``."""
    return {"auths": {host: {"auth": auth(username, password)}}}


def write(path: Path, content: str | dict[str, object]) -> Path:
    """Write ``content`` (text as it is, a dict as JSON) to ``path``, making its directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path
