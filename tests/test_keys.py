"""The key -> tag rule: valid tags stay as they are, everything else gets prefix + hash."""

from __future__ import annotations

import hashlib

import pytest

from remote_cache.errors import InvalidKey
from remote_cache.keys import TAG_PATTERN, is_valid_tag, tag_for_key, validate_key


@pytest.mark.parametrize("key", ["2h", "1d", "npm-linux", "go_1.23-build", "_x", "A" * 128])
def test_valid_tags_are_kept(key: str) -> None:
    assert tag_for_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "npm/linux",
        "node_modules:abc",
        ".hidden",
        "-dash",
        "a" * 129,
        "npm-" + "f" * 300,
        "ключ",
        "pip cache 3.11",
    ],
)
def test_other_keys_become_prefix_plus_hash(key: str) -> None:
    tag = tag_for_key(key)
    assert TAG_PATTERN.fullmatch(tag), tag
    assert len(tag) <= 128
    assert tag.endswith("--" + hashlib.sha256(key.encode()).hexdigest()[:16])


def test_readable_prefix_is_kept() -> None:
    assert tag_for_key("npm/linux").startswith("npm-linux--")
    assert tag_for_key(".cache").startswith("_.cache--")
    long = tag_for_key("npm-" + "0123456789" * 30)
    assert long.startswith("npm-0123456789")


def test_distinct_keys_get_distinct_tags() -> None:
    keys = ["npm/linux", "npm:linux", "npm linux", "npm-linux", "a" * 129, "a" * 130]
    assert len({tag_for_key(k) for k in keys}) == len(keys)


@pytest.mark.parametrize("other", ["npm/linux", "a" * 129, ".x"])
def test_a_key_shaped_like_another_keys_tag_gets_a_tag_of_its_own(other: str) -> None:
    """A valid tag that ends like a hashed one (``--`` and 16 hex digits) is hashed too, so no
    key can take another key's tag (a probe restored one key's entry for another as a hit)."""
    shaped = tag_for_key(other)
    assert is_valid_tag(shaped)
    assert tag_for_key(shaped) not in (shaped, tag_for_key(other))
    assert tag_for_key(shaped).endswith("--" + hashlib.sha256(shaped.encode()).hexdigest()[:16])


def test_deterministic() -> None:
    assert tag_for_key("x/y") == tag_for_key("x/y")


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("", "empty"),
        ("a\nb", "control"),
        ("a\x00", "control"),
        ("k" * 1025, "1025 characters"),
        # C1 controls (a terminal reads U+009B as CSI: '\u009b31m' colours what follows) and the
        # line breaks beyond ASCII: printed raw by ls and in summary lines
        ("csi\u009b31mred", "control"),
        ("a\u0085b", "control"),
        ("a\u2028b", "control"),
        ("a\u2029b", "control"),
    ],
)
def test_invalid_keys_say_why(key: str, fragment: str) -> None:
    with pytest.raises(InvalidKey, match=fragment):
        validate_key(key)
    with pytest.raises(InvalidKey):
        tag_for_key(key)


def test_is_valid_tag() -> None:
    assert is_valid_tag("v1.0")
    assert not is_valid_tag(".v1")
    assert not is_valid_tag("a" * 129)
    assert not is_valid_tag("")
