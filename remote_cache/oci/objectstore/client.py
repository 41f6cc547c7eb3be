"""The obstore client for a bucket reference: scheme, endpoint, credentials, timeouts, retries.

* **Endpoint**: ``options.endpoint``, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (S3) or
  ``AZURE_STORAGE_ENDPOINT`` (Azure), else the provider's. A plain-HTTP endpoint is allowed for
  loopback hosts, or when ``plain_http`` says so. With an endpoint, S3 requests are path-style
  (``ENDPOINT/BUCKET/KEY``, what MinIO, Ceph and moto expect); without, virtual-hosted (AWS).
* **Credentials**: explicit ones (the Dagger backend's secrets), else the environment's, read by
  obstore (see :mod:`.options`). With no keys in the environment, ``AWS_PROFILE`` or the shared
  files (``~/.aws/credentials``, ``~/.aws/config``) go through boto3 when it is installed (``pip
  install remote-cache[aws]``): obstore does not read those files itself.
* **Stalls and retries**: each read may wait ``stall_seconds`` for bytes (``read_timeout``),
  connecting 10 s; a whole request is bounded only loosely, so a long healthy download is never
  cut. The HTTP client's read timeout also runs while a request body is being sent (reqwest
  #2784): blob uploads get their own client, whose requests may take ``UPLOAD_STALL_FACTOR`` times
  as long (10 min by default: a 16 MiB part then needs 28 kB/s). Temporary failures are retried
  ``retries`` times within two stall periods (the stall budget, :mod:`..stalls`).
* **Addressing**: virtual-hosted on AWS (``BUCKET.s3.REGION.amazonaws.com``) unless the bucket
  name has a ``.`` (its TLS certificate cannot match) or ``AWS_VIRTUAL_HOSTED_STYLE_REQUEST``
  says otherwise; path-style with an endpoint.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, urlsplit

from ...errors import InvalidReference, StoreAuthError, StoreError, hidden, remember_secret
from ...home import home
from ...version import TOOL
from ..reference import Reference, is_loopback
from ..stalls import BUDGET_PERIODS
from .options import ENCRYPTIONS, ObjectStoreOptions

if TYPE_CHECKING:
    from obstore.store import ObjectStore as ObstoreClient

__all__ = ["UPLOAD_STALL_FACTOR", "build_client", "endpoint_of"]

_WHOLE_REQUEST = timedelta(hours=2)  # loose: stalls are caught per read instead
#: How many stall periods one upload request may take (see the module docstring).
UPLOAD_STALL_FACTOR = 10
#: Storage classes whose objects cannot be read back at once: a cache there would never hit.
_ARCHIVAL = frozenset({"GLACIER", "DEEP_ARCHIVE"})
_CONNECT = timedelta(seconds=10)


def endpoint_of(reference: Reference, options: ObjectStoreOptions) -> str | None:
    """The endpoint URL requests go to, when one is set (by option or environment)."""
    if options.endpoint:
        return options.endpoint
    names = {"s3": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"), "az": ("AZURE_STORAGE_ENDPOINT",)}
    for name in names.get(reference.scheme, ()):
        if os.environ.get(name):
            return os.environ[name]
    return None


_EXAMPLE = "https://minio.example:9000"
#: A bare ``HOST[:PORT][/PATH]`` (what an endpoint without its scheme usually is): a name (with
#: docker-compose's underscores), an IPv4 address or a bracketed IPv6 one.
_HOST_PORT = re.compile(r"([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[^\s]*)?")
#: ``http:/host``, ``https//host``: a scheme written wrong, not left out.
_MISWRITTEN_SCHEME = re.compile(r"https?(:/?|//)[^/]", re.IGNORECASE)


def _endpoint_parts(endpoint: str) -> SplitResult:
    """The endpoint's parts, once it is an http(s) URL with a host that obstore will take (it
    panics on a bad port or host at the first request) and no credentials in it."""
    if "@" in endpoint:
        # Checked before parsing: a secret holding "/", "?" or "#" ends the URL's authority early,
        # and the parser's complaint about the "port" would quote part of it.
        raise InvalidReference(
            "endpoint holds an '@' (user:password@host?): credentials go in the environment "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never in the URL"
        )
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 - raises for a port out of range or not a number
        if any(c.isspace() or not c.isprintable() for c in endpoint) or "%" in (parts.hostname or ""):
            raise ValueError("a space, a control character or a zone id")
    except ValueError as exc:  # obstore would panic on it (InvalidPort, InvalidUriChar, ...)
        raise InvalidReference(f"endpoint is not a valid URL ({exc}), e.g. {_EXAMPLE}") from None
    if "://" not in endpoint:  # the parser took the host (or an IP's first part) for a scheme
        if _MISWRITTEN_SCHEME.match(endpoint):
            raise InvalidReference(
                f"endpoint {endpoint!r}: write its scheme as http:// or https://, e.g. {_EXAMPLE}"
            )
        given = f": give http://{endpoint} or https://{endpoint}" if _HOST_PORT.fullmatch(endpoint) else ""
        raise InvalidReference(f"endpoint has no scheme{given}, e.g. {_EXAMPLE}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidReference(
            f"endpoint {parts.scheme}://{parts.hostname or ''}... is not an http(s):// URL, e.g. {_EXAMPLE}"
        )
    return parts


def _client_options(endpoint: str | None, options: ObjectStoreOptions, *, uploads: bool) -> dict[str, Any]:
    allow_http = False
    if endpoint is not None:
        parts = _endpoint_parts(endpoint)
        if parts.scheme == "http":
            if not (options.plain_http or is_loopback(parts.netloc)):
                raise InvalidReference(
                    f"endpoint http://{parts.netloc} is plain HTTP and not on this machine: pass "
                    "--plain-http (plain_http=True) to allow it, or use https://"
                )
            allow_http = True
    stall = options.stall_seconds * (UPLOAD_STALL_FACTOR if uploads else 1)
    return {
        "allow_http": allow_http,
        "connect_timeout": _CONNECT,
        "read_timeout": timedelta(seconds=stall),
        "timeout": _WHOLE_REQUEST,
        "user_agent": TOOL,
    }


def _retry(options: ObjectStoreOptions) -> dict[str, Any]:
    return {
        "max_retries": max(0, options.retries),
        # Retries share the stall budget (see ..stalls): a stalled request is retried once at most.
        "retry_timeout": timedelta(seconds=options.stall_seconds * BUDGET_PERIODS),
        "backoff": {
            "init_backoff": timedelta(milliseconds=500),
            "max_backoff": timedelta(seconds=10),
            "base": 2,
        },
    }


def _common(
    reference: Reference, endpoint: str | None, options: ObjectStoreOptions, uploads: bool
) -> dict[str, Any]:
    """What every provider's store is made with besides its bucket and config."""
    return {
        "prefix": reference.prefix or None,
        "client_options": _client_options(endpoint, options, uploads=uploads),
        "retry_config": _retry(options),
    }


def _s3(
    reference: Reference, endpoint: str | None, options: ObjectStoreOptions, uploads: bool
) -> ObstoreClient:
    from obstore.store import S3Store

    config: dict[str, Any] = {}
    if endpoint is not None:
        config["endpoint"] = endpoint.rstrip("/")
        config["virtual_hosted_style_request"] = False
    elif not os.environ.get("AWS_VIRTUAL_HOSTED_STYLE_REQUEST"):
        config["virtual_hosted_style_request"] = "." not in reference.bucket
    if options.region:
        config["region"] = options.region
    if options.access_key_id or options.secret_access_key or options.session_token:
        if not (options.access_key_id and options.secret_access_key):
            raise StoreError(
                "an access key id, a secret access key and maybe a session token go together: give the "
                "first two at least"
            )
        config["access_key_id"] = options.access_key_id
        config["secret_access_key"] = options.secret_access_key
        if options.session_token:
            config["session_token"] = options.session_token
    elif os.environ.get("AWS_SECRET_ACCESS_KEY") and not os.environ.get("AWS_ACCESS_KEY_ID"):
        # (obstore's "Missing AccessKeyId" came back as exit 1; the AWS CLI refuses this too.)
        raise StoreAuthError(
            "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: set both, or neither to use a "
            "profile or a role"
        )
    if options.encryption:
        if options.encryption not in ENCRYPTIONS:
            raise InvalidReference(
                f"encryption {options.encryption!r} is not one of {', '.join(ENCRYPTIONS)}"
            )
        config["server_side_encryption"] = options.encryption
        if options.kms_key_id:
            config["sse_kms_key_id"] = options.kms_key_id
    if options.storage_class.upper() in _ARCHIVAL:
        raise InvalidReference(
            f"storage class {options.storage_class}: its objects cannot be read back at once, so a cache "
            "there would never be restored; use STANDARD, STANDARD_IA, INTELLIGENT_TIERING or GLACIER_IR"
        )
    provider, profile_region = _profile(options)
    if "region" not in config and profile_region and not _env_region():
        config["region"] = profile_region
    return S3Store(
        reference.bucket,
        config=config,  # type: ignore[arg-type]
        credential_provider=provider,
        **_common(reference, endpoint, options, uploads),
    )


def _env_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _shared_files() -> bool:
    """Whether an AWS shared credentials or config file is there to read."""
    user = home()
    aws = None if user is None else user / ".aws"
    files = (
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or (aws and aws / "credentials"),
        os.environ.get("AWS_CONFIG_FILE") or (aws and aws / "config"),
    )
    return any(f and Path(f).is_file() for f in files)


def _profile(options: ObjectStoreOptions) -> tuple[Any, str | None]:
    """boto3's credentials (and region) for ``AWS_PROFILE`` or the shared files (``~/.aws``), when
    no explicit or environment keys are set; (None, None) leaves obstore's own chain (environment,
    web identity, instance metadata)."""
    if options.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID"):
        return None, None
    profile = os.environ.get("AWS_PROFILE")
    if not profile and not _shared_files():
        return None, None
    try:
        import boto3  # type: ignore[import-untyped]
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError as exc:
        if not profile:
            return None, None  # the files are there, but only boto3 reads them: obstore's chain it is
        raise StoreError(
            "AWS_PROFILE is set, but reading profiles needs boto3: pip install 'remote-cache[aws]', or set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead"
        ) from exc
    key = profile or ""
    if key not in _PROFILES:
        session, credentials = _session(boto3, profile)
        provider = Boto3CredentialProvider(session) if credentials is not None else None
        _PROFILES[key] = (provider, session.region_name)
    return _PROFILES[key]


def _session(boto3: Any, profile: str | None) -> tuple[Any, Any]:
    """boto3's session for ``profile`` and its credentials (None: none found); boto3's errors
    (a missing profile, an unreadable file, a failing ``credential_process``, an SSO token or a
    role that cannot be had) as StoreAuthError."""
    from botocore.exceptions import BotoCoreError, CredentialRetrievalError  # type: ignore[import-untyped]

    named = f"AWS profile {profile!r}" if profile else "the AWS shared files (~/.aws)"
    fix = "fix it, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead"
    try:
        session = boto3.Session(profile_name=profile) if profile else boto3.Session()
        credentials = session.get_credentials()
        if credentials is not None:
            # (Fetched now for a role or SSO profile.) A server may echo them: hidden as the
            # environment's are.
            frozen = credentials.get_frozen_credentials()
            remember_secret(frozen.secret_key)
            remember_secret(frozen.token)
        return session, credentials
    except CredentialRetrievalError as exc:
        # Its message ends with what the program wrote to stderr, which may be a secret: not shown.
        provider = exc.kwargs.get("provider", "credential provider")
        raise StoreAuthError(
            f"{named}: its {provider} failed to give credentials (its output is not shown: it may hold "
            f"secrets; run it yourself to see why); {fix}"
        ) from None
    except BotoCoreError as exc:  # (its message names the profile, the file or the missing setting)
        raise StoreAuthError(f"{named} cannot be used: {hidden(str(exc))}; {fix}") from exc


#: boto3's provider and region per profile, once per process (each store has two clients).
_PROFILES: dict[str, tuple[Any, str | None]] = {}


def _gcs_or_azure(
    reference: Reference, endpoint: str | None, options: ObjectStoreOptions, uploads: bool
) -> ObstoreClient:
    from obstore.store import AzureStore, GCSStore

    config: dict[str, Any] = {}
    if endpoint is not None:
        config["base_url" if reference.scheme == "gs" else "endpoint"] = endpoint.rstrip("/")
    store = GCSStore if reference.scheme == "gs" else AzureStore
    return store(reference.bucket, config=config, **_common(reference, endpoint, options, uploads))  # type: ignore[arg-type]


def build_client(
    reference: Reference, options: ObjectStoreOptions, *, uploads: bool = False
) -> ObstoreClient:
    """The obstore client for ``s3://``, ``gs://`` or ``az://`` ``BUCKET/PREFIX`` (``uploads``:
    the one for blob uploads, with the longer read timeout)."""
    endpoint = endpoint_of(reference, options)
    build = {"s3": _s3, "gs": _gcs_or_azure, "az": _gcs_or_azure}.get(reference.scheme)
    if build is None:
        raise InvalidReference(f"{reference} is not an object store reference (s3://, gs://, az://)")
    if reference.scheme != "s3" and (options.encryption or options.kms_key_id or options.region):
        raise InvalidReference(
            f"{reference.location}: server-side encryption and the region are S3 options; the bucket's "
            "own settings apply for gs:// and az://"
        )
    return build(reference, endpoint, options, uploads)
