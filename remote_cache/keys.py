"""Cache keys and the one rule that turns a key into an OCI tag.

A tag is ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`` (distribution spec). The rule:

* a key that already is a valid tag is used unchanged (so ``2h`` stays ``2h`` and ttl.sh
  still reads it as an expiry, and ``npm-`` prefixes still list as prefixes), unless it ends as
  a hashed tag does (``--`` and 16 lowercase hex digits): it could be another key's tag;
* any other key becomes a readable prefix (invalid characters replaced by ``-``, a leading
  ``.``/``-`` prefixed with ``_``, cut to 109 characters) plus ``--`` and the first 16 hex
  digits of the key's SHA-256. Two different keys can only share a tag through a hash
  collision; the original key is also recorded in the image's annotations, and a lookup takes
  an entry under a hashed tag that records another key for a miss.

Keys must be non-empty, at most 1024 characters, with no control characters (C0, C1, U+2028/9).
Restore keys (prefixes to fall back to, as in actions/cache) follow the same rules.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from .errors import InvalidKey

__all__ = [
    "MAX_KEY_LENGTH",
    "TAG_PATTERN",
    "is_valid_tag",
    "printable",
    "tag_for_key",
    "tag_prefix_for",
    "validate_key",
    "validate_restore_keys",
]

TAG_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_KEY_LENGTH = 1024
_PREFIX_LENGTH = 109  # 109 + len("--") + 16 hex digits = 127 <= 128
_INVALID = re.compile(r"[^A-Za-z0-9._-]")
#: C0 and C1 controls (a terminal reads U+009B as CSI) and the two line breaks beyond them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_HASHED_END = re.compile(r"--[0-9a-f]{16}\Z")


def is_valid_tag(tag: str) -> bool:
    """True when ``tag`` is a valid OCI tag."""
    return TAG_PATTERN.fullmatch(tag) is not None


def validate_key(key: str) -> str:
    """Return ``key`` if it can be stored, else raise :class:`InvalidKey` saying why."""
    if not key:
        raise InvalidKey("the cache key is empty: pass a non-empty key such as 'npm-linux'")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(
            f"the cache key is {len(key)} characters long; keep it under {MAX_KEY_LENGTH} "
            "(hash long inputs such as lockfiles first)"
        )
    if _CONTROL.search(key):
        raise InvalidKey(f"the cache key {key!r} contains control characters; remove them")
    return key


def printable(text: str) -> str:
    """``text`` with the control characters keys may not hold written as escapes (``\\x9b``): a
    key or a message read from a store (an entry another version or tool wrote) reaches CI logs
    and terminals, on one line."""
    return _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)


def validate_restore_keys(prefixes: Iterable[str]) -> list[str]:
    """The restore keys as a list if each can be a key prefix, else :class:`InvalidKey` saying why."""
    checked = list(prefixes)
    for prefix in checked:
        if not prefix:
            raise InvalidKey("a restore key is empty; pass a prefix such as 'npm-' (or none at all)")
        validate_key(prefix)
    return checked


def tag_for_key(key: str) -> str:
    """The tag that stores ``key``: the key itself when a valid tag not shaped like a hashed one,
    else prefix + hash."""
    validate_key(key)
    if is_valid_tag(key) and not _HASHED_END.search(key):
        return key
    prefix = _INVALID.sub("-", key)
    if not re.match(r"[A-Za-z0-9_]", prefix):
        prefix = "_" + prefix
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return f"{prefix[:_PREFIX_LENGTH]}--{digest}"


def tag_prefix_for(prefix: str) -> str:
    """What the tag of every key starting with ``prefix`` starts with (lets a prefix search list tags).

    Valid keys are their own tag; others keep a sanitised, cut readable prefix; both start with
    the prefix's sanitised form cut to the readable-prefix length. Not every tag starting with it
    holds a matching key (sanitising merges characters): confirm with the key annotation.
    """
    if not prefix:
        return ""
    sanitised = _INVALID.sub("-", prefix)
    if not re.match(r"[A-Za-z0-9_]", sanitised):
        sanitised = "_" + sanitised
    return sanitised[:_PREFIX_LENGTH]
