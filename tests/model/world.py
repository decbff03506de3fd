"""The model checker's world: three tiny releases, a repository held in memory (its channel
pointer made from a small :class:`RepoState`), and a simulated device whose every file is a
value that can be copied, compared and put back.

The repository is reached through the agent's own seams (``Device.client_factory`` and
``Device.fetcher``): the verbs run unchanged, only TUF and HTTP are replaced by bytes in memory
(TUF and the transport have their own tests). Slots are files, the ESP a directory, the boot
loader :class:`abflip.sim.SimDevice`'s model of systemd-boot, as in the fault campaign.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tuf.api.metadata import TargetFile

from abflip.demo import HARDWARE, PRODUCT, make_rootfs
from abflip.sim import SimDevice
from applier.client import TargetMissing
from metadata.manifest import Channel, Release, Rollout, channel_target_path
from metadata.version import Version

VERSIONS = ("1.0.0", "2.0.0", "3.0.0")
BAD = "3.0.0"  # its health check fails on the device (the health hook reads ABFLIP_VERSION)
CHUNK = 64 << 10  # the smallest chunk; one piece each (no pieces)
SLOT_SIZE = 128 << 10  # the images are ~84 KiB
CLOCK = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)


class Releases:
    def __init__(self, base: Path) -> None:
        self.base = base
        self._releases = {v: Release.from_bytes(self.manifest(v)) for v in VERSIONS}
        self._boot_files = {bf.sha256 for r in self._releases.values() for bf in r.boot.files().values()}
        self._files: dict[str, bytes] = {}

    def dir(self, version: str) -> Path:
        return self.base / f"release-{version}"

    def manifest(self, version: str) -> bytes:
        return (self.dir(version) / "release.json").read_bytes()

    def release(self, version: str) -> Release:
        return self._releases[version]

    def read(self, path: Path) -> bytes:
        data = self._files.get(str(path))
        if data is None:
            data = self._files[str(path)] = path.read_bytes()
        return data

    def image(self, version: str) -> Path:
        return self.base / f"{version}.erofs"

    def target_file(self, path: str) -> Path | None:
        """The local file of a target path ``<product>/releases/<v>/<name>``."""
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != PRODUCT or parts[1] != "releases" or parts[2] not in VERSIONS:
            return None
        p = self.dir(parts[2]) / parts[3]
        return p if p.is_file() else None

    def images(self) -> dict[str, tuple[int, str]]:
        """version -> (image size, sha256)."""
        return {v: (r.image.size, r.image.sha256) for v, r in self._releases.items()}

    def boot_files(self) -> set[str]:
        return self._boot_files


def build_releases(base: Path) -> Releases:
    """Three releases of tiny erofs images (two chunks each), built once per session."""
    from builder.image import build_image
    from builder.release import create_release

    base.mkdir(parents=True, exist_ok=True)
    kernel, initrd = base / "vmlinuz", base / "initrd.img"
    for n, v in enumerate(VERSIONS):
        kernel.write_bytes(f"kernel {v} ".encode() * 64)
        initrd.write_bytes(f"initrd {v} ".encode() * 64)
        tree = make_rootfs(base / f"tree-{v}", v, size=80 << 10, seed=n + 1)
        img = build_image(tree, base / f"{v}.erofs", source_date_epoch=1700000000)
        create_release(img.path, base / f"release-{v}", product=PRODUCT, version=v, compatible=[HARDWARE],
                       kernel=kernel, initrd=initrd, options="ro", chunk_size=CHUNK, window=CHUNK,
                       created=1700000000, piece_size=0)
    return Releases(base)


@dataclass(frozen=True)
class RepoState:
    """What the channel says: its version, its withdrawn versions, its rollout (None: every
    device; ``(0, False)``: nobody yet; ``(100, True)``: paused)."""

    version: str = "1.0.0"
    withdrawn: frozenset[str] = frozenset()
    rollout: tuple[int, bool] | None = None

    def pointer(self) -> bytes:
        rollout = None if self.rollout is None else Rollout(self.rollout[0], self.rollout[1], "model")
        return Channel(PRODUCT, "stable", Version.parse(self.version),
                       f"{PRODUCT}/releases/{self.version}/release.json", rollout=rollout,
                       withdrawn=tuple(sorted(self.withdrawn, key=Version.parse))).to_bytes()

    def label(self) -> str:
        parts = [self.version]
        if self.withdrawn:
            parts.append("withdrawn " + ",".join(sorted(self.withdrawn)))
        if self.rollout is not None:
            parts.append("paused" if self.rollout[1] else f"rollout {self.rollout[0]}%")
        return " ".join(parts)


class _Range(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else min(len(self._data), self._pos + n)
        out = bytes(self._data[self._pos:end])
        self._pos = end
        return out


class MemoryFetcher:
    """``HttpFetcher.open_range`` over the releases' files."""

    def __init__(self, releases: Releases) -> None:
        self.releases = releases

    def open_range(self, url: str, start: int, end: int) -> _Range:
        p = self.releases.target_file(url.removeprefix("mem://"))
        assert p is not None, url
        data = self.releases.read(p)
        return _Range(data[start:end] if end else data[start:])


class MemoryClient:
    """The verbs' TUF client (:class:`applier.client.UpdateClient`), answering from ``repo``."""

    def __init__(self, releases: Releases, repo: RepoState) -> None:
        self.releases, self.repo = releases, repo
        self.pointer_path = channel_target_path(PRODUCT, "stable")

    def refresh(self) -> None:
        pass

    def _bytes(self, path: str) -> bytes:
        if path == self.pointer_path:
            return self.repo.pointer()
        p = self.releases.target_file(path)
        if p is None:
            raise TargetMissing(f"{path} is not in the repository's signed targets")
        return self.releases.read(p)

    def target_info(self, path: str) -> TargetFile:
        return TargetFile.from_data(path, self._bytes(path), ["sha256"])

    def channels(self, product: str) -> list[str]:
        return ["stable"]

    def target_url(self, info: TargetFile) -> str:
        return f"mem://{info.path}"

    def fetch_target(self, path: str, max_length: int, *, cache: Path | None = None) -> tuple[TargetFile, bytes]:
        data = self._bytes(path)
        return TargetFile.from_data(path, data, ["sha256"]), data

    def download_target(self, info: TargetFile, dest: Path) -> Path:
        tmp = dest.with_name(f".{dest.name}.part")
        tmp.write_bytes(self._bytes(info.path))
        os.replace(tmp, dest)
        return dest


# -- the device as a value ------------------------------------------------------------------------
#: the names of what a killed writer leaves behind (swept by the next command under the lock)
_LITTER = re.compile(r"(^|/)(\.state-[^/]*|\.abflip-tmp[^/]*|[^/]*\.abflip-tmp(-case)?|\.[^/]*\.part|tmp[a-z0-9_]{6,})$")
Snapshot = tuple[tuple[str, bytes], ...]  # (relative path, bytes) of every file; a directory is b"/dir"
DIR = b"\0dir"


def snapshot(root: Path) -> Snapshot:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for n in dirnames:
            out.append((str((d / n).relative_to(root)), DIR))
        for n in filenames:
            out.append((str((d / n).relative_to(root)), (d / n).read_bytes()))
    return tuple(sorted(out))


def restore(root: Path, snap: Snapshot, on_disk: Snapshot | None = None) -> None:
    """Make ``root`` hold exactly ``snap``; with ``on_disk`` (what it holds now), only the
    differences are written."""
    if on_disk is None:
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        old: dict[str, bytes] = {}
    else:
        old = dict(on_disk)
    new = dict(snap)
    for rel in sorted((r for r in old if r not in new), key=lambda r: r.count("/"), reverse=True):
        p = root / rel
        if old[rel] == DIR:
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for rel, data in snap:
        if old.get(rel) == data:
            continue
        p = root / rel
        if data == DIR:
            p.mkdir(parents=True, exist_ok=True)
        else:
            if old.get(rel) == DIR:
                shutil.rmtree(p)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            if rel.startswith("hooks/"):
                p.chmod(0o755)


def initial_device(root: Path, releases: Releases) -> Snapshot:
    """A device flashed with 1.0.0 in slot a and provisioned, with a health hook that fails on
    the bad release."""
    sim = SimDevice.create(root, repository_url="http://127.0.0.1:9/", trusted_root=b"{}", product=PRODUCT, hardware_id=HARDWARE,
                           slot_size=SLOT_SIZE, tries=2, retries=0)
    with open(releases.image("1.0.0"), "rb") as src, open(sim.slot_path("a"), "r+b") as dst:
        shutil.copyfileobj(src, dst)
    sim.add_hook("health-check", "10-app", f'[ "$ABFLIP_VERSION" != "{BAD}" ] || {{ echo "app down"; exit 1; }}')
    (root / "cmdline").write_text("root=PARTLABEL=root-a abflip.slot=a ro\n")
    return snapshot(root)


@dataclass
class Digest:
    """What a snapshot is, for the checker: the canonical key and the parsed facts."""

    key: str
    material: str  # the key without what the device records of the channel (release-control.json)
    state: dict | None
    entries: list[str]
    slots: dict[str, str | None]  # slot -> the version whose image it holds (None: none)
    files: dict[str, bytes] = field(repr=False, default_factory=dict)


def digest(snap: Snapshot, releases: Releases) -> Digest:
    import json

    files = dict(snap)
    h = hashlib.sha256()
    litter = hashlib.sha256()  # what only a killed run leaves, and the next command sweeps
    record = b""
    state = None
    for rel, data in snap:
        if rel.startswith(("state/offer", "state/tuf", "state/lock", "state/history.jsonl")):
            continue  # caches, the lock, and the history: a log no verb reads
        if rel == "state/state.json":
            try:
                state = json.loads(data)
            except ValueError:
                state = None
            if state is not None:
                data = json.dumps({k: v for k, v in state.items() if k not in ("updated", "last_error")},
                                  sort_keys=True).encode()
        if rel == "state/release-control.json":
            record = data
            continue
        if _LITTER.search(rel):
            litter.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
            continue
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    images = releases.images()
    slots = {}
    for s in "ab":
        data = files.get(f"slot-{s}.img", b"")
        slots[s] = next((v for v, (size, sha) in images.items() if hashlib.sha256(data[:size]).hexdigest() == sha),
                        None)
    entries = sorted(rel.rsplit("/", 1)[1] for rel, d in snap if rel.startswith("esp/loader/entries/")
                     and rel.endswith(".conf") and d != DIR)
    material = h.hexdigest()
    h.update(record + litter.digest())
    return Digest(h.hexdigest(), material, state, entries, slots, files)
