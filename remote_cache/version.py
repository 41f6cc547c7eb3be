"""Which remote-cache this is: written into every entry it saves and sent as its User-Agent."""

from __future__ import annotations

__all__ = ["TOOL", "VERSION"]

#: The release (also the ``version`` in pyproject.toml).
VERSION = "0.1.0"
#: ``remote-cache/<version>``: the ``dev.remote-cache.tool`` annotation and the User-Agent.
TOOL = f"remote-cache/{VERSION}"
