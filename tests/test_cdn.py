"""A cache in front (issue 24): Debian's nginx, configured with ci/nginx-cdn.conf as docs/producer.md
recommends, between devices and the origin (``abflip serve``'s handler, or SeaweedFS's S3 gateway).

Devices update through it; a download whose connection drops resumes through it (a Range request
answered from cached slices); targets, immutable, come from the cache (also with the origin down);
``timestamp.json`` is never served past its max-age, not even when the origin is down; idle checks
reach the origin about once per max-age, not once per device.

The abflip origin here says ``max-age=2`` (the default is 300 s) so the tests can watch it expire.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from abflip.demo import HARDWARE, PRODUCT
from abflip.httpserver import RepoHandler, Server
from abflip.sim import SimDevice
from applier.agent import Device
from builder.publish import MAX_AGE, fresh_for, publish_release
from builder.release import create_release
from cdn import NGINX, Cutter, Nginx
from conftest import World
from s3server import S3World, dummy_credentials, seaweedfs  # noqa: F401  (fixtures)

SHORT = 2  # the test origin's max-age for timestamp.json and 404s
SLICE = 4 << 20  # ci/nginx-cdn.conf's slice size


@pytest.fixture(autouse=True)
def _nginx_installed():
    if NGINX is None:
        pytest.fail("nginx is missing: apt-get install nginx (.ci/run installs it)")


@pytest.fixture(scope="module")
def sliced(tmp_path_factory, built) -> Path:
    """Release 2.0.0 with a 10 MiB incompressible image: three 4 MiB slices, chunks of 2 MiB."""
    base = tmp_path_factory.mktemp("sliced")
    img = base / "img"
    img.write_bytes(os.urandom(10 << 20))
    create_release(img, base / "release", product=PRODUCT, version="2.0.0", compatible=[HARDWARE],
                   kernel=built["1.0.0"] / "vmlinuz", level=1, chunk_size=2 << 20, window=0, piece_size=512 << 10,
                   created=1700000000)
    return base / "release"


class Cdn:
    """A repository, its origin server (counting requests), nginx in front, devices behind it."""

    def __init__(self, tmp: Path, built: dict[str, Path]) -> None:
        self.world = World(tmp, built)
        self.requests: list[tuple[str, str | None]] = []  # (path, Range) as the origin saw them
        seen = self.requests

        class Origin(RepoHandler):
            max_age = SHORT

            def do_GET(self, head: bool = False) -> None:
                seen.append((self.path, self.headers.get("Range")))
                super().do_GET(head)

        self.origin = Server(self.world.repo, handler=Origin).__enter__()
        self.nginx = Nginx(tmp / "nginx", self.origin.url)

    def publish(self, version: str | Path, channel: str = "stable"):
        src = self.world.built[version] if isinstance(version, str) else version
        return publish_release(src, self.world.storage, self.world.keys, channel=channel)

    def device(self, name: str, url: str | None = None, *, retries: int = 1) -> tuple[SimDevice, Device]:
        sim = SimDevice.create(self.world.tmp / name, repository_url=url or self.nginx.url,
                               trusted_root=(self.world.repo / "metadata" / "1.root.json").read_bytes(),
                               product=PRODUCT, hardware_id=HARDWARE, slot_size=16 << 20, retries=retries, timeout=10.0)
        sim.provision(self.world.built["1.0.0.img"], slot="a", version="1.0.0", product=PRODUCT)
        dev = Device(sim.config)
        dev.mark_good()
        return sim, dev

    def origin_asked(self, part: str) -> list[tuple[str, str | None]]:
        return [r for r in self.requests if part in r[0]]

    def close(self) -> None:
        self.nginx.stop()
        self.origin.__exit__()


@pytest.fixture
def cdn(tmp_path, built):
    c = Cdn(tmp_path, built)
    yield c
    c.close()


def get(url: str, **headers: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_devices_update_through_the_cache_and_targets_come_from_it(cdn, sliced):
    """The first device fills the cache (the image fetched from the origin in 4 MiB slices, each
    once); the second installs without the origin seeing a single request for a target."""
    cdn.publish("1.0.0")
    cdn.publish(sliced)
    sim1, first = cdn.device("first")
    assert first.install().version == "2.0.0"
    image = [r for r in cdn.origin_asked(".rootfs.img.zst")]
    size = next(cdn.world.repo.glob("targets/demo-os/releases/2.0.0/*.rootfs.img.zst")).stat().st_size
    assert sorted(rng for _, rng in image) == sorted(f"bytes={a}-{a + SLICE - 1}" for a in range(0, size, SLICE))
    before = len(cdn.requests)
    sim2, second = cdn.device("second")
    assert second.install().version == "2.0.0"
    assert sim1.boot().slot == sim2.boot().slot == "b"
    after = cdn.requests[before:]
    assert not [p for p, _ in after if p.startswith("/targets/")], after  # all of them from the cache
    assert not [p for p, _ in after if p.startswith("/metadata/") and "timestamp" not in p and "root" not in p], after
    hits = [e for e in cdn.nginx.entries() if e.uri.startswith("/targets/") and e.time > 0]
    assert hits and {e.cache for e in hits[-5:]} == {"HIT"}


def test_a_resume_after_a_dropped_connection_works_through_the_cache(cdn, sliced):
    """The device's connection is cut 5 MiB into the image: it resumes with a Range request from
    the piece it was in, and the cache answers it from its slices."""
    cdn.publish("1.0.0")
    cdn.publish(sliced)
    cutter = Cutter(cdn.nginx.port, cut_path=".rootfs.img.zst", after=5 << 20)
    try:
        sim, dev = cdn.device("dev", cutter.url, retries=3)
        result = dev.install()
    finally:
        cutter.close()
    assert cutter.cuts == 1
    assert result.version == "2.0.0" and sim.boot().slot == "b"
    ranges = [e.range for e in cdn.nginx.entries() if e.uri.endswith(".rootfs.img.zst") and e.range not in ("", "-")]
    starts = [int(r.split("=")[1].split("-")[0]) for r in ranges if r.startswith("bytes=")]
    assert starts[0] == 0 and any(0 < s <= 5 << 20 for s in starts[1:]), ranges  # resumed where it was cut
    size = next(cdn.world.repo.glob("targets/demo-os/releases/2.0.0/*.rootfs.img.zst")).stat().st_size
    slices = {r for p, r in cdn.origin_asked(".rootfs.img.zst")}
    assert slices <= {f"bytes={a}-{a + SLICE - 1}" for a in range(0, size, SLICE)}  # only whole slices, no others


def test_a_stale_timestamp_is_never_served_past_its_max_age(cdn):
    """The origin says max-age=2. A new timestamp reaches clients of the cache at most 2 s (+1 s:
    nginx counts whole seconds) after it was written; with the origin down, the expired
    timestamp is not served at all (502), while immutable objects still are."""
    cdn.publish("1.0.0")
    url = f"{cdn.nginx.url}/metadata/timestamp.json"
    status, headers, body = get(url)
    assert status == 200 and headers["Cache-Control"] == f"public, max-age={SHORT}, must-revalidate"
    old = json.loads(body)["signed"]["version"]
    assert get(url)[1]["X-Cache-Status"] == "HIT"
    cdn.publish("2.0.0")
    written = time.monotonic()
    while True:
        asked = time.monotonic()
        status, headers, body = get(url)
        version = json.loads(body)["signed"]["version"]
        if version != old:
            break
        assert asked - written <= SHORT + 1, "a stale timestamp.json was served past its max-age"
        time.sleep(0.05)
    assert asked - written <= SHORT + 1
    cached = [e for e in cdn.nginx.entries() if e.uri == "/metadata/timestamp.json"]
    assert any(e.cache == "HIT" for e in cached) and any(e.cache in ("EXPIRED", "REVALIDATED") for e in cached)
    # the origin goes away: immutable objects stay available, the timestamp does not outlive its max-age
    root = get(f"{cdn.nginx.url}/metadata/1.root.json")
    cdn.origin.__exit__()
    time.sleep(SHORT + 1.5)
    assert get(f"{cdn.nginx.url}/metadata/1.root.json")[0:3:2] == (200, root[2])
    assert get(url)[0] in (502, 504)


def test_idle_checks_reach_the_origin_about_once_per_max_age(cdn):
    """Twelve devices checking in turn for ~6 s (about 3 max-ages): the origin sees a handful of
    requests for timestamp.json and for the N+1.root.json probe, not one per check."""
    cdn.publish("1.0.0")
    devices = [cdn.device(f"d{i}")[1] for i in range(12)]
    for d in devices:
        d.check()
    before = len(cdn.requests)
    checks = 0
    start = time.monotonic()
    while time.monotonic() - start < 3 * SHORT:
        for d in devices:
            assert d.check()["version"] == "1.0.0"
            checks += 1
    seen = cdn.requests[before:]
    stamps = [p for p, _ in seen if p.endswith("timestamp.json")]
    probes = [p for p, _ in seen if p.endswith(".root.json")]
    assert checks >= 24
    assert len(stamps) <= 3 * 2 + 1 and len(probes) <= 3 * 2 + 1, (checks, stamps, probes)
    assert len(seen) == len(stamps) + len(probes), seen  # nothing else: the rest is versioned, cached


def test_seaweedfs_origin_behind_the_cache(seaweedfs, tmp_path, built):  # noqa: F811
    """The recommended config in front of a real S3 gateway with abflip's published headers: the
    second device's update (its root probe too: S3's 404 carries no Cache-Control, the config caches
    it 5 minutes) never reaches the origin."""
    w = S3World(tmp_path, built, seaweedfs)
    w.publish("1.0.0")
    w.publish("2.0.0")
    with Nginx(tmp_path / "nginx", w.url) as nginx:
        def device(name: str) -> tuple[SimDevice, Device]:
            sim = SimDevice.create(tmp_path / name, repository_url=nginx.url, trusted_root=w.root_json, product=PRODUCT,
                                   hardware_id=HARDWARE, slot_size=8 << 20, retries=1, timeout=10.0)
            sim.provision(built["1.0.0.img"], slot="a", version="1.0.0", product=PRODUCT)
            dev = Device(sim.config)
            dev.mark_good()
            return sim, dev

        assert device("first")[1].install().version == "2.0.0"
        status, headers, _ = get(f"{nginx.url}/metadata/timestamp.json")
        assert headers["Cache-Control"] == fresh_for() == f"public, max-age={MAX_AGE}, must-revalidate"
        assert headers["X-Cache-Status"] == "HIT"
        done = len(nginx.entries())
        sim, second = device("second")
        assert second.install().version == "2.0.0" and sim.boot().slot == "b"
        later = nginx.entries()[done:]
        assert later and not [e for e in later if e.origin], [e for e in later if e.origin]
        probe = [e for e in later if e.uri.endswith("2.root.json")]
        assert probe and probe[0].status in (403, 404) and probe[0].cache == "HIT"
