"""How to reach a bucket and how to write into it: endpoint, region, credentials, encryption.

Anything left unset comes from the environment the way AWS tools (and obstore) read it:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, web identity and
instance metadata; ``AWS_PROFILE`` and ``~/.aws`` through boto3 when it is installed. Google
Cloud Storage and Azure read their own (``GOOGLE_*``, ``AZURE_STORAGE_*``).
"""

from __future__ import annotations

from msgspec import Struct

from ...records import hiding

__all__ = ["DEFAULT_STALL_SECONDS", "ENCRYPTIONS", "ObjectStoreOptions"]

#: No bytes moving for this long on a request is a stall (a healthy long transfer is not).
DEFAULT_STALL_SECONDS = 60.0
#: Server-side encryption modes of S3: managed keys, or KMS (with ``kms_key_id``).
ENCRYPTIONS = ("AES256", "aws:kms")


class ObjectStoreOptions(Struct, frozen=True):
    """Options of an object store; None or empty means "from the environment" or the default."""

    #: ``https://...`` (or ``http://`` on loopback, or with ``plain_http``): MinIO, R2, Ceph, Azurite.
    endpoint: str | None = None
    region: str | None = None
    #: Allow a plain-HTTP endpoint that is not on this machine.
    plain_http: bool = False
    #: Explicit credentials (the Dagger backend's secrets); the environment's otherwise.
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    #: ``AES256`` or ``aws:kms`` (bucket policies often require one), and the KMS key id.
    encryption: str = ""
    kms_key_id: str = ""
    #: Storage class of the blobs, e.g. ``STANDARD_IA`` (tags stay in the default class).
    storage_class: str = ""
    #: Seconds without progress that make a request stalled.
    stall_seconds: float = DEFAULT_STALL_SECONDS
    #: Retries of a request (each after a backoff), on temporary failures only.
    retries: int = 3

    __repr__, __rich_repr__ = hiding("access_key_id", "secret_access_key", "session_token")
