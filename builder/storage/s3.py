"""A repository in an S3 bucket (or any S3-compatible server), under an optional prefix.

The only module that imports boto3 (the device installs without it). Credentials come from
boto3's standard chain (environment, ``--profile``/shared config, SSO, instance or task role).

Semantics kept (see :mod:`builder.storage`):
- ``put(create_only=True)`` is a conditional put (``If-None-Match: *``): S3 answers 412 when
  the key exists, which becomes :class:`~builder.errors.AlreadyExists`, so two publishers
  cannot both create ``5.snapshot.json``;
- ``put(if_match=etag)`` is a compare-and-swap (``If-Match``) for ``timestamp.json``;
- a conditional write is always one ``PutObject``, never a multipart upload: stores that honour
  conditions on a single put may not on a multipart completion (SeaweedFS 4.48 checks those
  outside its per-object lock: several of six concurrent create-only completions won, tested);
  the files written conditionally are small metadata;
- large files go up as concurrent multipart uploads (boto3 ``TransferConfig``); an upload
  that fails is aborted by boto3 and leaves no object behind, so nothing references it; one it
  could not abort (the endpoint went away: tested with a SeaweedFS gateway restarted) stays an
  incomplete upload, invisible, until :meth:`S3Storage.abandoned` (``repo gc``) aborts it;
- every object carries the Content-Type and Cache-Control of :func:`builder.publish.headers_for`.

Every failure of the service is re-rooted by blame, with what to do: the command line or the
credentials (a missing bucket, no credentials, access denied, an unknown profile:
:class:`~builder.errors.StorageAccessError`, exit 2), the network (an endpoint that cannot be
reached, the service failing for now: :class:`~builder.errors.StorageUnreachable`, exit 4), or
the storage itself (:class:`~builder.errors.StorageError`, exit 5).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig

from metadata.bounded import FileRefused

from ..errors import AlreadyExists, StorageAccessError, StorageError, StorageUnreachable

__all__ = ["S3Storage"]

MiB = 1 << 20
_log = logging.getLogger(__name__)  # `abflip --verbose`: every operation on the bucket
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "403",
           "ExpiredToken", "InvalidToken"}
_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_TRANSIENT = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "500", "503"}
# What a GET of one object may answer that is that object's doing (a customer-provided encryption key,
# a state the reader cannot read), not the bucket's or the credentials' (403, 404 and 5xx are those).
_OBJECT_REFUSED = {400, 405, 409, 416}
_AGAIN = ("then run the command again: devices see nothing of a publish before its last write, and a re-run "
          "re-uses what was uploaded (docs/producer.md)")


class S3Storage:
    def __init__(self, client, bucket: str, prefix: str = "", *, transfer: TransferConfig | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.transfer = transfer or TransferConfig(multipart_threshold=16 * MiB, multipart_chunksize=8 * MiB,
                                                   max_concurrency=10, use_threads=True)

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None, region: str | None = None,
                 profile: str | None = None, max_concurrency: int = 10, part_size: int = 8 * MiB) -> S3Storage:
        """``s3://bucket[/prefix]``; credentials from boto3's standard chain (or ``profile``)."""
        if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
            raise StorageAccessError(f"{url!r} is not an s3://bucket[/prefix] URL", hint="e.g. s3://updates/edge")
        bucket, _, prefix = url[5:].partition("/")
        try:
            session = boto3.session.Session(profile_name=profile, region_name=region)
        except botocore.exceptions.ProfileNotFound as e:
            raise StorageAccessError(f"AWS profile: {e}", hint="check --profile and ~/.aws/config") from None
        cfg = BotoConfig(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=max(10, max_concurrency * 2),
                         s3={"addressing_style": "path"} if endpoint_url else None)
        client = session.client("s3", endpoint_url=endpoint_url, config=cfg)
        # 8 MiB parts on 10 threads: measured faster than 16 or 64 MiB parts (bench/publish.py);
        # s3transfer grows the part size itself for files over 10,000 parts (80 GiB).
        transfer = TransferConfig(multipart_threshold=part_size * 2, multipart_chunksize=part_size,
                                  max_concurrency=max_concurrency, use_threads=True)
        return cls(client, bucket, prefix, transfer=transfer)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise StorageError(f"refusing object key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _errors(self, what: str, key: str = "") -> Iterator[None]:
        where = f"s3://{self.bucket}/{self._key(key) if key else self.prefix}"
        _log.debug("%s %s", what, where)
        try:
            yield
        except botocore.exceptions.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                raise StorageAccessError(f"{what} {where}: the bucket {self.bucket} does not exist",
                                         hint="create the bucket or fix the s3:// URL (and --endpoint-url/--region)"
                                         ) from None
            if code in _DENIED or status == 403:
                raise StorageAccessError(f"{what} {where}: access denied ({code})",
                                         hint="check the credentials (environment, --profile) and the bucket policy: "
                                              "publishing needs s3:GetObject, s3:PutObject, s3:ListBucket, "
                                              "s3:DeleteObject") from None
            if code in _TRANSIENT or (isinstance(status, int) and status >= 500):
                # boto3 retried it already (standard mode, 5 attempts)
                tries = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
                raise StorageUnreachable(f"{what} {where}: the S3 service failed (HTTP {status} {code}, {tries} "
                                         "attempts)", hint=f"the service or a server behind it failed (restarting, "
                                                           f"overloaded, a storage node lost); {_AGAIN}") from None
            raise StorageError(f"{what} {where} failed: {code} {e}") from None
        except botocore.exceptions.NoCredentialsError:
            raise StorageAccessError(f"{what} {where}: no AWS credentials found",
                                     hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, pass --profile, or run with a "
                                          "role") from None
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionError,
                botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError) as e:
            raise StorageUnreachable(f"{what} {where}: cannot reach the S3 endpoint: {e}",
                                     hint=f"check --endpoint-url / --region and the network; {_AGAIN}") from None
        except botocore.exceptions.NoRegionError:
            raise StorageAccessError(f"{what} {where}: no AWS region configured",
                                     hint="pass --region (or set AWS_REGION / ABFLIP_REGION)") from None
        except botocore.exceptions.BotoCoreError as e:
            raise StorageError(f"{what} {where} failed: {e}") from None

    @staticmethod
    def _code(e: botocore.exceptions.ClientError) -> str:
        return str(e.response.get("Error", {}).get("Code", ""))

    # -- reading ---------------------------------------------------------------------------
    def get_tagged(self, key: str, limit: int | None = None) -> tuple[bytes | None, str | None]:
        """The object's bytes and ETag (for a later ``put(if_match=...)``); ``(None, None)`` if absent.

        With ``limit``: an object larger than ``limit`` (by its ``Content-Length``, before its body
        is read; and at most ``limit + 1`` bytes of the body are read, whatever the header said) or
        that the service will not give this reader (say, stored with a customer-provided key)
        raises :class:`~metadata.bounded.FileRefused`, so the caller can judge that object alone."""
        where = f"s3://{self.bucket}/{self._key(key)}"
        with self._errors("reading", key):
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except botocore.exceptions.ClientError as e:
                code, status = self._code(e), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in _MISSING_KEY:
                    return None, None
                if limit is not None and status in _OBJECT_REFUSED:  # this object only: not the bucket, not access
                    raise FileRefused(errno.EACCES, f"cannot be read ({code})", where) from None
                raise
            body = r["Body"]
            try:
                if limit is not None and r["ContentLength"] > limit:
                    raise FileRefused(errno.EFBIG, f"is {r['ContentLength']} bytes, more than the limit {limit}", where)
                data = body.read() if limit is None else body.read(limit + 1)
            finally:
                body.close()
            if limit is not None and len(data) > limit:
                raise FileRefused(errno.EFBIG, f"is more than the limit of {limit} bytes", where)
            return data, r["ETag"]

    def stream(self, key: str, piece: int = 8 * MiB) -> Iterator[bytes] | None:
        """The object's bytes in pieces (bounded memory), None if absent."""
        with self._errors("reading", key):
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except botocore.exceptions.ClientError as e:
                if self._code(e) in _MISSING_KEY:
                    return None
                raise

        def pieces() -> Iterator[bytes]:
            with self._errors("reading", key):
                yield from r["Body"].iter_chunks(piece)
        return pieces()

    def get(self, key: str, limit: int | None = None) -> bytes | None:
        return self.get_tagged(key, limit)[0]

    def exists(self, key: str) -> bool:
        with self._errors("checking", key):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except botocore.exceptions.ClientError as e:
                if self._code(e) in _MISSING_KEY:
                    return False
                raise
            return True

    def head(self, key: str) -> dict | None:
        """Content-Type, Cache-Control, length and ETag of an object (None if absent)."""
        with self._errors("checking", key):
            try:
                r = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except botocore.exceptions.ClientError as e:
                if self._code(e) in _MISSING_KEY:
                    return None
                raise
            return {"content_type": r.get("ContentType"), "cache_control": r.get("CacheControl"),
                    "length": r["ContentLength"], "etag": r["ETag"], "content_encoding": r.get("ContentEncoding")}

    def list(self, prefix: str) -> list[str]:
        base = self._key(prefix) if prefix else self.prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        with self._errors("listing", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                out.extend(o["Key"][strip:] for o in page.get("Contents", []))
        return sorted(out)

    def names(self, prefix: str) -> list[str]:
        """Every name directly under ``prefix`` (objects, and "directories": common prefixes)."""
        base = self._key(prefix.rstrip("/")) + "/" if prefix.strip("/") else (self.prefix + "/" if self.prefix else "")
        out = []
        with self._errors("listing", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base,
                                                                              Delimiter="/"):
                out.extend(o["Key"][len(base):] for o in page.get("Contents", []))
                out.extend(p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", []))
        return sorted(n for n in out if n)

    # -- writing ---------------------------------------------------------------------------
    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream", cache_control: str = "",
            create_only: bool = False, if_match: str | None = None) -> None:
        kw: dict = {"ContentType": content_type}
        if cache_control:
            kw["CacheControl"] = cache_control
        if create_only:
            kw["IfNoneMatch"] = "*"
        elif if_match:
            kw["IfMatch"] = if_match
        with self._errors("writing", key):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **kw)
            except botocore.exceptions.ClientError as e:
                code = self._code(e)
                if code in _CONFLICT or (if_match and code in _MISSING_KEY):
                    raise AlreadyExists(f"s3://{self.bucket}/{self._key(key)}") from None
                raise

    def put_file(self, key: str, path: Path, *, content_type: str = "application/octet-stream", cache_control: str = "",
                 progress: Callable[[int], None] | None = None) -> None:
        extra = {"ContentType": content_type}
        if cache_control:
            extra["CacheControl"] = cache_control
        with self._errors("uploading", key):
            try:
                self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs=extra, Config=self.transfer,
                                        Callback=progress)
            except boto3.exceptions.S3UploadFailedError as e:
                cause = e.__cause__ or e.__context__
                if isinstance(cause, botocore.exceptions.ClientError):
                    raise cause from None
                raise StorageError(f"uploading {path} to s3://{self.bucket}/{self._key(key)} failed: {e}") from None

    def delete(self, key: str) -> None:
        with self._errors("deleting", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def abandoned(self, older_than: float, *, remove: bool = False) -> list[str]:
        """Incomplete multipart uploads under the prefix started more than ``older_than`` s ago
        (``<key> (upload started <when>)``); ``remove``: abort them."""
        import datetime as dt

        limit = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=older_than)
        strip = len(self.prefix) + 1 if self.prefix else 0
        found = []
        with self._errors("listing incomplete uploads of", ""):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "")
            uploads = [u for page in pages for u in page.get("Uploads", []) if u["Initiated"] <= limit]
        for u in uploads:
            if remove:
                with self._errors("aborting the upload of", u["Key"][strip:]):
                    try:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
                    except botocore.exceptions.ClientError as e:
                        if self._code(e) not in ("NoSuchUpload", "404"):  # finished or aborted meanwhile
                            raise
            found.append(f"{u['Key'][strip:]} (upload started {u['Initiated']:%Y-%m-%d %H:%M} UTC)")
        return sorted(found)
