"""Shared fixtures: real images, a real TUF repository on disk, a real HTTP server on
127.0.0.1, and a simulated device (files as slots, a directory as the ESP)."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import pytest

from abflip.demo import HARDWARE, PRODUCT, make_rootfs
from abflip.httpserver import RepoHandler, Server
from abflip.sim import SimDevice
from applier.agent import Device
from builder.image import build_image
from builder.publish import publish_release, write_signed
from builder.release import create_release
from builder.storage.local import LocalStorage
from metadata.keys import KeyConfig
from metadata.repository import init_repository

CHUNK = 256 << 10
PIECE = 64 << 10  # the smallest verification unit: chunks span several (the device reads ahead two)
VERSIONS = ("1.0.0", "2.0.0", "3.0.0")


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, Path]:
    """Release directories for each version (built once per session)."""
    if not shutil.which("mkfs.erofs") and not Path("/usr/sbin/mkfs.erofs").exists():
        pytest.fail("mkfs.erofs is missing: install erofs-utils (.ci/run does)")
    base = tmp_path_factory.mktemp("releases")
    kernel = base / "vmlinuz"
    kernel.write_bytes(b"kernel " * 500)
    initrd = base / "initrd.img"
    initrd.write_bytes(b"initrd " * 500)
    out = {}
    for n, v in enumerate(VERSIONS):
        tree = make_rootfs(base / f"tree-{v}", v, size=1 << 20, seed=n + 1)
        img = build_image(tree, base / f"{v}.erofs", source_date_epoch=1700000000)
        create_release(img.path, base / f"release-{v}", product=PRODUCT, version=v, compatible=[HARDWARE],
                       kernel=kernel, initrd=initrd, options="ro", chunk_size=CHUNK, window=CHUNK, created=1700000000,
                       piece_size=PIECE)
        out[v] = base / f"release-{v}"
        out[f"{v}.img"] = img.path
    return out


class World:
    """A repository, its keys, the server in front of it, and devices that use it."""

    def __init__(self, tmp: Path, built: dict[str, Path]) -> None:
        self.tmp = tmp
        self.built = built
        self.repo = tmp / "repo"
        self.storage = LocalStorage(self.repo)
        write_signed(self.storage, init_repository(tmp / "keys"))
        self.keys = KeyConfig.load(tmp / "keys")
        self.handler: type[RepoHandler] = RepoHandler
        self.server: Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def publish(self, version: str, *, channel: str = "stable", now: datetime | None = None):
        return publish_release(self.built[version], self.storage, self.keys, channel=channel, now=now)

    def object(self, target_path: str) -> Path:
        """The stored (hash-prefixed) file of a target in the repository directory."""
        d, name = target_path.rsplit("/", 1)
        matches = sorted((self.repo / "targets" / d).glob(f"*.{name}"))
        assert len(matches) == 1, matches
        return matches[0]

    def device(self, name: str = "dev", *, hardware_id: str = HARDWARE, slot_size: int = 8 << 20,
               booted_version: str = "1.0.0", retries: int = 1) -> tuple[SimDevice, Device]:
        sim = SimDevice.create(self.tmp / name, repository_url=self.url,
                               trusted_root=(self.repo / "metadata" / "1.root.json").read_bytes(),
                               product=PRODUCT, hardware_id=hardware_id, slot_size=slot_size, retries=retries,
                               timeout=5.0)
        sim.provision(self.built[f"{booted_version}.img"], slot="a", version=booted_version, product=PRODUCT)
        dev = Device(sim.config)
        dev.mark_good()
        return sim, dev


@pytest.fixture
def world(tmp_path, built):
    w = World(tmp_path, built)
    server = Server(w.repo, handler=_Dispatch)
    _Dispatch.world = w
    w.server = server
    with server:
        yield w


class _Dispatch(RepoHandler):
    """Routes each request to the world's current handler class, so a test can swap in a
    misbehaving server mid-test (``world.handler = Evil``)."""

    world: World

    @property
    def honour_range(self) -> bool:  # type: ignore[override]
        return self.world.handler.honour_range

    def do_GET(self, head: bool = False) -> None:
        h = self.world.handler
        if h is RepoHandler:
            return super().do_GET(head)
        return h.do_GET(self, head)  # type: ignore[arg-type]

    def body(self, path: Path):
        return self.world.handler.body(self, path)  # type: ignore[arg-type]

    def send_bytes(self, data, start: int, end: int) -> None:
        return self.world.handler.send_bytes(self, data, start, end)  # type: ignore[arg-type]
