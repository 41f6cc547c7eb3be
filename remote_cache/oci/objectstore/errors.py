"""Object store errors: the one boundary where obstore's exceptions become ours.

obstore reports a missing object as ``FileNotFoundError`` (or its ``NotFoundError``), a lost race
of a conditional write as ``AlreadyExistsError``/``PreconditionError``, refused credentials as
``PermissionDeniedError``/``UnauthenticatedError``, and everything else as ``GenericError``
whose debug text names the HTTP failure's kind (``kind: Connect``, ``kind: Timeout``, ...).
Messages keep obstore's first paragraph (method, URL, status) on one line, an XML error body in it
reduced to its code and message (the rest may echo the request), and drop the debug dump; the
store's credentials and the environment's are cut out anyway.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)

from ...errors import (
    StoreAuthError,
    StoreError,
    StoreStalled,
    StoreUnreachable,
    code_and_message,
    hidden,
)
from ..reference import OBJECT_CREDENTIALS

__all__ = [
    "NOT_FOUND",
    "RACE_LOST",
    "UNSUPPORTED",
    "refuses_conditional",
    "translated",
]

#: Exceptions that mean "no such object" (callers turn it into a miss or a missing blob).
NOT_FOUND = (FileNotFoundError, NotFoundError)
#: Exceptions that mean a conditional write found the object there (or changed).
RACE_LOST = (AlreadyExistsError, PreconditionError)
#: The client will not send a conditional write (switched off for this store).
UNSUPPORTED = (NotSupportedError,)
_KIND = re.compile(r"kind: (\w+)")
_REFUSED_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AuthenticationFailed",
                  "AuthorizationFailure", "NoCredentialProviders")  # fmt: skip
#: A 401 or 403 without an error body (a gateway, some S3-compatible servers): obstore reports it
#: as a generic error on a listing, where a read's is an UnauthenticatedError.
_REFUSED_STATUS = re.compile(r"non-2xx status code: 40[13]\b")
#: What an error from the instance or container metadata service (asked for credentials when
#: nothing else had them) has in its URL.
_METADATA_MARKS = ("/latest/api/token", "/latest/meta-data", "169.254.169.254", "169.254.170.2")
#: What else decides access, beside the credentials (OBJECT_CREDENTIALS).
_ACCESS = {"s3": "the bucket's policy", "az": "the container's access", "gs": "the bucket's IAM"}


def _credentials_hint(location: str) -> str:
    scheme = location.split("://", 1)[0]
    scheme = scheme if scheme in _ACCESS else "s3"
    return f"check {OBJECT_CREDENTIALS[scheme]} and {_ACCESS[scheme]}"


_NO_AZURE_ACCOUNT = "Account must be specified"
#: obstore's Azure client builder, given an account key that is no base64 (what follows quotes it)
_NOT_AN_AZURE_KEY = "Invalid Access Key"
_PERMANENT_KINDS = frozenset({"Connect"})  # refused, DNS, TLS: trying again cannot help soon


#: A 501 status or S3's ``NotImplemented`` code (not "501" inside an elapsed time or a key).
_NOT_IMPLEMENTED = re.compile(r"status(?: code)?:? 501\b|\bNotImplemented\b")


def _first_paragraph(exc: BaseException) -> str:
    """obstore's message without the debug dump that follows it."""
    return str(exc).split("\n\nDebug source", 1)[0]


def refuses_conditional(exc: BaseException) -> bool:
    """A server's answer that it does not implement a conditional write (501, NotImplemented)."""
    return isinstance(exc, BaseError) and _NOT_IMPLEMENTED.search(_first_paragraph(exc)) is not None


_XML_BODY = re.compile(r"<\?xml|<Error>")


def _summary(exc: BaseException, secrets: Iterable[str | None]) -> str:
    """obstore's first paragraph on one line; an XML error body the server sent reduced to its code
    and message (the rest echoes the request); ``secrets`` and every credential
    :func:`~remote_cache.errors.credentials_to_hide` knows cut out."""
    text = _first_paragraph(exc).strip() or type(exc).__name__
    if (body := _XML_BODY.search(text)) is not None:
        text = text[: body.start()] + code_and_message(text)
    return hidden(" ".join(text.split()), secrets)


@contextmanager
def translated(location: str, action: str, secrets: Iterable[str | None] = ()) -> Iterator[None]:
    """Run obstore calls; their failures (but a missing object) leave as our StoreError kinds.

    ``action`` says what was tried (``"read tag npm"``); it starts the message.
    """
    try:
        yield
    except NOT_FOUND as exc:
        if _missing_bucket(str(exc)):  # not a missing object: nothing can be read or written there
            raise _no_bucket(location, action) from exc
        raise
    except RACE_LOST:
        raise
    except (PermissionDeniedError, UnauthenticatedError) as exc:
        raise StoreAuthError(
            f"cannot {action}: {location} refused the credentials ({_summary(exc, secrets)}); "
            f"{_credentials_hint(location)}"
        ) from exc
    except BaseError as exc:
        raise _generic(location, action, exc, secrets) from exc
    except OSError as exc:  # a local file obstore read or wrote (an upload's spool file)
        raise StoreError(f"cannot {action}: {exc}") from exc


def _missing_bucket(text: str) -> bool:
    return "NoSuchBucket" in text or "ContainerNotFound" in text


def _no_bucket(location: str, action: str) -> StoreError:
    if location.startswith("az://"):  # (Azure has no regions: an account's containers)
        return StoreError(
            f"cannot {action}: the container of {location} does not exist (check its name and the account)"
        )
    return StoreError(f"cannot {action}: the bucket of {location} does not exist (check its name and region)")


def _refused_bare(exc: BaseException) -> bool:
    """A 401 or 403 with no error body to say why (one with a body says it: a skewed clock is a 403)."""
    text = _first_paragraph(exc)
    return _REFUSED_STATUS.search(text) is not None and _XML_BODY.search(text) is None


def _generic(location: str, action: str, exc: BaseException, secrets: Iterable[str | None]) -> StoreError:
    summary = _summary(exc, secrets)
    kind = _KIND.search(str(exc))
    if _missing_bucket(summary):
        return _no_bucket(location, action)
    if any(mark in summary for mark in _METADATA_MARKS):  # the last link of the credential chain
        return StoreAuthError(
            f"cannot {action}: no credentials for {location}: none in the environment or the shared "
            f"files, and no instance or container metadata service answered; {_credentials_hint(location)}"
        )
    if _NO_AZURE_ACCOUNT in summary:  # obstore's client builder, with no account anywhere
        return StoreAuthError(
            f"cannot {action}: no storage account for {location}: set AZURE_STORAGE_ACCOUNT_NAME (and "
            "AZURE_STORAGE_ACCOUNT_KEY, a SAS or an identity)"
        )
    if _NOT_AN_AZURE_KEY in summary and location.startswith("az://"):
        return StoreAuthError(
            f"cannot {action}: the account key for {location} is not a key (not base64): set "
            "AZURE_STORAGE_ACCOUNT_KEY to the storage account's access key as the portal shows it"
        )
    if any(code in summary for code in _REFUSED_CODES) or _refused_bare(exc):
        return StoreAuthError(
            f"cannot {action}: {location} refused the credentials ({summary}); {_credentials_hint(location)}"
        )
    if kind is not None:
        name = kind.group(1)
        temporary = name not in _PERMANENT_KINDS
        if name == "Timeout":  # connect, or a read that waited the whole stall period for bytes
            return StoreStalled(
                f"cannot {action}: {location} stopped answering ({summary}): no data within the stall "
                "timeout",
                temporary=True,
            )
        hint = "; check the endpoint and that it is running" if name == "Connect" else ""
        return StoreUnreachable(
            f"cannot {action}: {location} could not be reached ({summary}){hint}", temporary=temporary
        )
    return StoreError(f"cannot {action}: {location} answered with an error ({summary})")
