"""``python -m remote_cache``: the same as the ``remote-cache`` command."""

from __future__ import annotations

from .cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
