"""A repository in a local directory (served by any static web server).

Writes go to a temporary file in the target directory, are fsynced, then put in place by
``os.replace`` (replaceable objects) or ``os.link`` (create-only: fails if the name exists,
so two publishers on one file system cannot both create ``5.targets.json``).
``put(if_match=tag)`` (compare-and-swap of ``timestamp.json``) holds an advisory lock on
``<root>/.lock`` while it compares the current bytes' sha256 with ``tag`` and replaces.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from metadata.bounded import FileRefused, open_regular, read_file

from ..errors import AlreadyExists, StorageError

__all__ = ["LocalStorage"]

_log = logging.getLogger(__name__)  # `abflip --verbose`: every write and delete
GET_MAX = 1 << 30  # get() holds an object in memory: metadata, pointers, manifests (images are streamed)


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise StorageError(f"refusing object key {key!r}")
        return self.root / key

    def get(self, key: str, limit: int | None = None) -> bytes | None:
        """The object's bytes, None if absent. A FIFO, directory or device where a file should be
        never blocks nor is read (:func:`metadata.bounded.read_file`). With ``limit``: an object
        that cannot be had (not a regular file, larger than ``limit``, unreadable) raises
        :class:`~metadata.bounded.FileRefused`, so the caller can judge that one object alone."""
        path = self._path(key)
        try:
            return read_file(path, GET_MAX if limit is None else limit)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if limit is not None:
                raise e if isinstance(e, FileRefused) else FileRefused(e.errno, f"cannot be read ({e.strerror})",
                                                                       str(path)) from None
            raise StorageError(f"cannot read {path}: {e.strerror or e}") from None

    def stream(self, key: str, piece: int = 8 << 20) -> Iterator[bytes] | None:
        """The object's bytes in pieces (bounded memory), None if absent."""
        try:
            f = open_regular(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"cannot read {self._path(key)}: {e.strerror or e}") from None

        def pieces() -> Iterator[bytes]:
            with f:
                while b := f.read(piece):
                    yield b
        return pieces()

    def get_tagged(self, key: str, limit: int | None = None) -> tuple[bytes | None, str | None]:
        """The bytes and a tag (their sha256) for a later ``put(if_match=tag)``."""
        data = self.get(key, limit)
        return data, (hashlib.sha256(data).hexdigest() if data is not None else None)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def _stage(self, path: Path, write) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

    def _commit(self, tmp: str, path: Path, create_only: bool) -> None:
        try:
            if create_only:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise AlreadyExists(str(path)) from None
                finally:
                    os.unlink(tmp)
            else:
                os.replace(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e}") from None

    def put(self, key: str, data: bytes, *, content_type: str = "", cache_control: str = "",
            create_only: bool = False, if_match: str | None = None) -> None:
        path = self._path(key)
        _log.debug("writing %s (%d bytes%s)", path, len(data),
                   ", create-only" if create_only else ", if unchanged" if if_match else "")
        try:
            tmp = self._stage(path, lambda f: f.write(data))
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e}") from None
        if if_match is None or create_only:
            self._commit(tmp, path, create_only)
            return
        try:
            lock = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            os.unlink(tmp)
            raise StorageError(f"cannot lock {self.root}: {e}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.get_tagged(key)[1] != if_match:
                os.unlink(tmp)
                raise AlreadyExists(f"{path} changed since it was read")
            self._commit(tmp, path, create_only=False)
        finally:
            os.close(lock)

    def put_file(self, key: str, src: Path, *, content_type: str = "", cache_control: str = "") -> None:
        path = self._path(key)
        _log.debug("copying %s to %s", src, path)
        try:
            with open(src, "rb") as s:
                tmp = self._stage(path, lambda f: shutil.copyfileobj(s, f, 1 << 20))
        except OSError as e:
            raise StorageError(f"cannot copy {src} to {path}: {e}") from None
        self._commit(tmp, path, create_only=False)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if not name.startswith("."):  # .tmp-* staging files, the .lock file
                    out.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return sorted(out)

    def names(self, prefix: str) -> list[str]:
        """Every name directly under ``prefix`` (a directory), whatever it is (files, directories,
        FIFOs; not dotfiles): what version discovery must step over."""
        try:
            return sorted(n for n in os.listdir(self._path(prefix)) if not n.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise StorageError(f"cannot list {self._path(prefix)}: {e.strerror or e}") from None

    def delete(self, key: str) -> None:
        _log.debug("deleting %s", self._path(key))
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"cannot delete {self._path(key)}: {e}") from None

    def abandoned(self, older_than: float, *, remove: bool = False) -> list[str]:
        """Staging files (``.tmp-*``) of writes killed before their rename, older than ``older_than`` s."""
        found = []
        limit = time.time() - older_than
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    if not name.startswith(".tmp-") or os.lstat(path).st_mtime > limit:
                        continue
                    if remove:
                        os.unlink(path)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise StorageError(f"cannot remove {path}: {e}") from None
                found.append(os.path.relpath(path, self.root))
        return sorted(found)
