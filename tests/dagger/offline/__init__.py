"""Offline verification of the Dagger modules: upload set, runtime install, registration, queries.

No engine runs here. ``upload`` computes what the engine would upload for a module, ``runtime``
installs that copy the way the v0.21.8 Python runtime does and runs registration in it,
``session`` is the offline engine session (validate against the pinned schema, record, answer
from a small table) and ``typedefs`` decodes what a module registered.
"""
