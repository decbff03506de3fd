"""TUF refresh and target lookup on the device (python-tuf ngclient).

Trust starts from the root shipped in the image (``repository.trusted_root``) and follows
rotations; the metadata cache lives in ``<state_dir>/tuf``. Every target the device uses
(channel pointer, release manifest, boot files) is fetched with a length bound and checked
against the signed targets metadata before it is parsed. The image itself is not fetched
here: :mod:`applier.stream` verifies it chunk by chunk against the signed manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.api.serialization import DeserializationError
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from metadata.bounded import open_regular, read_file
from metadata.errors import DeviceError, RepositoryError, TransportError, UserError

from .atomic import write_atomic
from .fetch import HttpFetcher, transport_hint

__all__ = ["TargetMissing", "UpdateClient", "translate_errors"]


class _Naming(FetcherInterface):
    """Passes ngclient's requests to the device's fetcher and remembers the last file asked
    for (its URL and the first bytes that came back), so a length, transport or parse error
    during a refresh can say which metadata it was and what arrived instead."""

    def __init__(self, inner: FetcherInterface) -> None:
        self.inner = inner
        self.last = ""
        self.url = ""
        self.head = b""

    def fetch(self, url: str) -> Iterator[bytes]:
        self.last = url.rsplit("/", 1)[-1]
        self.url = url
        self.head = b""
        return self._keep_head(self.inner.fetch(url))

    def _keep_head(self, pieces: Iterator[bytes]) -> Iterator[bytes]:
        for data in pieces:
            if len(self.head) < _HEAD:
                self.head += bytes(data[:_HEAD - len(self.head)])
            yield data

    def _fetch(self, url: str) -> Iterator[bytes]:  # abstract in FetcherInterface; fetch() above is used
        return self.inner._fetch(url)

    def describe(self) -> str:
        """'timestamp.json from http://…/timestamp.json, which starts with b'<!DOCTYPE html>…''"""
        if not self.url:
            return ""
        text = f"{self.last} from {self.url}"
        if self.head and not self.head.lstrip().startswith(b"{"):
            text += f", which starts with {self.head!r} (not JSON: a web page or an error body?)"
        return text


_HEAD = 40


_EXPIRED_ROLE = re.compile(r"(?:New |Final )?([\w.-]+?)(?:\.json)? is expired")


def expired_role(e: Exception) -> str | None:
    """The role python-tuf's ExpiredMetadataError names ('timestamp', 'edge-os'), if it names one."""
    m = _EXPIRED_ROLE.search(str(e))
    return m[1] if m else None


def _expired_message(e: Exception, expiry_of: Callable[[str], datetime | None] | None) -> str:
    """'role timestamp expired at 2026-01-02 03:04:05 UTC (timestamp.json is expired)'"""
    named = expired_role(e)
    role = named or "metadata"
    when = expiry_of(role) if (expiry_of and named) else None
    at = f" at {when:%Y-%m-%d %H:%M:%S} UTC" if when else ""
    return f"role {role} expired{at} ({e})"


@contextlib.contextmanager
def translate_errors(what: str, expiry_of: Callable[[str], datetime | None] | None = None,
                     fetching: Callable[[], str] | None = None, *, local: str | None = None,
                     received: Callable[[], str] | None = None) -> Iterator[None]:
    """Re-root python-tuf's exceptions by blame. ``expiry_of(role)`` tells when a role expired;
    ``fetching()`` names the file being downloaded when a transport, length or parse error
    struck, ``received()`` says what arrived when it did not parse; ``local`` names the local place written meanwhile (a local ``OSError`` becomes a
    :class:`DeviceError` naming it). Transport messages start with the URL (applier.fetch)."""
    try:
        try:
            yield
        except (tuf_exc.DownloadError, tuf_exc.RepositoryError) as e:
            name = fetching() if fetching else ""
            if received is not None and isinstance(e, DeserializationError):
                name = received() or name
            if name and name not in str(e) and not isinstance(e, tuf_exc.ExpiredMetadataError):
                e.args = (f"{name}: {e}",)
            raise
    except tuf_exc.ExpiredMetadataError as e:
        raise RepositoryError(f"{what}: {_expired_message(e, expiry_of)}",
                              hint="the repository's metadata has expired (or the device clock is wrong); "
                              "the publisher must re-sign it ('abflip repo refresh' for snapshot/timestamp, "
                              "the offline key holders for root/targets)") from None
    except tuf_exc.SlowRetrievalError as e:
        raise TransportError(f"{what}: the server was too slow: {e}", hint=transport_hint(e)) from None
    except tuf_exc.DownloadHTTPError as e:
        raise TransportError(f"{what}: {e}", hint=transport_hint(e)) from None
    except tuf_exc.DownloadLengthMismatchError as e:
        raise RepositoryError(f"{what}: {e}") from None
    except tuf_exc.DownloadError as e:
        raise TransportError(f"{what}: {e}") from None
    except DeserializationError as e:
        raise RepositoryError(f"{what}: {e}", hint="what the server sent is not TUF metadata: a captive portal, a "
                              "proxy's error page or a misconfigured mirror (open repository.url + "
                              "/metadata/timestamp.json in a browser), or a broken publish; nothing was installed") from None
    except tuf_exc.UnsignedMetadataError as e:
        raise RepositoryError(f"{what}: {e}: below the role's signature threshold of trusted keys "
                              "(bad signature, wrong or revoked key, or too few signatures)") from None
    except tuf_exc.RepositoryError as e:
        raise RepositoryError(f"{what}: {type(e).__name__}: {e}") from None
    except OSError as e:
        raise DeviceError(f"{what}: {local or 'a local file'} cannot be written: {_os_text(e)}",
                          hint="free space on the state directory's filesystem, and check that "
                          "paths.state_dir and what is inside it are writable directories") from None


def _os_text(e: OSError) -> str:
    """'No space left on device (/var/lib/abflip/tuf/tmpab12)'"""
    text = e.strerror or str(e)
    name = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        name = f"{name} -> {e.filename2}"
    return f"{text} ({name})" if name else text


#: ``channels()``: the probe name looked up, and its bounds.
_PROBE = ".abflip-channel-list.json"
MAX_ROLES = 64
MAX_CHANNELS = 200


class TargetMissing(RepositoryError):
    """The signed targets metadata has no such target."""


class UpdateClient:
    def __init__(self, *, metadata_url: str, targets_url: str, metadata_dir: Path, trusted_root: Path,
                 fetcher: HttpFetcher, updater_config: UpdaterConfig | None = None) -> None:
        try:
            bootstrap = read_file(trusted_root, (updater_config or UpdaterConfig()).root_max_length)
        except OSError as e:  # also FileRefused: a FIFO, a directory, a huge file
            raise UserError(f"cannot read the trusted root {trusted_root}: {e}",
                            hint="repository.trusted_root must name the root.json the device trusts") from None
        self.fetcher = fetcher
        self.targets_url = targets_url if targets_url.endswith("/") else targets_url + "/"
        self._cache = f"the TUF metadata cache {metadata_dir}"
        self._naming = _Naming(fetcher)
        with translate_errors("preparing the TUF client failed", local=self._cache):
            metadata_dir.mkdir(parents=True, exist_ok=True)
        try:
            with translate_errors("loading the trusted root failed", local=self._cache):
                self.updater = Updater(str(metadata_dir), metadata_url, None, self.targets_url, self._naming,
                                       updater_config or UpdaterConfig(), bootstrap=bootstrap)
        except RepositoryError as e:  # only the local file is read here: the device's configuration
            raise UserError(f"the trusted root {trusted_root} is not a valid TUF root ({e.message})",
                            hint="repository.trusted_root must name the repository's root.json (metadata/1.root.json "
                                 "of 'abflip repo init'), shipped in the device image") from None

    def _expiry_of(self, role: str) -> datetime | None:
        """When ``role`` expires, from the metadata ngclient verified (it keeps an expired
        timestamp/snapshot/root for rollback checks), for error messages only."""
        trusted = getattr(self.updater, "_trusted_set", None)
        try:
            md = trusted.get(role) if trusted is not None else None
        except Exception:  # a diagnostic only; never mask the real error
            md = None
        return md.expires if md is not None else None

    def refresh(self) -> None:
        with translate_errors("refreshing TUF metadata failed", self._expiry_of, lambda: self._naming.last,
                              local=self._cache, received=self._naming.describe):
            self.updater.refresh()

    def target_info(self, path: str) -> TargetFile:
        with translate_errors(f"looking up {path}", self._expiry_of, lambda: self._naming.last,
                              local=self._cache, received=self._naming.describe):
            info = self.updater.get_targetinfo(path)
        if info is None:
            raise TargetMissing(f"{path} is not in the repository's signed targets")
        return info

    def channels(self, product: str) -> list[str]:
        """The channel names of ``product`` in the signed targets metadata (sorted), to tell a
        device whose configured channel is not there what it could have meant.

        A lookup under ``<product>/channels/`` makes ngclient load (and verify) the roles that
        may hold them; then the loaded roles are walked from the top-level targets through their
        delegations, a delegated role's paths counted only where its delegators trust it for
        them. Of a hash-bin delegation (TAP 15; abflip's product roles list their channel pointers
        themselves), only the bin the lookup loaded is walked. Bounded: at most ``MAX_ROLES`` roles
        and ``MAX_CHANNELS`` names. A diagnostic, so best effort: a role that cannot be loaded (say,
        delegated but never published) adds nothing, and the caller's own error stands."""
        probe = f"{product}/channels/{_PROBE}"
        try:
            with translate_errors(f"listing the channels of {product}", self._expiry_of, lambda: self._naming.last,
                                  local=self._cache, received=self._naming.describe):
                self.updater.get_targetinfo(probe)
        except (RepositoryError, TransportError, DeviceError):
            pass  # list what the roles loaded so far hold
        trusted = getattr(self.updater, "_trusted_set", None)
        if trusted is None:
            return []
        pattern = re.compile(re.escape(product) + r"/channels/([^/]+)\.json")
        found: set[str] = set()
        queue: list[tuple[str, Callable[[str], bool]]] = [("targets", lambda path: True)]
        seen: set[str] = set()
        while queue and len(seen) < MAX_ROLES:
            name, trusted_for = queue.pop(0)
            if name in seen:
                continue
            seen.add(name)
            try:
                signed = trusted[name]
            except KeyError:
                continue  # not loaded: not on the lookup's path
            for path in signed.targets:
                m = pattern.fullmatch(path)
                if m and m[1] != _PROBE[:-5] and trusted_for(path):
                    found.add(m[1])
            delegations = signed.delegations
            for role in (delegations.roles or {}).values() if delegations is not None else ():
                queue.append((role.name, lambda path, up=trusted_for, role=role: up(path) and role.is_delegated_path(path)))
            if delegations is not None and delegations.succinct_roles is not None:
                bins = delegations.succinct_roles
                b = bins.get_role_for_target(probe)
                queue.append((b, lambda path, up=trusted_for, bins=bins, b=b: up(path) and bins.get_role_for_target(path) == b))
        return sorted(found)[:MAX_CHANNELS]

    def target_url(self, info: TargetFile) -> str:
        """Where a target is stored: hash-prefixed under consistent snapshots (abflip's
        repositories always are), the plain path otherwise (as ngclient's download_target)."""
        trusted = getattr(self.updater, "_trusted_set", None)
        if trusted is not None and not trusted.root.consistent_snapshot:
            return self.targets_url + info.path
        return self.targets_url + info.get_prefixed_paths()[0]

    def fetch_target(self, path: str, max_length: int, *, cache: Path | None = None) -> tuple[TargetFile, bytes]:
        """Download a small target into memory, bounded by ``max_length``, and verify it.

        With ``cache``: a file there that matches the signed length and hashes is used instead
        of the network (TUF already proved the target unchanged), and a download is kept there
        for the next time (best effort: a cache that cannot be written changes nothing)."""
        info = self.target_info(path)
        if info.length > max_length:
            raise RepositoryError(f"{path} is {info.length} bytes, more than the limit {max_length}")
        if cache is not None and self.cached_target(info, cache):
            try:
                return info, read_file(cache, max_length)
            except OSError:
                pass
        _, data = self._download_small(info, path)
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(cache, data)
            except OSError:
                pass
        return info, data

    def _download_small(self, info: TargetFile, path: str) -> tuple[TargetFile, bytes]:
        with translate_errors(f"downloading {path}"):
            data = self.fetcher.download_bytes(self.target_url(info), info.length)
        try:
            info.verify_length_and_hashes(data)
        except tuf_exc.LengthOrHashMismatchError as e:
            raise RepositoryError(f"{path} does not match the signed targets metadata: {e}") from None
        return info, data

    def cached_target(self, info: TargetFile, dest: Path) -> bool:
        """True if ``dest`` already holds ``info``'s exact bytes (length and hashes)."""
        try:
            with open_regular(dest) as f:  # a FIFO left there never blocks the agent
                info.verify_length_and_hashes(f)
        except (OSError, tuf_exc.LengthOrHashMismatchError):
            return False
        return True

    def download_target(self, info: TargetFile, dest: Path) -> Path:
        """Stream a target to ``dest``: never more than its signed length, hashed on the way,
        written to a temporary file beside ``dest`` and renamed only once it verified."""
        algos = {name: hashlib.new(name) for name in info.hashes}
        tmp = dest.with_name(f".{dest.name}.part")
        got = 0
        try:
            with translate_errors(f"downloading {info.path}", local=str(tmp)), open(tmp, "wb") as out:
                for data in self.fetcher.fetch(self.target_url(info)):  # with the slow-retrieval deadline
                    got += len(data)
                    if got > info.length:
                        raise RepositoryError(f"{info.path} is longer than its signed length {info.length}")
                    for h in algos.values():
                        h.update(data)
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
            if got != info.length:
                raise RepositoryError(f"{info.path} is {got} bytes, its signed length is {info.length}")
            for name, h in algos.items():
                if h.hexdigest() != info.hashes[name]:
                    raise RepositoryError(f"{info.path} does not match the signed targets metadata ({name})")
            with translate_errors(f"downloading {info.path}", local=str(dest)):
                os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest
