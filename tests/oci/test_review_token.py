"""Review probe: a token realm answering JSON nested too deeply to parse."""

from __future__ import annotations

import pytest

from remote_cache.errors import RegistryAuthError
from remote_cache.oci.registry.auth import Authenticator
from remote_cache.oci.registry.timeouts import Timeouts
from tests.stores import DEEP_JSON


def test_a_token_answer_nested_too_deeply_is_no_usable_token() -> None:
    """Like a tag list, manifest or error body (commit 2780ba7), a token realm's answer nested too
    deeply to parse is one that is not JSON: "sent no usable token", not RecursionError."""
    auth = Authenticator("registry.example", None, plain_http=False, send=None, timeouts=Timeouts())  # type: ignore[arg-type]
    with pytest.raises(RegistryAuthError, match="no usable token"):
        auth._parse_token(DEEP_JSON[:1_000_000])
