"""The user's home directory, where there is one (the per-user files we read live under it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["home"]


def home(environ: Mapping[str, str] | None = None) -> Path | None:
    """``$HOME``, else the password database's entry for this user; None where there is neither
    (a container running as a uid with no entry and no HOME): no per-user files then."""
    env = os.environ if environ is None else environ
    if env.get("HOME"):
        return Path(env["HOME"])
    try:
        return Path.home()
    except (RuntimeError, KeyError):  # "Could not determine home directory."
        return None
