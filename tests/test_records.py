"""Record classes: secrets stay out of ``repr`` and identity leaves out what only describes a record,
as the dataclasses they replaced had it per field (``remote_cache/records.py``)."""

from __future__ import annotations

import pytest
from msgspec import Struct
from rich.pretty import pretty_repr

from remote_cache.cache.entries import Entry, Match
from remote_cache.cli.app import Common
from remote_cache.oci.credentials import Credentials
from remote_cache.oci.descriptor import Descriptor, Platform
from remote_cache.oci.objectstore import ObjectStoreOptions
from remote_cache.records import compared, hiding

_DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("record", "secrets", "shown_values"),
    [
        (Credentials("alice", "pw-1", identity_token="tok-2"), ["pw-1", "tok-2"], ["alice"]),
        (
            ObjectStoreOptions(
                region="eu-west-3", access_key_id="AKIA-3", secret_access_key="sk-4", session_token="st-5"
            ),
            ["AKIA-3", "sk-4", "st-5"],
            ["eu-west-3"],
        ),
        (Common(username="bob", password="pw-6"), ["pw-6"], ["bob"]),
    ],
    ids=["Credentials", "ObjectStoreOptions", "Common"],
)
def test_secrets_stay_out_of_repr(record: Struct, secrets: list[str], shown_values: list[str]) -> None:
    # repr, and rich's pretty printer (tracebacks' locals too), which reads __rich_repr__ first
    for text in (repr(record), pretty_repr(record), str(record)):
        assert not [s for s in secrets if s in text], text
        assert all(v in text for v in shown_values), text
        assert text.startswith(f"{type(record).__name__}(")


def test_hiding_reads_as_a_dataclass_repr() -> None:
    show_all, _ = hiding()
    assert (
        show_all(Platform("linux", "arm64", "v8"))
        == "Platform(os='linux', architecture='arm64', variant='v8')"
    )
    show_some, rich_fields = hiding("os", "variant")
    assert show_some(Platform()) == "Platform(architecture='amd64')"
    assert rich_fields(Platform()) == [("architecture", "amd64")]


def test_a_descriptor_is_its_media_type_digest_and_size() -> None:
    plain = Descriptor("application/vnd.oci.image.manifest.v1+json", _DIGEST, 42)
    described = Descriptor(plain.media_type, _DIGEST, 42, {"a": "b"}, Platform("linux", "arm64"))
    assert plain == described and hash(plain) == hash(described)
    assert len({plain, described}) == 1
    assert plain != Descriptor(plain.media_type, _DIGEST, 43)
    assert plain != Descriptor("application/vnd.oci.image.index.v1+json", _DIGEST, 42)
    assert compared(described, {"annotations", "platform"}) == (plain.media_type, _DIGEST, 42)


def test_entries_and_matches_leave_out_what_they_carry() -> None:
    layer = Descriptor("application/vnd.oci.image.layer.v1.tar+zstd", _DIGEST, 7)
    entry = Entry("k", "k", _DIGEST, size=1)
    assert entry == Entry("k", "k", _DIGEST, size=1, layers=(layer,)) != Entry("k", "k", _DIGEST, size=2)
    assert hash(entry) == hash(Entry("k", "k", _DIGEST, size=1, layers=(layer,)))
    match = Match("k", "k", _DIGEST, exact=True)
    assert match != Match("k", "k", _DIGEST, exact=False)
    assert "image" not in repr(match) and "unread" not in repr(entry)
    assert entry != ("k", "k", _DIGEST) and match.__eq__(entry) is NotImplemented
