"""pytest configuration for the whole checkout.

This file is also the top-level ``*.py`` that the v0.21.8 Python runtime looks for before it
loads a module (``Glob("src/**/*.py|*.py")`` in ``sdk/python/runtime/discovery.go``): the root
module's package lives in ``remote_cache/``, not ``src/``, so without a top-level Python file
the engine would stop with "no python files found in module source".
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "engine: needs a reachable Dagger engine; skipped with the reason where there is none"
    )
