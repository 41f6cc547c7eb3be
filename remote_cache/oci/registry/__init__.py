"""An OCI registry repository as a store: transport, auth, retries and wire errors, one file each.

Importing this package imports httpx; nothing outside it sees httpx's types or exceptions.
"""

from __future__ import annotations

import sys
import types

# httpx's package imports its command-line client (httpx._main) when click is installed, and with
# it click, rich and pygments: 0.2 s of every command that talks to a registry, measured with
# ``-X importtime`` in an environment where something else brought click. An empty stand-in
# makes that import fail, which httpx expects (it then defines a stub ``main``); httpx itself
# never uses its CLI. A real httpx._main imported first is left alone.
sys.modules.setdefault("httpx._main", types.ModuleType("httpx._main"))

from .store import RegistryStore  # noqa: E402 - after the stand-in
from .timeouts import Timeouts  # noqa: E402
from .transport import RegistryTransport  # noqa: E402

__all__ = ["RegistryStore", "RegistryTransport", "Timeouts"]
