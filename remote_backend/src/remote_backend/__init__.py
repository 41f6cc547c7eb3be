"""Storage backends for remote-cache volumes: an OCI registry repository, or an S3 bucket.

``dag.remote_cache(dag.remote_backend().registry("ghcr.io", "me/cache", username="me",
password=token))`` stores each volume as a plain OCI image (its root is the volume's contents)
tagged with the cache key, readable by skopeo, crane, oras and the ``remote-cache`` CLI;
``dag.remote_backend().s3("ci-caches", prefix="team", access_key_id=..., secret_access_key=...)``
stores the same images as objects in a bucket. The backends run the ``remote-cache`` core in
their own container: every byte they store goes through the same code as the CLI's.
"""

from __future__ import annotations

from typing import Annotated

import dagger
from dagger import Doc

from remote_cache.cache.image import DEFAULT_PLATFORMS
from remote_cache.dagger import sdk
from remote_cache.errors import RemoteCacheError
from remote_cache.oci.descriptor import Platform
from remote_cache.oci.objectstore.client import build_client
from remote_cache.oci.objectstore.options import ENCRYPTIONS
from remote_cache.oci.reference import parse_reference

from .bucket import S3Bucket, bucket_options
from .registry import COMPRESSIONS, Registry

__all__ = ["Registry", "RemoteBackend", "S3Bucket"]


@sdk.object_type
class RemoteBackend:
    """Backends for the remote-cache module."""

    @sdk.function
    def registry(
        self,
        address: Annotated[str, Doc("Registry host[:port], e.g. ghcr.io, localhost:5000, ttl.sh")],
        repo: Annotated[str, Doc("Repository on that registry, e.g. my-org/ci-cache")],
        username: Annotated[str, Doc("Username for the registry (pull and push)")] = "",
        password: Annotated[dagger.Secret | None, Doc("Password or token, e.g. env://REGISTRY_TOKEN")] = None,
        compression: Annotated[
            dagger.ImageLayerCompression, Doc("Layer compression of saved entries: Zstd or Gzip")
        ] = dagger.ImageLayerCompression.Zstd,
        media_types: Annotated[
            dagger.ImageMediaTypes, Doc("Media types of saved entries: OCIMediaTypes (the only kind written)")
        ] = dagger.ImageMediaTypes.OCIMediaTypes,
        platforms: Annotated[
            list[str] | None,
            Doc(
                "Platforms each entry is tagged for, so engines of any of them can pull it "
                "(default: linux/amd64 and linux/arm64)"
            ),
        ] = None,
        plain_http: Annotated[
            bool, Doc("Talk plain HTTP to a non-loopback registry (the engine needs it configured too)")
        ] = False,
        immutable: Annotated[
            bool, Doc("Never overwrite an existing entry: export keeps the first one saved under a key")
        ] = False,
    ) -> Registry:
        """An OCI registry repository as a remote-cache backend. Does no I/O."""
        ref = parse_reference(f"{address}/{repo}")  # validates both, with a clear message
        if ref.key is not None or ref.digest is not None:
            raise ValueError(f"repo {repo!r} must not carry a tag or digest: the cache key is the tag")
        if compression not in COMPRESSIONS:
            raise RemoteCacheError(
                f"remote-cache: compression {compression.value} is not supported: entries are saved with "
                "Zstd (the default) or Gzip"
            )
        if media_types != dagger.ImageMediaTypes.OCIMediaTypes:
            raise RemoteCacheError(
                f"remote-cache: media types {media_types.value} are not supported: entries are OCI images "
                "(an OCI index), which every current registry accepts"
            )
        for platform in platforms or []:
            try:
                Platform.parse(platform)
            except ValueError as exc:
                raise RemoteCacheError(f"remote-cache: platforms: {exc}") from exc
        return Registry(
            address=address,
            repo=repo,
            username=username,
            password=password,
            compression=compression,
            media_types=media_types,
            platforms=list(platforms) if platforms else [str(p) for p in DEFAULT_PLATFORMS],
            plain_http=plain_http,
            immutable=immutable,
        )

    @sdk.function
    def s3(
        self,
        bucket: Annotated[str, Doc("Bucket name, e.g. ci-caches")],
        prefix: Annotated[
            str, Doc("Where in the bucket the entries live, e.g. team/ci (default: the top)")
        ] = "",
        region: Annotated[str, Doc("Region of the bucket, e.g. eu-west-1 (default: the client's)")] = "",
        endpoint: Annotated[
            str,
            Doc(
                "S3-compatible endpoint (MinIO, R2, Ceph), e.g. https://minio.example:9000; reached from "
                "the engine's containers. Path-style requests when set"
            ),
        ] = "",
        access_key_id: Annotated[
            dagger.Secret | None, Doc("Access key id, e.g. env://AWS_ACCESS_KEY_ID")
        ] = None,
        secret_access_key: Annotated[
            dagger.Secret | None, Doc("Secret access key, e.g. env://AWS_SECRET_ACCESS_KEY")
        ] = None,
        session_token: Annotated[
            dagger.Secret | None, Doc("Session token of temporary credentials, e.g. env://AWS_SESSION_TOKEN")
        ] = None,
        compression: Annotated[
            dagger.ImageLayerCompression, Doc("Layer compression of saved entries: Zstd or Gzip")
        ] = dagger.ImageLayerCompression.Zstd,
        immutable: Annotated[
            bool, Doc("Never overwrite an existing entry: export keeps the first one saved under a key")
        ] = False,
        plain_http: Annotated[bool, Doc("Allow a plain-HTTP endpoint that is not on loopback")] = False,
        sse: Annotated[str, Doc("Server-side encryption of saved objects: AES256 or aws:kms")] = "",
        sse_kms_key_id: Annotated[str, Doc("The KMS key for sse aws:kms")] = "",
        storage_class: Annotated[str, Doc("Storage class of saved blobs, e.g. STANDARD_IA")] = "",
    ) -> S3Bucket:
        """An S3 bucket (or a prefix in one) as a remote-cache backend. Does no I/O."""
        ref = parse_reference(f"s3://{bucket}" + (f"/{prefix}" if prefix else ""))  # validates both
        if compression not in COMPRESSIONS:
            raise RemoteCacheError(
                f"remote-cache: compression {compression.value} is not supported: Zstd (the default) or Gzip"
            )
        if (access_key_id is None) != (secret_access_key is None):
            raise RemoteCacheError("remote-cache: give access_key_id and secret_access_key together")
        if sse and sse not in ENCRYPTIONS:
            raise RemoteCacheError(f"remote-cache: sse {sse!r} is not one of {', '.join(ENCRYPTIONS)}")
        if sse_kms_key_id and sse != "aws:kms":
            raise RemoteCacheError("remote-cache: sse_kms_key_id goes with sse aws:kms")
        # Builds the client without credentials: checks the endpoint (and plain HTTP) now.
        build_client(ref, bucket_options(endpoint, region, plain_http, sse, sse_kms_key_id, storage_class))
        return S3Bucket(
            bucket=bucket,
            prefix=ref.prefix,
            region=region,
            endpoint=endpoint,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            session_token=session_token,
            compression=compression,
            immutable=immutable,
            plain_http=plain_http,
            sse=sse,
            sse_kms_key_id=sse_kms_key_id,
            storage_class=storage_class,
        )
