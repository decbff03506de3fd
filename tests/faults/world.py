"""The campaign's world: two releases and a TUF repository (built once, cached), a counting
HTTP server on 127.0.0.1, and one snapshot of a simulated device per starting state.

Each trial gets its own URL prefix (``/t/<trial>/``) so the shared server can tell which
trial fetched which image bytes (the resume bound needs that).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path("/tmp/faults/cache")
CHUNK = 256 << 10
PIECE = 64 << 10  # several pieces per chunk: the device reads ahead two of them
SLOT_SIZE = 4 << 20
VERSIONS = ("1.0.0", "2.0.0")

#: Starting states, in the order the update passes through them.
STATES = ("idle", "downloading", "staged", "pending", "trial", "committed", "rollback-requested", "idle-delta")
#: Starting states only some commands are run from (the others would repeat "idle").
ONLY = {"idle-delta": ("install",)}  # a provisioned device (its image's sha256 known): updates through the delta


class Interrupted(BaseException):
    """Raised from a progress callback to leave a download half done (not an abflip Error)."""


def _source_key() -> str:
    """Releases and repository depend on the producer code, this file and the day (metadata expiry)."""
    h = hashlib.sha256(datetime.now(UTC).strftime("%Y-%m-%d").encode())
    h.update(Path(__file__).read_bytes())
    for d in ("builder", "metadata"):
        for p in sorted((ROOT / d).rglob("*.py")):
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Releases:
    base: Path  # holds release-<v>/, <v>.erofs, repo/, keys/

    @property
    def repo(self) -> Path:
        return self.base / "repo"

    def image(self, version: str) -> Path:
        return self.base / f"{version}.erofs"

    def manifest(self, version: str) -> dict:
        return json.loads((self.base / f"release-{version}" / "release.json").read_text())

    def known_images(self) -> dict[str, tuple[int, str]]:
        """version -> (image size, sha256) from the manifests."""
        out = {}
        for v in VERSIONS:
            img = self.manifest(v)["image"]
            out[v] = (img["size"], img["sha256"])
        return out

    def known_boot_files(self) -> set[str]:
        """sha256 of every boot file of a known release."""
        out = set()
        for v in VERSIONS:
            boot = self.manifest(v)["boot"]
            for value in boot.values():
                if isinstance(value, dict) and "sha256" in value:
                    out.add(value["sha256"])
        return out

    def chunks(self, version: str) -> list[dict]:
        return self.manifest(version)["image"]["chunks"]


def build_releases() -> Releases:
    """Build 1.0.0 and 2.0.0 (1 MiB erofs, 256 KiB chunks) and publish both (cached by source)."""
    base = CACHE / _source_key()
    if (base / "done").exists():
        return Releases(base)
    from abflip.demo import HARDWARE, PRODUCT, make_rootfs
    from builder.image import build_image
    from builder.publish import publish_release, write_signed
    from builder.release import create_release
    from builder.storage.local import LocalStorage
    from metadata.keys import KeyConfig
    from metadata.repository import init_repository

    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    kernel = base / "vmlinuz"
    kernel.write_bytes(b"kernel " * 500)
    initrd = base / "initrd.img"
    initrd.write_bytes(b"initrd " * 500)
    for n, v in enumerate(VERSIONS):
        tree = make_rootfs(base / f"tree-{v}", v, size=1 << 20, seed=1)
        if n:  # 2.0.0: 1.0.0 with two files changed, and a delta from 1.0.0 (docs/delta.md)
            for name in ("lib000.so", "lib002.so"):
                p = tree / "usr" / "lib" / name
                data = p.read_bytes()
                p.write_bytes(data[:len(data) // 2] + b"2.0.0 fix" + data[len(data) // 2 + 9:])
        img = build_image(tree, base / f"{v}.erofs", source_date_epoch=1700000000)
        create_release(img.path, base / f"release-{v}", product=PRODUCT, version=v, compatible=[HARDWARE],
                       kernel=kernel, initrd=initrd, options="ro", chunk_size=CHUNK, window=CHUNK, created=1700000000,
                       piece_size=PIECE, delta_from=[base / "release-1.0.0"] if n else [])
        shutil.rmtree(base / f"tree-{v}")
    storage = LocalStorage(base / "repo")
    write_signed(storage, init_repository(base / "keys"))
    keys = KeyConfig.load(base / "keys")
    for v in VERSIONS:
        publish_release(base / f"release-{v}", storage, keys, channel="stable")
    (base / "done").write_text("ok\n")
    return Releases(base)


# -- the server --------------------------------------------------------------------------
_PREFIX = re.compile(r"^/t/([A-Za-z0-9_.-]+)(/.*)$")


class Accounts:
    """Per trial: the image ranges requested (start offsets) and the image bytes sent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.starts: dict[str, list[int]] = defaultdict(list)
        self.sent: dict[str, int] = defaultdict(int)

    def take(self, trial: str) -> dict:
        with self.lock:
            return {"starts": self.starts.pop(trial, []), "sent": self.sent.pop(trial, 0)}


def make_server(repo: Path):
    """A started :class:`abflip.httpserver.Server` over ``repo`` that strips and counts trial prefixes."""
    from abflip.httpserver import RepoHandler, Server

    accounts = Accounts()

    class Counting(RepoHandler):
        trial = ""

        def resolve(self):
            m = _PREFIX.match(self.path.split("?", 1)[0])
            if m is None:
                return None
            self.trial = m.group(1)
            saved, self.path = self.path, m.group(2)
            try:
                return super().resolve()
            finally:
                self.path = saved

        def do_GET(self, head: bool = False) -> None:
            if self.path.startswith("/_account/"):
                data = json.dumps(accounts.take(self.path.rsplit("/", 1)[1])).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if self.path.endswith(".zst"):
                rng = self.headers.get("Range") or "bytes=0-"
                m = re.match(r"bytes=(\d+)-", rng)
                m2 = _PREFIX.match(self.path)
                if m and m2:
                    with accounts.lock:
                        accounts.starts[m2.group(1)].append(int(m.group(1)))
            super().do_GET(head)

        def send_bytes(self, data, start: int, end: int) -> None:
            super().send_bytes(data, start, end)
            if self.path.endswith(".zst"):
                with accounts.lock:
                    accounts.sent[self.trial] += end - start

    server = Server(repo, handler=Counting)
    server.__enter__()
    return server


def account(base_url: str, trial: str) -> dict:
    """What the server recorded for ``trial`` since the last call (and forget it)."""
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/_account/{trial}", timeout=10) as r:
        return json.loads(r.read())


# -- device snapshots --------------------------------------------------------------------
def set_trial_url(root: Path, base_url: str, trial: str) -> None:
    cfg = root / "abflip.toml"
    text = re.sub(r'^url = ".*"$', f'url = "{base_url}/t/{trial}"', cfg.read_text(), count=1, flags=re.M)
    cfg.write_text(text)


def copy_device(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)


def device(root: Path):
    """An in-process agent for the device in ``root`` (no reboot command: the harness power-cycles)."""
    from applier.agent import Device
    from applier.config import Config

    return Device(Config.load(root / "abflip.toml"))


def make_snapshots(rel: Releases, base_url: str, out: Path) -> dict[str, Path]:
    """One device directory per starting state, made by the real agent (in process)."""
    from abflip.demo import HARDWARE, PRODUCT
    from abflip.sim import SimDevice

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    snaps: dict[str, Path] = {}

    idle = out / "idle"
    sim = SimDevice.create(idle, repository_url=f"{base_url}/t/snap", trusted_root=(rel.repo / "metadata" / "1.root.json").read_bytes(),
                           product=PRODUCT, hardware_id=HARDWARE, slot_size=SLOT_SIZE, retries=1, timeout=5.0)
    sim.provision(rel.image("1.0.0"), slot="a", version="1.0.0", product=PRODUCT,
                  kernel=(rel.base / "vmlinuz").read_bytes(), initrd=(rel.base / "initrd.img").read_bytes())
    device(idle).mark_good()
    snaps["idle"] = idle

    def step(name: str, prev: str, fn) -> None:
        d = out / name
        copy_device(snaps[prev], d)
        fn(d)
        snaps[name] = d

    def interrupted(d: Path) -> None:
        from applier.agent import Device
        from applier.config import Config

        def progress(ev: dict) -> None:
            if ev.get("phase") == "download" and ev.get("chunk") == 2:
                raise Interrupted()

        try:
            Device(Config.load(d / "abflip.toml"), progress=progress).download()
        except Interrupted:
            pass

    from abflip.sim import SimDevice as S

    delta = out / "idle-delta"  # flashed and provisioned: the device knows its image, so it takes the delta
    sim = SimDevice.create(delta, repository_url=f"{base_url}/t/snap",
                           trusted_root=(rel.repo / "metadata" / "1.root.json").read_bytes(), product=PRODUCT,
                           hardware_id=HARDWARE, slot_size=SLOT_SIZE, retries=1, timeout=5.0)
    shutil.copyfile(rel.image("1.0.0"), sim.slot_path("a"))
    os.truncate(sim.slot_path("a"), SLOT_SIZE)

    device(delta).provision(rel.base / "release-1.0.0")
    sim.boot()
    snaps["idle-delta"] = delta

    step("downloading", "idle", interrupted)
    step("staged", "downloading", lambda d: device(d).download())
    step("pending", "staged", lambda d: device(d).apply(now=True))
    step("trial", "pending", lambda d: S(d).boot())
    step("committed", "trial", lambda d: device(d).boot_check())
    step("rollback-requested", "committed", lambda d: device(d).rollback())
    for d in snaps.values():
        account(base_url, "snap")
        for stray in list(d.rglob(".state-*")) + list(d.rglob(".abflip-tmp-*")):
            stray.unlink()
    return snaps
