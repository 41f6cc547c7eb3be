"""Object stores as cache stores: S3 and S3-compatible services, Google Cloud Storage, Azure Blob.

Importing this package imports obstore (the Rust ``object_store`` crate's bindings); nothing
outside it sees obstore's types or exceptions.
"""

from __future__ import annotations

from .options import ObjectStoreOptions
from .store import ObjectStore

__all__ = ["ObjectStore", "ObjectStoreOptions"]
