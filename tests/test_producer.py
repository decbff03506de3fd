"""Producer side: reproducible images, release assembly, publishing semantics, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from abflip.demo import make_rootfs
from builder.errors import BuildError, ToolMissing
from builder.image import build_image
from builder.publish import publish_release
from builder.storage.local import LocalStorage
from metadata.errors import RepositoryError
from metadata.repository import Repository, init_repository

ABFLIP = [sys.executable, "-m", "abflip.cli"]


def test_image_is_reproducible(tmp_path):
    a = make_rootfs(tmp_path / "a", "1.0.0", size=300_000)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for p in b.rglob("*"):
        os.utime(p, (1, 1))  # different mtimes of the copy
    i1 = build_image(a, tmp_path / "1.img", source_date_epoch=1234)
    i2 = build_image(b, tmp_path / "2.img", source_date_epoch=1234)
    assert i1.sha256 == i2.sha256
    assert (tmp_path / "1.img").read_bytes() == (tmp_path / "2.img").read_bytes()
    i3 = build_image(a, tmp_path / "3.img", source_date_epoch=99)
    assert i3.sha256 != i1.sha256


def test_image_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(BuildError, match="does not exist"):
        build_image(tmp_path / "missing", tmp_path / "x.img")
    tree = make_rootfs(tmp_path / "t", "1.0.0", size=200_000)
    with pytest.raises(BuildError, match="larger than the slot size"):
        build_image(tree, tmp_path / "x.img", max_size=4096)
    assert not (tmp_path / "x.img").exists()
    monkeypatch.setenv("PATH", str(tmp_path))  # no mkfs.erofs anywhere on PATH
    monkeypatch.setattr("builder.image.os.access", lambda p, m: False)
    with pytest.raises(ToolMissing, match="mkfs.erofs is not installed") as err:
        build_image(tree, tmp_path / "x.img")
    assert "apt-get install erofs-utils" in err.value.hint


def test_keys_are_private(tmp_path):
    init_repository(tmp_path / "keys")
    for pem in (tmp_path / "keys").glob("*.pem"):
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600


def test_publish_is_idempotent_and_releases_are_immutable(world):
    first = world.publish("1.0.0")
    assert first.changed
    again = world.publish("1.0.0")
    assert not again.changed and again.timestamp_version == first.timestamp_version
    other = world.tmp / "tampered"
    shutil.copytree(world.built["1.0.0"], other)
    (other / "vmlinuz").write_bytes(b"another kernel")
    manifest = json.loads((other / "release.json").read_text())
    manifest["boot"]["kernel"]["sha256"] = __import__("hashlib").sha256(b"another kernel").hexdigest()
    manifest["boot"]["kernel"]["length"] = len(b"another kernel")
    (other / "release.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildError, match="already published with different content"):
        publish_release(other, world.storage, world.keys, channel="stable")


def test_publish_order_leaves_previous_state_visible_on_failure(world, monkeypatch):
    world.publish("1.0.0")
    before = (world.repo / "metadata" / "timestamp.json").read_bytes()
    calls = []
    real_put = LocalStorage.put

    def failing_put(self, key, data, **kw):
        calls.append(key)
        if key.endswith("snapshot.json"):
            raise OSError("disk full")
        return real_put(self, key, data, **kw)

    monkeypatch.setattr(LocalStorage, "put", failing_put)
    with pytest.raises(OSError):
        world.publish("2.0.0")
    assert (world.repo / "metadata" / "timestamp.json").read_bytes() == before
    assert calls.index("metadata/3.targets.json") < calls.index("metadata/3.snapshot.json")
    monkeypatch.undo()
    sim, dev = world.device()
    with pytest.raises(Exception, match="not newer"):  # the device still sees only 1.0.0
        dev.install()
    world.publish("2.0.0")  # a retry completes the publish
    assert dev.install().version == "2.0.0"


def test_concurrent_publishers_both_land(world):
    world.publish("1.0.0")
    errors = []

    def go(version, channel):
        try:
            publish_release(world.built[version], LocalStorage(world.repo), world.keys, channel=channel)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=a) for a in (("2.0.0", "stable"), ("3.0.0", "beta"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    repo = Repository.load(lambda n: LocalStorage(world.repo).get(f"metadata/{n}"))
    assert repo.is_current
    paths = set(repo.target_files)
    assert {"demo-os/channels/stable.json", "demo-os/channels/beta.json",
            "demo-os/releases/2.0.0/release.json", "demo-os/releases/3.0.0/release.json"} <= paths


def test_repository_load_rejects_unsigned_metadata(world):
    world.publish("1.0.0")
    ts = world.repo / "metadata" / "timestamp.json"
    d = json.loads(ts.read_text())
    d["signed"]["version"] += 5
    ts.write_text(json.dumps(d))
    with pytest.raises(RepositoryError, match="not signed by its threshold"):
        Repository.load(lambda n: world.storage.get(f"metadata/{n}"))


def test_cli_producer_flow_and_device_status(tmp_path, built):
    tree = make_rootfs(tmp_path / "tree", "4.0.0", size=200_000)
    run = lambda *a: subprocess.run([*ABFLIP, *map(str, a)], capture_output=True, text=True, timeout=120)  # noqa: E731
    r = run("image", "build", tree, "-o", tmp_path / "img", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["fstype"] == "erofs"
    r = run("release", "create", "--image", tmp_path / "img", "--product", "demo-os", "--version", "4.0.0",
            "--compatible", "demo-board", "--kernel", built["1.0.0"] / "vmlinuz", "-o", tmp_path / "rel")
    assert r.returncode == 0, r.stderr
    r = run("repo", "init", "--keys", tmp_path / "keys", "--to", tmp_path / "repo")
    assert r.returncode == 0, r.stderr
    r = run("publish", tmp_path / "rel", "--to", tmp_path / "repo", "--keys", tmp_path / "keys", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["changed"] is True
    r = run("release", "create", "--image", tmp_path / "img", "--product", "demo-os", "--version", "4.0",
            "--compatible", "x", "--kernel", built["1.0.0"] / "vmlinuz", "-o", tmp_path / "rel2")
    assert r.returncode == 2 and "not a semantic version" in r.stderr
    r = run("status", "--config", tmp_path / "nope.toml")
    assert r.returncode == 2 and "no configuration file" in r.stderr


def test_demo_command():
    r = subprocess.run([*ABFLIP, "demo"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo: OK" in r.stdout
    assert "abflip-2.0.0-b+2-1.conf -> slot b" in r.stdout


def test_ci_release_script(tmp_path, built):
    """ci/release.sh, as a pipeline would run it, publishes a release a device can see."""
    tree = make_rootfs(tmp_path / "tree", "5.0.0", size=100_000)
    init = subprocess.run([*ABFLIP, "repo", "init", "--keys", str(tmp_path / "keys"), "--to", str(tmp_path / "repo")],
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    script = Path(__file__).resolve().parents[1] / "ci" / "release.sh"
    env = dict(os.environ, ABFLIP_PRODUCT="demo-os", ABFLIP_COMPATIBLE="demo-board other", ABFLIP_REPO=str(tmp_path / "repo"),
               ABFLIP_KEYS=str(tmp_path / "keys"), ABFLIP_KERNEL=str(built["1.0.0"] / "vmlinuz"), SOURCE_DATE_EPOCH="7",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(script), str(tree), "5.0.0"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    repo = Repository.load(lambda n: LocalStorage(tmp_path / "repo").get(f"metadata/{n}"))
    assert "demo-os/releases/5.0.0/release.json" in repo.target_files


def test_the_cli_defaults_are_the_builders():
    """`release create`'s options repeat builder.compress's defaults (the CLI module does not import
    the compressor: the device's commands start without it)."""
    import inspect

    from abflip.commands import producer
    from builder import compress

    params = inspect.signature(producer.release_create).parameters
    for option, default in (("level", compress.DEFAULT_LEVEL), ("chunk_size", compress.DEFAULT_CHUNK),
                            ("window", compress.DEFAULT_WINDOW), ("piece_size", compress.DEFAULT_PIECE)):
        assert params[option].default.default == default, option
