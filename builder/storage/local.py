"""A repository in a local directory (served by any static web server).

Writes go to a temporary file in the target directory, are fsynced, then put in place by
``os.replace`` (replaceable objects) or ``os.link`` (create-only: fails if the name exists,
so two publishers on one file system cannot both create ``5.targets.json``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import AlreadyExists, StorageError

__all__ = ["LocalStorage"]


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise StorageError(f"refusing object key {key!r}")
        return self.root / key

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"cannot read {self._path(key)}: {e}") from None

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
            create_only: bool = False) -> None:
        path = self._path(key)
        try:
            tmp = self._stage(path, lambda f: f.write(data))
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e}") from None
        self._commit(tmp, path, create_only)

    def put_file(self, key: str, src: Path, *, content_type: str = "", cache_control: str = "") -> None:
        path = self._path(key)
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
                if not name.startswith(".tmp-"):
                    out.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return sorted(out)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"cannot delete {self._path(key)}: {e}") from None
