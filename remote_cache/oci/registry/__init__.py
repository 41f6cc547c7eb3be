"""An OCI registry repository as a store: transport, auth, retries and wire errors, one file each.

Importing this package imports httpx; nothing outside it sees httpx's types or exceptions.
"""

from __future__ import annotations

from .store import RegistryStore
from .timeouts import Timeouts
from .transport import RegistryTransport

__all__ = ["RegistryStore", "RegistryTransport", "Timeouts"]
