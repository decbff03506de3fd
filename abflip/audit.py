"""Audit a repository the way a device reads it.

``audit(location)`` refreshes TUF metadata with python-tuf's ngclient (root chain, timestamp,
snapshot, targets and delegated roles, with expiry and rollback checks) from a directory, an
``s3://`` bucket (read through :mod:`builder.storage`) or an ``http(s)://`` URL (read with the
device's own :class:`applier.fetch.HttpFetcher`), then checks every channel of every product:

- the channel pointer and the release manifest it names are signed targets and parse;
- the image target's length equals the chunk table's total;
- every boot file is a target whose sha256 and length match the manifest;
- with ``deep``: every chunk of the image is downloaded, verified against the chunk table,
  decompressed with its dictionary and checked, and the whole image's sha256 compared
  (memory: one chunk, one window, read in pieces from every backend; nothing is written to disk).

It reports each role's version and expiry. A product with hash bins (docs/formats.md): every
bin is loaded and verified as a device would (signatures, snapshot version, expiry), though a
device never needs one, and each release target its role lists besides the channel pointers
must be in its bin too (gc and later publishes read releases from the bins).
Without a trusted root given, the repository's own ``1.root.json`` is trusted (the audit then
checks consistency, not authenticity). Problems are collected, not raised, so one report lists
them all.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import quote, unquote

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from metadata.errors import Error, RepositoryError, TransportError, UserError
from metadata.manifest import Channel, Release

__all__ = ["audit", "AuditFailed", "StorageFetcher"]

STORAGE_BASE = "abflip-storage:///"
PROBE = "__abflip_audit_probe__"
MAX_BINS = 1 << 8  # metadata.repository.MAX_BIN_BITS: more is not what abflip publishes


class AuditFailed(RepositoryError):
    """The audit found problems; ``report`` has them all."""

    def __init__(self, report: dict) -> None:
        problems = report["problems"]
        super().__init__(f"{len(problems)} problem(s) in {report['repository']}: " + "; ".join(problems[:5])
                         + (" ..." if len(problems) > 5 else ""), hint="fix the repository (re-publish) before devices see it")
        self.report = report

    def to_json(self) -> dict:
        return {**super().to_json(), "report": self.report}


class StorageFetcher(FetcherInterface):
    """TUF fetcher over a :mod:`builder.storage` backend (a directory or a bucket):
    ``abflip-storage:///<key>`` reads object ``<key>``; a missing object is an HTTP-like 404."""

    def __init__(self, storage) -> None:
        self.storage = storage

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(STORAGE_BASE):
            raise tuf_exc.DownloadError(f"unexpected URL {url}")
        key = unquote(url[len(STORAGE_BASE):])
        stream = getattr(self.storage, "stream", None)
        if stream is not None:  # bounded memory for images (--deep)
            pieces = stream(key)
            if pieces is None:
                raise tuf_exc.DownloadHTTPError(f"{key}: not found", 404)
            return pieces
        data = self.storage.get(key)
        if data is None:
            raise tuf_exc.DownloadHTTPError(f"{key}: not found", 404)
        return iter([data])


def _open(location: str, *, endpoint_url: str | None, region: str | None, profile: str | None,
          timeout: float) -> tuple[FetcherInterface, str, object | None]:
    """(fetcher, base URL, storage or None)."""
    if location.startswith(("http://", "https://")):
        from applier.fetch import HttpFetcher

        return HttpFetcher(timeout=timeout), location.rstrip("/") + "/", None
    from builder.storage import open_storage

    if location.startswith("s3://"):
        storage = open_storage(location, endpoint_url=endpoint_url, region=region, profile=profile)
    else:
        if not Path(location).is_dir():
            raise UserError(f"{location} is not a directory, an s3:// URL or an http(s):// URL",
                            hint="pass the repository: the directory (or bucket prefix, or URL) holding metadata/ "
                                 "and targets/")
        storage = open_storage(location)
    return StorageFetcher(storage), STORAGE_BASE, storage


def _tuf(what: str, e: Exception, location: str = "REPO") -> Error:
    if isinstance(e, tuf_exc.DownloadError):
        return TransportError(f"{what}: {e}")
    if isinstance(e, tuf_exc.ExpiredMetadataError):
        return RepositoryError(f"{what}: {e}", hint=_resign_hint(e, location))
    return RepositoryError(f"{what}: {type(e).__name__}: {e}",
                           hint="devices refuse this repository as it is: fix it (publish again, or re-sign the role "
                                "named) before they see it")


def _resign_hint(e: Exception, location: str) -> str:
    """What the publisher runs when a role has expired (docs/keys.md): the audit is their tool."""
    from applier.client import expired_role

    role = expired_role(e)
    if role in ("root", "targets"):
        return (f"{role} is offline: its key holders re-sign it with a rotation that changes nothing (abflip repo "
                f"rotate {role} --keys KEYS --to {location}, then repo sign and repo commit; docs/keys.md)")
    return (f"re-sign it: abflip repo refresh --repo {location} --keys KEYS (keys of the expired role; with split keys "
            "the online signer, abflip repo snapshot), and run that on a schedule (ci/refresh-workflow.yml)")


def _role_info(mdir: Path, name: str, now: datetime) -> dict | None:
    p = mdir / f"{quote(name, '')}.json"
    if not p.exists():
        return None
    md = Metadata.from_bytes(p.read_bytes())
    exp = md.signed.expires
    return {"version": md.signed.version, "expires": exp.isoformat(),
            "expires_in_days": round((exp - now).total_seconds() / 86400, 2)}


def _all_targets(updater: Updater, mdir: Path, problems: list[str]) -> tuple[dict[str, TargetFile], list[str]]:
    """Every target path of the top-level role and of every delegated role (loaded on demand
    by ngclient: a probe path under each role's patterns makes it fetch and verify the role;
    for hash bins, one probe path that hashes to each bin)."""
    out: dict[str, TargetFile] = {}
    roles: list[tuple[str, str]] = [("targets", "")]  # (role, a probe path that reaches it)
    published = Metadata.from_bytes((mdir / "snapshot.json").read_bytes()).signed.meta  # as refresh() verified it
    seen: set[str] = set()
    while roles:
        name, base = roles.pop(0)
        if name in seen:
            continue
        seen.add(name)
        p = mdir / f"{quote(name, '')}.json"
        if not p.exists():
            continue
        md = Metadata.from_bytes(p.read_bytes())
        for path, t in md.signed.targets.items():
            out.setdefault(path, t)
        dele = md.signed.delegations
        if dele is not None and dele.succinct_roles is not None:
            roles += _load_bins(updater, mdir, name, md, base, problems)
        if dele is None or dele.roles is None:
            continue
        for role in dele.roles.values():
            probe = ""
            for pattern in role.paths or []:
                probe = pattern.replace("*", PROBE).replace("?", "x")
                if fnmatch(probe, pattern):
                    try:
                        updater.get_targetinfo(probe)
                    except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
                        # its channels cannot be listed: said here (unless it was never published), and
                        # every other product is checked
                        if f"{role.name}.json" in published:
                            problems.append(f"role {role.name} cannot be loaded: {type(e).__name__}: {e}")
                    break
            roles.append((role.name, probe))
    return out, sorted(seen)


def _load_bins(updater: Updater, mdir: Path, name: str, md: Metadata, base: str,
               problems: list[str]) -> list[tuple[str, str]]:
    """Load each hash bin ``name`` delegates to (a probe path below ``base`` that hashes to it),
    and check that every target ``name`` lists but its channel pointers is in its bin too."""
    succinct = md.signed.delegations.succinct_roles
    base = base or PROBE
    if succinct.number_of_bins > MAX_BINS:
        problems.append(f"{name} delegates to {succinct.number_of_bins} hash bins; abflip makes at most {MAX_BINS}")
        return []
    probes: dict[str, str] = {}
    for i in range(64 * succinct.number_of_bins):  # a few tries per bin on average
        probe = f"{base}{i}"
        probes.setdefault(succinct.get_role_for_target(probe), probe)
        if len(probes) == succinct.number_of_bins:
            break
    for b, probe in sorted(probes.items()):
        try:
            updater.get_targetinfo(probe)
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
            problems.append(f"hash bin {b} of {name}: {type(e).__name__}: {e}")
    for path, t in md.signed.targets.items():
        if "/channels/" in path:
            continue
        b = succinct.get_role_for_target(path)
        f = mdir / f"{quote(b, '')}.json"
        listed = Metadata.from_bytes(f.read_bytes()).signed.targets.get(path) if f.exists() else None
        if listed != t:
            problems.append(f"{path}: listed by {name} but {'differently ' if listed else 'not '}by its hash bin {b}")
    return [(b, probe) for b, probe in sorted(probes.items())]


def _fetch_target(updater: Updater, fetcher: FetcherInterface, base: str, info: TargetFile, max_length: int) -> bytes:
    url = base + "targets/" + info.get_prefixed_paths()[0]
    data = fetcher.download_bytes(url, max_length)
    info.verify_length_and_hashes(data)
    return data


def _deep_check(fetcher: FetcherInterface, url: str, release: Release,
                progress: Callable[[int, int], None] | None = None) -> str | None:
    """Download the image, verify every chunk, decompress it and check the whole image;
    ``progress(verified compressed bytes, compressed size)`` after each chunk."""
    from applier.stream import decompress_chunk, verify_chunk

    img = release.image
    window = img.compression.window
    whole = hashlib.sha256()
    tail = bytearray()  # the last ``window`` image bytes: the next chunk's dictionary
    pending = bytearray()
    i = 0
    try:
        for piece in fetcher.fetch(url):
            pending += piece
            while i < len(img.chunks) and len(pending) >= img.chunks[i].length:
                ch = img.chunks[i]
                data = bytes(pending[:ch.length])
                del pending[:ch.length]
                verify_chunk(i, ch, data, img.compression.piece_size)
                out = decompress_chunk(i, ch, data, bytes(tail[-window:]) if window and ch.out_offset else None)
                whole.update(out)
                tail += out
                del tail[:max(0, len(tail) - window)]
                i += 1
                if progress is not None:
                    progress(ch.offset + ch.length, img.compressed_size)
    except Error as e:
        return e.message
    except tuf_exc.DownloadError as e:
        return f"downloading the image failed: {e}"
    if i != len(img.chunks) or pending:
        return f"the image has {len(pending)} bytes beyond or misses chunks after chunk {i}"
    if whole.hexdigest() != img.sha256:
        return "the decompressed image's sha256 differs from the manifest"
    return None


def audit(location: str, *, deep: bool = False, trusted_root: bytes | None = None, endpoint_url: str | None = None,
          region: str | None = None, profile: str | None = None, timeout: float = 30.0,
          now: datetime | None = None, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Read ``location`` as a device would and check every channel's release; return a report.
    ``progress(done, total, what)``: bytes of the image ``--deep`` is verifying."""
    now = now or datetime.now(timezone.utc)
    fetcher, base, storage = _open(location, endpoint_url=endpoint_url, region=region, profile=profile, timeout=timeout)
    problems: list[str] = []
    report: dict = {"repository": location, "deep": deep, "roles": {}, "channels": [], "problems": problems}
    with tempfile.TemporaryDirectory(prefix="abflip-audit-") as tmp:
        mdir = Path(tmp)
        given = trusted_root is not None
        if trusted_root is None:
            try:
                trusted_root = fetcher.download_bytes(base + "metadata/1.root.json", 512 << 10)
            except tuf_exc.DownloadHTTPError as e:
                if e.status_code != 404:
                    raise _tuf("reading metadata/1.root.json", e) from None
                raise UserError(f"{location} holds no abflip repository (metadata/1.root.json not found)",
                                hint="check the repository's path, bucket prefix or URL (the place holding metadata/ "
                                     "and targets/); 'abflip repo init' creates a repository") from None
            except tuf_exc.DownloadError as e:
                raise _tuf("reading metadata/1.root.json", e) from None
        try:
            updater = Updater(str(mdir), base + "metadata/", None, base + "targets/", fetcher,
                              UpdaterConfig(prefix_targets_with_hash=True), bootstrap=trusted_root)
        except tuf_exc.RepositoryError as e:  # includes a root that does not parse
            if given:
                raise UserError(f"the trusted root given (--root) is not a TUF root: {e}",
                                hint="pass the root.json devices are shipped with (the repository's "
                                     "metadata/1.root.json, or a later N.root.json)") from None
            raise RepositoryError(f"the repository's metadata/1.root.json is not a TUF root: {e}",
                                  hint="it is what devices start from: restore it from the repository's "
                                       "first publish") from None
        try:
            updater.refresh()
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
            raise _tuf("TUF refresh failed", e, location) from None
        targets, roles = _all_targets(updater, mdir, problems)
        report["warnings"] = _name_warnings(mdir)
        for name in ["root", "timestamp", "snapshot", *roles]:
            info = _role_info(mdir, name, now)
            if info is not None:
                report["roles"][name] = info
        channels = sorted(p for p in targets if "/channels/" in p and p.endswith(".json"))
        for path in channels:
            report["channels"].append(_check_channel(updater, fetcher, base, path, deep, problems, progress))
    report["ok"] = not problems
    return report


def _name_warnings(mdir: Path) -> list[str]:
    """Delegated products one of whose CI wildcards reach another's files (delegated before
    'repo delegate' refused such names: docs/keys.md 'Product names')."""
    from metadata.repository import name_collisions

    p = mdir / "targets.json"
    if not p.exists():
        return []
    return [f"{c}: re-delegate one of them under another name" for c in
            name_collisions(Metadata.from_bytes(p.read_bytes()).signed)]


def _check_channel(updater: Updater, fetcher: FetcherInterface, base: str, path: str, deep: bool,
                   problems: list[str], progress: Callable[[int, int, str], None] | None = None) -> dict:
    product, _, name = path.partition("/channels/")
    row: dict = {"product": product, "channel": name[:-len(".json")], "version": None, "ok": False}

    def bad(msg: str) -> dict:
        problems.append(f"{path}: {msg}")
        row["problem"] = msg
        return row

    try:
        info = updater.get_targetinfo(path)
        if info is None:
            return bad("listed but not resolvable through the delegations")
        ptr = Channel.from_bytes(_fetch_target(updater, fetcher, base, info, 64 << 10))
        row["version"] = str(ptr.version)
        row["rollout"] = ptr.rollout.to_json() if ptr.rollout else None  # None: every device
        row["withdrawn"] = list(ptr.withdrawn)
        if (ptr.product, ptr.channel) != (product, row["channel"]):
            return bad(f"the pointer names {ptr.product}/{ptr.channel}")
        rinfo = updater.get_targetinfo(ptr.release)
        if rinfo is None:
            return bad(f"names {ptr.release}, which is not a signed target")
        release = Release.from_bytes(_fetch_target(updater, fetcher, base, rinfo, 8 << 20))
        row["release"] = ptr.release
        if release.product != product or release.version != ptr.version:
            return bad(f"{ptr.release} is {release.product} {release.version}, the pointer says {ptr.version}")
        iinfo = updater.get_targetinfo(release.image.target)
        if iinfo is None:
            return bad(f"image {release.image.target} is not a signed target")
        row.update(image_size=release.image.size, compressed_size=iinfo.length, chunks=len(release.image.chunks),
                   fstype=release.image.fstype, boot=sorted(release.boot.files()))
        if iinfo.length != release.image.compressed_size:
            return bad(f"the image target is {iinfo.length} bytes, its chunk table adds up to "
                       f"{release.image.compressed_size}")
        for fname, bf in release.boot.files().items():
            binfo = updater.get_targetinfo(bf.target)
            if binfo is None:
                return bad(f"boot file {fname} ({bf.target}) is not a signed target")
            if binfo.hashes.get("sha256") != bf.sha256 or binfo.length != bf.length:
                return bad(f"boot file {fname} differs between the manifest and the targets metadata")
            _fetch_target(updater, fetcher, base, binfo, bf.length)  # present, and its bytes match
        for ref in release.deltas:  # deltas (docs/delta.md): signed, matching their release; --deep: every frame
            from metadata.delta import delta_files_problem

            minfo, dinfo = updater.get_targetinfo(ref.manifest.target), updater.get_targetinfo(ref.data.target)
            if minfo is None or dinfo is None:
                return bad(f"the delta from {ref.source.version} is not a signed target")
            problem = delta_files_problem(ref, _fetch_target(updater, fetcher, base, minfo, ref.manifest.length),
                                          fetcher.fetch(base + "targets/" + dinfo.get_prefixed_paths()[0]) if deep
                                          else None, release.image, product, str(release.version))
            if problem:
                return bad(problem)
            row.setdefault("deltas", []).append(ref.source.version)
        if deep:
            what = f"verifying {product} {release.version} ({row['channel']})"
            problem = _deep_check(fetcher, base + "targets/" + iinfo.get_prefixed_paths()[0], release,
                                  (lambda done, total: progress(done, total, what)) if progress else None)
            if problem:
                return bad(problem)
            row["deep_verified"] = True
    except Error as e:
        return bad(e.message)
    except tuf_exc.DownloadError as e:
        return bad(f"download failed: {e}")
    except tuf_exc.RepositoryError as e:
        return bad(f"{type(e).__name__}: {e}")
    row["ok"] = True
    return row


def render(report: dict) -> str:
    lines = [f"repository {report['repository']}" + (" (deep)" if report["deep"] else "")]
    for role, r in report["roles"].items():
        lines.append(f"  {role:12} v{r['version']:<5} expires {r['expires']} (in {r['expires_in_days']} days)")
    for c in report["channels"]:
        state = "ok" if c["ok"] else f"FAIL: {c.get('problem')}"
        ro = c.get("rollout")
        control = (f"rollout {ro['percent']} %" + (" paused" if ro["paused"] else "")
                   + (f" seed {ro['seed']}" if ro.get("seed") else "")) if ro else "every device"
        control += f"; withdrawn {', '.join(c['withdrawn'])}" if c.get("withdrawn") else ""
        lines.append(f"  {c['product']}/{c['channel']}: {c['version']}  {control}  {state}"
                     if c.get("version") else f"  {c['product']}/{c['channel']}: {state}")
    if not report["channels"]:
        lines.append("  no channels")
    channel_problems = {f"{c['product']}/channels/{c['channel']}.json: {c['problem']}" for c in report["channels"]
                        if "problem" in c}
    lines += [f"  FAIL: {p}" for p in report["problems"] if p not in channel_problems]
    lines += [f"  warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def to_json(report: dict) -> str:
    return json.dumps(report, indent=1, sort_keys=True)
