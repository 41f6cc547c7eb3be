"""Every error the core raises, one tree, each message saying what to do.

RemoteCacheError
├── InvalidKey              a cache key that cannot become a tag
├── InvalidReference        a malformed HOST/REPO:KEY or oci:DIR:KEY
├── InvalidConfigFile       a credentials file or certificate directory named explicitly is unusable
├── CacheMiss               no entry under that key (not a failure)
│   └── BrokenEntry         the key's entry names a document that is gone
├── CacheTooLarge           a directory over the size limit: refused before any upload
├── TreeTooDeep             a directory nested deeper than the archive layer handles
├── UnsuitableTarget        a restore target that cannot work (said before any download)
├── UnfinishedSwap          a target left half-replaced by a swap that could not finish
├── NoSpace                 not enough room where a restore or save writes
├── TreeChanged             a file changed while a save read it
├── StoreError              talking to a store went wrong
│   ├── StoreAuthError      missing or wrong credentials, or not allowed
│   │   └── RegistryAuthError   a registry's 401/403
│   ├── StoreUnreachable    connection refused, DNS, TLS, timeout, a stalled transfer
│   │   └── RegistryUnreachable the registry could not be reached
│   ├── RegistryError       any other error response of a registry (carries code/status)
│   ├── EntryExists         an exclusive write found the tag there already (immutable keys)
│   ├── BlobUnreadable      a document the store holds cannot be read (not a file, not readable)
│   └── UnsupportedOperation the store cannot do that (e.g. no deletes)
├── IntegrityError          a blob or manifest does not match its digest/size
├── UnsafeArchive           an archive tries to escape the target or holds devices
└── ImageFormatError        a manifest/config/layer we cannot read as a cache image
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import quote, quote_plus

from .units import format_bytes, size_above

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "MISS_MARKER",
    "RM_A_BROKEN_ENTRY",
    "BlobUnreadable",
    "BlobsSwept",
    "BrokenEntry",
    "CacheMiss",
    "CacheTooLarge",
    "DeadlineExceeded",
    "EntryExists",
    "ImageFormatError",
    "IntegrityError",
    "Interrupted",
    "InvalidConfigFile",
    "InvalidKey",
    "InvalidReference",
    "NoSpace",
    "NothingToSave",
    "RegistryAuthError",
    "RegistryError",
    "RegistryUnreachable",
    "RemoteCacheError",
    "StoreAuthError",
    "StoreError",
    "StoreStalled",
    "StoreUnreachable",
    "TreeChanged",
    "TreeTooDeep",
    "UnfinishedSwap",
    "UnsafeArchive",
    "UnsuitableTarget",
    "UnsupportedOperation",
    "causes",
    "code_and_message",
    "credentials_to_hide",
    "hidden",
    "hidden_in_traceback",
    "os_reason",
    "remember_secret",
    "unsigned",
    "without_secrets",
]

#: Prefix of a miss message. Errors cross Dagger module boundaries as text only, so a
#: backend signals "no such entry" by raising an error whose message starts with this.
MISS_MARKER = "remote-cache: cache miss:"


class RemoteCacheError(Exception):
    """Base class of every error raised by remote_cache."""


class InvalidKey(RemoteCacheError, ValueError):
    """A cache key that cannot be stored (empty, control characters, too long)."""


class InvalidReference(RemoteCacheError, ValueError):
    """A store reference that does not parse."""


class InvalidConfigFile(RemoteCacheError, ValueError):
    """A file or directory named explicitly (``--authfile``, ``--cert-dir``) is missing or malformed.

    Files found by searching the usual places are never this: they are warned about and skipped.
    """


class CacheMiss(RemoteCacheError):
    """No entry exists under the requested key. Not a failure: the caller starts cold."""

    def __init__(self, key: str, where: str = "", reason: str = "") -> None:
        self.key = key
        self.where = where
        at = f" in {where}" if where else ""
        #: Why there is nothing to restore, for a summary line after the key.
        self.reason = reason or f"no entry{at}"
        super().__init__(
            f"{MISS_MARKER} " + (f"key {key!r}: {reason}" if reason else f"no entry for key {key!r}{at}")
        )


class BrokenEntry(CacheMiss):
    """The key has an entry, but a document it names is gone (a sweep raced its save, a blob
    deleted by hand). A miss for a restore, which the next save under the key repairs; ``rm``
    removes it."""

    def __init__(self, key: str, where: str, missing: str) -> None:
        #: What is gone, e.g. ``manifest sha256:...``.
        self.missing = missing
        super().__init__(
            key,
            where,
            f"its entry in {where} is broken ({missing} is gone): the next save under the key "
            "replaces it, `remote-cache rm` removes it",
        )

    def for_key(self, key: str) -> BrokenEntry:
        """The same breakage, named by the key whose entry it is (found under its tag)."""
        return BrokenEntry(key, self.where, self.missing)

    @property
    def listed(self) -> str:
        """How ``ls`` shows it: ``broken: manifest sha256:... is gone``."""
        return f"broken: {self.missing} is gone"


class CacheTooLarge(RemoteCacheError):
    """The directory is larger than the ``max_size`` the caller allowed; nothing was uploaded."""

    def __init__(self, path: Path, size: int, max_size: int) -> None:
        self.size = size
        self.max_size = max_size
        super().__init__(
            f"{path} holds {format_bytes(size)} ({size} bytes), more than the allowed "
            f"{format_bytes(max_size)} ({max_size} bytes); nothing was uploaded. Raise the limit "
            f"(--max-size {size_above(size)} on the command line, max_size in code) or clean the "
            "directory first"
        )


class TreeTooDeep(RemoteCacheError):
    """A directory nests deeper than :data:`~remote_cache.archive.tar.MAX_DEPTH` levels: refused
    before anything is uploaded (walks and removals recurse once per level)."""

    def __init__(self, path: str, limit: int) -> None:
        super().__init__(
            f"{path!r} is more than {limit} levels deep (path components), which remote-cache does "
            "not save; leave that subtree out of the cache directory"
        )


class StoreError(RemoteCacheError):
    """A store (registry or layout) could not do what was asked."""


class StoreAuthError(StoreError):
    """The store refused our credentials, wants credentials we did not send, or denies the operation."""


class RegistryAuthError(StoreAuthError):
    """The registry refused our credentials, or wants credentials we did not send."""


class StoreUnreachable(StoreError):
    """The store could not be reached (connection, DNS, TLS, a timeout, a stalled transfer).

    ``temporary`` is False when trying again cannot help soon: a refused connection, an unknown
    host, a failed TLS handshake. A timeout or a dropped connection is temporary.
    """

    def __init__(self, message: str, *, temporary: bool = True) -> None:
        self.temporary = temporary
        super().__init__(message)


class StoreStalled(StoreUnreachable):
    """A request waited the whole stall timeout for bytes (see :mod:`remote_cache.oci.stalls`)."""


class RegistryUnreachable(StoreUnreachable):
    """The registry could not be reached (connection, DNS, TLS, or a timeout)."""


class EntryExists(StoreError):
    """An exclusive write (an immutable key) found an entry under the tag already."""

    def __init__(self, tag: str, where: str) -> None:
        self.tag = tag
        super().__init__(f"{where} already holds an entry under {tag!r}")


#: How a user gets rid of an entry whose documents cannot be read (said in several messages).
RM_A_BROKEN_ENTRY = "`remote-cache rm`; `remote-cache ls` lists it as broken"


class BlobUnreadable(StoreError):
    """A document the store holds but cannot read: in a layout, a blob this user may not read,
    or a directory or FIFO in its place. The entry using it is not known to be broken (another
    user may read it): ``ls`` lists it as broken, ``prune`` stops at it, ``rm`` removes it."""

    def __init__(
        self, digest: str, where: str, why: str, fix: str = "make the blob readable by this user"
    ) -> None:
        self.digest = digest
        #: What went wrong, e.g. ``Permission denied``, and what mends it.
        self.why, self.fix = why, fix
        super().__init__(
            f"blob {digest} in {where} cannot be read ({why}): {fix}, or remove the entry using it "
            f"({RM_A_BROKEN_ENTRY})"
        )

    @property
    def listed(self) -> str:
        """How ``ls`` shows it: ``broken: blob sha256:... cannot be read (Permission denied)``."""
        return f"broken: blob {self.digest} cannot be read ({self.why})"


class BlobsSwept(StoreError):
    """Blobs a save found present and reused were deleted by a sweep before its tag was written.

    The save that gets this packs and uploads them again (:func:`remote_cache.cache.save.save`).
    """

    def __init__(self, digests: list[str], where: str) -> None:
        self.digests = digests
        super().__init__(
            f"{len(digests)} blob(s) this save reused were removed from {where} by a concurrent "
            "rm/prune while it ran; save again (or raise the sweeps' --grace)"
        )


class RegistryError(StoreError):
    """An error response from a registry, with the spec's error code when it sent one."""

    def __init__(
        self, message: str, *, status: int = 0, code: str = "", retry_after: str | None = None
    ) -> None:
        self.status = status
        self.code = code
        #: The response's ``Retry-After`` header, if it sent one (429 and 503 often do).
        self.retry_after = retry_after
        super().__init__(message)


class UnsupportedOperation(StoreError):
    """The store does not support this operation (e.g. a registry with deletes disabled)."""


class UnsuitableTarget(RemoteCacheError, ValueError):
    """A restore target that cannot work (a file, not writable, a non-empty current directory)."""


class UnfinishedSwap(RemoteCacheError):
    """A restore stopped half-way through replacing a target's entries (after its journal was
    written, so never undone): the target holds part of the old tree and part of the new one
    until a run finishes the replacement."""


class NothingToSave(RemoteCacheError):
    """The directory to save is not there (a step that did not make it): an error, which
    --fail-open turns into a warning (actions/cache only warns)."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"{path!r} does not exist: nothing was saved (check the path, or the step meant to make it)"
        )


class NoSpace(RemoteCacheError):
    """Not enough free space where a restore or save writes; says how much is needed, and where."""


class TreeChanged(RemoteCacheError):
    """A file changed between the save's walk and its packing: what would be stored may be a state
    the file never had (a shrunk file read to its old size, a rewrite read half-way)."""

    def __init__(self, path: str, how: str) -> None:
        super().__init__(
            f"{path!r} changed while it was saved ({how}): the save stopped and the key keeps its "
            "entry; save again once nothing writes to the directory"
        )


class Interrupted(RemoteCacheError):
    """The command was stopped by a signal (SIGINT, SIGTERM) and cleaned up after itself."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        self.signal = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signal}")


class DeadlineExceeded(RemoteCacheError):
    """The whole step took longer than its ``--deadline``."""


class IntegrityError(RemoteCacheError):
    """Content did not match the digest or size that named it."""


class UnsafeArchive(RemoteCacheError):
    """An archive member would land outside the target, or is a device/FIFO."""


class ImageFormatError(RemoteCacheError):
    """An image we cannot read as a cache entry (unknown media type, bad JSON, ...)."""


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what caused it, down the chain (``__cause__``, else ``__context__``); each
    once, however the chain loops."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def os_reason(exc: BaseException) -> str:
    """Why ``exc`` happened, in a few words: the system's reason (``Permission denied``) for an
    OSError that has one, else its message."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def without_secrets(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with each of ``secrets`` cut out, raw or URL-encoded: a server may echo a request
    (its query, its headers) in the error it answers with."""
    for secret in secrets:
        if secret:
            for form in {secret, quote(secret), quote(secret, safe=""), quote_plus(secret)}:
                text = text.replace(form, "***")
    return text


#: A signature or token value a server echoes: in a signed URL's query (S3's ``X-Amz-Signature``,
#: GCS's ``X-Goog-Signature``, CloudFront's ``Signature``, Azure SAS's ``sig``), a header
#: (``Authorization: Bearer …``, ``x-amz-security-token``), JSON (``"access_token": "…"``) or a
#: canonical request. Values of 16 characters or more only: words ("invalid token: expired")
#: stay; every secret such a name introduces is longer.
_SIGNED = re.compile(
    r"\b((?:[\w-]*(?:signature|token)|sig|authorization)[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic)\s+)?)"
    r"[^\s&<\"',;]{16,}",
    re.I,
)


def unsigned(text: str) -> str:
    """``text`` (what a server said) with every signature and token value it shows cut out."""
    return _SIGNED.sub(lambda m: f"{m.group(1)}***", text)


#: Where credentials read from the environment are: a server may echo one back (AWS's
#: ``SignatureDoesNotMatch`` body holds the canonical request, ``x-amz-security-token`` included).
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_MASTER_KEY",
                "AZURE_STORAGE_SAS_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_TOKEN",
                "AZURE_CLIENT_SECRET", "GOOGLE_SERVICE_ACCOUNT_KEY")  # fmt: skip
#: Credentials this process read from files (an AWS profile's): hidden as the environment's are.
_REMEMBERED: set[str] = set()
#: A shorter secret would cut words out of a message, not a secret.
_SHORTEST_HIDDEN = 8


def remember_secret(value: str | None) -> None:
    """Have :func:`credentials_to_hide` hide ``value`` too (a credential read from a file)."""
    if value and len(value) >= _SHORTEST_HIDDEN:
        _REMEMBERED.add(value)


def credentials_to_hide(explicit: Iterable[str | None]) -> tuple[str, ...]:
    """What messages must never show: ``explicit`` credentials (a store's own, a password),
    whatever their length, those the environment holds and those :func:`remember_secret` was given."""
    environment = (v for name in _SECRET_VARS if len(v := os.environ.get(name, "")) >= _SHORTEST_HIDDEN)
    return (*(s for s in explicit if s), *environment, *_REMEMBERED)


def hidden(text: str, explicit: Iterable[str | None] = ()) -> str:
    """``text`` fit to show: signature and token values (:func:`unsigned`) and every credential
    :func:`credentials_to_hide` knows cut out."""
    return without_secrets(unsigned(text), credentials_to_hide(explicit))


# (Compiled when first used, by re's cache: not at every start of the tool.)
_XML_CODE = r"<Code>([^<]*)</Code>"
_XML_MESSAGE = r"(?s)<Message>([^<]*)</Message>"
_XML_ERROR = r"(?s)<\?xml.*?</Error>|<Error>.*?</Error>"


def code_and_message(xml: str) -> str:
    """``Code: Message`` of an XML error body (S3's, Azure's: the rest of it echoes the signed
    request)."""
    found = [m.group(1).strip() for m in (re.search(_XML_CODE, xml), re.search(_XML_MESSAGE, xml)) if m]
    return ": ".join(found) or "an XML error body"


def hidden_in_traceback(text: str, explicit: Iterable[str | None]) -> str:
    """A traceback (REMOTE_CACHE_DEBUG) fit to show: every XML error body a server sent reduced to
    its code and message (the rest echoes the signed request), signature and token values cut,
    and the credentials :func:`credentials_to_hide` knows replaced, as in messages. Credentials it
    does not know (the metadata service's) are caught by the first two rules where a server
    echoes them."""
    return hidden(re.sub(_XML_ERROR, lambda m: code_and_message(m.group(0)), text), explicit)
