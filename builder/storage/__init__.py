"""Where a repository is published: a local directory (default) or S3.

Every backend keeps the same semantics:
- ``put(..., create_only=True)`` never replaces an existing object (O_EXCL / conditional put)
  and raises :class:`~builder.errors.AlreadyExists` instead: versioned metadata and
  hash-prefixed targets are immutable.
- other puts replace the object atomically (readers see the old or the new bytes);
  ``put(..., if_match=tag)`` replaces it only if it is still what ``get_tagged`` returned
  with ``tag`` (compare-and-swap), else raises ``AlreadyExists``.
- ``get(key, limit)`` reads one object bounded: one that is larger than ``limit`` (known before
  its bytes are read), not a regular file, or otherwise not to be had raises
  :class:`~metadata.bounded.FileRefused`, and the caller judges that object alone (a product's
  junk file costs that product, issue 21); without a limit such an object is a ``StorageError``.
- ``names(prefix)`` lists every name directly under ``prefix``, whatever it is: the loader finds
  versions by listing them, never by probing (docs/release-control.md).
- ``abandoned(older_than)`` lists what interrupted writes left behind, invisible to every reader
  (an S3 multipart upload a failing client could not abort, a directory's ``.tmp-*`` file), and
  with ``remove=True`` removes it; ``repo gc`` does so after a day.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

__all__ = ["Storage", "open_storage"]


class Storage(Protocol):
    def get(self, key: str, limit: int | None = None) -> bytes | None: ...

    def get_tagged(self, key: str, limit: int | None = None) -> tuple[bytes | None, str | None]: ...

    def stream(self, key: str, piece: int = ...) -> Iterator[bytes] | None: ...

    def exists(self, key: str) -> bool: ...

    def put(self, key: str, data: bytes, *, content_type: str, cache_control: str, create_only: bool = False,
            if_match: str | None = None) -> None: ...

    def put_file(self, key: str, path: Path, *, content_type: str, cache_control: str) -> None: ...

    def list(self, prefix: str) -> list[str]: ...

    def names(self, prefix: str) -> list[str]: ...

    def delete(self, key: str) -> None: ...

    def abandoned(self, older_than: float, *, remove: bool = False) -> list[str]: ...

    def describe(self) -> str: ...


def open_storage(url: str, **s3_options: object) -> Storage:
    """``s3://bucket/prefix`` -> S3 (needs the ``publish`` extra), anything else -> a directory.

    S3 options not given (None) default to ``$ABFLIP_ENDPOINT_URL``, ``$ABFLIP_REGION`` and
    ``$ABFLIP_PROFILE``; without those boto3's own chain applies (``AWS_ENDPOINT_URL_S3``,
    ``AWS_REGION``, ``AWS_PROFILE``, instance roles ...)."""
    if url.startswith("s3://"):
        import os

        from .s3 import S3Storage  # boto3 is imported only there

        for opt, env in (("endpoint_url", "ABFLIP_ENDPOINT_URL"), ("region", "ABFLIP_REGION"), ("profile", "ABFLIP_PROFILE")):
            if s3_options.get(opt) is None and os.environ.get(env):
                s3_options[opt] = os.environ[env]
        return S3Storage.from_url(url, **s3_options)  # type: ignore[arg-type]
    from .local import LocalStorage

    return LocalStorage(Path(url))
