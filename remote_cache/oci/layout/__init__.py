"""The local OCI image layout store (``oci:DIR``): no server, readable by skopeo and umoci."""

from __future__ import annotations

from .store import LayoutStore

__all__ = ["LayoutStore"]
