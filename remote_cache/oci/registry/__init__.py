"""An OCI registry repository as a store: transport, auth, retries and wire errors, one file each.

The HTTP client is the standard library's (:mod:`.threaded`); nothing outside this package sees
its exceptions.
"""

from __future__ import annotations

from .store import RegistryStore
from .timeouts import Timeouts
from .transport import RegistryTransport

__all__ = ["RegistryStore", "RegistryTransport", "Timeouts"]
