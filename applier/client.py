"""TUF refresh and target lookup on the device (python-tuf ngclient).

Trust starts from the root shipped in the image (``repository.trusted_root``) and follows
rotations; the metadata cache lives in ``<state_dir>/tuf``. Every target the device uses
(channel pointer, release manifest, boot files) is fetched with a length bound and checked
against the signed targets metadata before it is parsed. The image itself is not fetched
here: :mod:`applier.stream` verifies it chunk by chunk against the signed manifest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from metadata.errors import RepositoryError, TransportError, UserError

from .fetch import HttpFetcher

__all__ = ["UpdateClient", "translate_errors"]


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Re-root python-tuf's exceptions by blame."""
    try:
        yield
    except tuf_exc.ExpiredMetadataError as e:
        raise RepositoryError(f"{what}: {e}", hint="the repository's metadata has expired (or the device clock is wrong); "
                              "the publisher must re-sign it ('abflip repo refresh')") from None
    except tuf_exc.SlowRetrievalError as e:
        raise TransportError(f"{what}: the server was too slow: {e}") from None
    except tuf_exc.DownloadHTTPError as e:
        raise TransportError(f"{what}: the server answered HTTP {e.status_code}") from None
    except tuf_exc.DownloadLengthMismatchError as e:
        raise RepositoryError(f"{what}: {e}") from None
    except tuf_exc.DownloadError as e:
        cause = e.__cause__ or e.__context__
        raise TransportError(f"{what}: {e}{f' ({cause})' if cause else ''}") from None
    except tuf_exc.RepositoryError as e:
        raise RepositoryError(f"{what}: {type(e).__name__}: {e}") from None


class UpdateClient:
    def __init__(self, *, metadata_url: str, targets_url: str, metadata_dir: Path, trusted_root: Path,
                 fetcher: HttpFetcher, updater_config: UpdaterConfig | None = None) -> None:
        try:
            bootstrap = Path(trusted_root).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read the trusted root {trusted_root}: {e}",
                            hint="repository.trusted_root must name the root.json the device trusts") from None
        metadata_dir.mkdir(parents=True, exist_ok=True)
        self.fetcher = fetcher
        self.targets_url = targets_url if targets_url.endswith("/") else targets_url + "/"
        with translate_errors("the trusted root is invalid"):
            self.updater = Updater(str(metadata_dir), metadata_url, None, self.targets_url, fetcher,
                                   updater_config or UpdaterConfig(), bootstrap=bootstrap)

    def refresh(self) -> None:
        with translate_errors("refreshing TUF metadata failed"):
            self.updater.refresh()

    def target_info(self, path: str) -> TargetFile:
        with translate_errors(f"looking up {path}"):
            info = self.updater.get_targetinfo(path)
        if info is None:
            raise RepositoryError(f"{path} is not in the repository's signed targets")
        return info

    def target_url(self, info: TargetFile) -> str:
        return self.targets_url + info.get_prefixed_paths()[0]

    def fetch_target(self, path: str, max_length: int) -> tuple[TargetFile, bytes]:
        """Download a small target into memory, bounded by ``max_length``, and verify it."""
        info = self.target_info(path)
        if info.length > max_length:
            raise RepositoryError(f"{path} is {info.length} bytes, more than the limit {max_length}")
        with translate_errors(f"downloading {path}"):
            data = self.fetcher.download_bytes(self.target_url(info), info.length)
        try:
            info.verify_length_and_hashes(data)
        except tuf_exc.LengthOrHashMismatchError as e:
            raise RepositoryError(f"{path} does not match the signed targets metadata: {e}") from None
        return info, data
