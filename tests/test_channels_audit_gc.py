"""Channel promotion, repository audit (repo verify) and garbage collection (repo gc),
on a local repository and on S3 (moto_server and SeaweedFS over HTTP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from abflip.audit import audit
from builder.channels import promote
from builder.gc import collect_garbage
from builder.publish import target_key
from metadata.errors import UserError
from metadata.manifest import Release
from metadata.repository import Repository

from s3server import DUMMY_ENV, MotoServer, S3World, backend, dummy_credentials, moto, seaweedfs  # noqa: F401  (fixtures)

ABFLIP = [sys.executable, "-m", "abflip.cli"]


def _location(backend) -> str:
    return backend.s3_url if hasattr(backend, "s3_url") else str(backend.repo)


def _endpoint(backend) -> str | None:
    return backend.server.endpoint if isinstance(backend, S3World) else None


def _objects(backend) -> list[str]:
    return backend.storage.list("targets/")


# -- channels ------------------------------------------------------------------------------
def test_promote_moves_a_channel_without_uploading_the_release(backend):
    backend.publish("1.0.0")
    backend.publish("2.0.0", channel="beta")
    sim_b, beta = backend.device("beta-dev", channel="beta") if hasattr(backend, "s3_url") else _device(backend, "beta")
    sim_s, stable = backend.device("stable-dev") if hasattr(backend, "s3_url") else _device(backend, "stable")
    assert beta.install().version == "2.0.0"  # the beta device follows beta
    with pytest.raises(Exception, match="not newer"):
        stable.install()  # stable still points at 1.0.0
    before = set(_objects(backend))
    r = promote(backend.storage, backend.keys, product="demo-os", version="2.0.0", channel="stable")
    assert r.changed and r.previous == "1.0.0"
    new = set(_objects(backend)) - before
    assert len(new) == 1 and next(iter(new)).startswith("targets/demo-os/channels/")  # only the pointer
    assert stable.install().version == "2.0.0"
    again = promote(backend.storage, backend.keys, product="demo-os", version="2.0.0", channel="stable")
    assert not again.changed
    with pytest.raises(UserError, match="not published"):
        promote(backend.storage, backend.keys, product="demo-os", version="9.9.9", channel="stable")


def _device(world, channel: str):
    """A device on ``channel`` against the local world's HTTP server."""
    from s3server import make_device

    return make_device(world.tmp / f"{channel}-dev", world.url, (world.repo / "metadata" / "1.root.json").read_bytes(),
                       world.built, channel=channel)


def test_cli_channel_promote(world):
    world.publish("1.0.0")
    world.publish("3.0.0", channel="beta")
    r = subprocess.run([*ABFLIP, "channel", "promote", "demo-os", "3.0.0", "--to", "stable", "--repo", str(world.repo),
                        "--keys", str(world.keys.dir), "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["previous"] == "1.0.0"
    _, dev = world.device()
    assert dev.install().version == "3.0.0"
    r = subprocess.run([*ABFLIP, "channel", "promote", "demo-os", "3.0", "--to", "stable", "--repo", str(world.repo),
                        "--keys", str(world.keys.dir)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "semantic version" in r.stderr


# -- audit ---------------------------------------------------------------------------------
def test_audit_reads_every_channel(backend):
    backend.publish("1.0.0")
    backend.publish("2.0.0", channel="beta")
    report = audit(_location(backend), deep=True, endpoint_url=_endpoint(backend))
    assert report["ok"], report["problems"]
    rows = {c["channel"]: c for c in report["channels"]}
    assert rows["stable"]["version"] == "1.0.0" and rows["beta"]["version"] == "2.0.0"
    assert rows["beta"]["deep_verified"] and rows["beta"]["boot"] == ["initrd.img", "vmlinuz"]
    assert set(report["roles"]) >= {"root", "timestamp", "snapshot", "targets"}
    assert 0 < report["roles"]["timestamp"]["expires_in_days"] <= 1.01
    # the same repository read over HTTP, as devices read it
    http = audit(backend.url, deep=True)
    assert http["ok"] and [c["version"] for c in http["channels"]] == [c["version"] for c in report["channels"]]


def test_audit_finds_a_corrupt_chunk_only_when_deep(world):
    world.publish("1.0.0")
    img = world.object("demo-os/releases/1.0.0/rootfs.img.zst")
    data = bytearray(img.read_bytes())
    rel = Release.from_bytes((world.built["1.0.0"] / "release.json").read_bytes())
    last = rel.image.chunks[-1]
    data[last.offset + last.length // 2] ^= 0xFF
    img.write_bytes(bytes(data))
    assert audit(str(world.repo))["ok"]  # same length: the shallow audit cannot tell
    report = audit(str(world.repo), deep=True)
    assert not report["ok"]
    assert f"chunk {len(rel.image.chunks) - 1}" in report["problems"][0] and "failed verification" in report["problems"][0]
    r = subprocess.run([*ABFLIP, "repo", "verify", str(world.repo), "--deep", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3
    assert json.loads(r.stdout)["error"]["report"]["channels"][0]["ok"] is False


def test_audit_finds_a_missing_boot_file(world):
    world.publish("1.0.0")
    world.object("demo-os/releases/1.0.0/vmlinuz").unlink()
    report = audit(str(world.repo))
    assert not report["ok"] and "vmlinuz" in report["problems"][0]


def test_cli_repo_verify_over_http_and_s3(backend):
    backend.publish("1.0.0")
    r = subprocess.run([*ABFLIP, "repo", "verify", backend.url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "demo-os/stable: 1.0.0  every device  ok" in r.stdout and "timestamp" in r.stdout
    if hasattr(backend, "s3_url"):
        r = subprocess.run([*ABFLIP, "repo", "verify", backend.s3_url, "--endpoint-url", backend.server.endpoint, "--json"],
                           capture_output=True, text=True, timeout=120, env=dict(os.environ, **DUMMY_ENV))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["ok"] is True


# -- garbage collection --------------------------------------------------------------------
def test_gc_keeps_what_channels_reference_and_devices_still_install(backend):
    backend.publish("1.0.0", channel="lts")  # old, but a channel points at it: must stay
    backend.publish("2.0.0")
    backend.publish("3.0.0")
    objects_before = _objects(backend)
    plan = collect_garbage(backend.storage, None, keep=1, dry_run=True)
    assert plan.kept == {"demo-os": ["3.0.0", "1.0.0"]}
    assert plan.removed_versions == {"demo-os": ["2.0.0"]}
    assert _objects(backend) == objects_before  # a dry run changes nothing
    assert all("/releases/2.0.0/" in k or "/channels/" in k or k.startswith("metadata/") for k in plan.deleted_objects)
    done = collect_garbage(backend.storage, backend.keys, keep=1)
    assert done.removed_targets == plan.removed_targets and len(done.removed_targets) == 4
    left = _objects(backend)
    assert not any("/releases/2.0.0/" in k for k in left)
    assert any("/releases/1.0.0/" in k for k in left) and any("/releases/3.0.0/" in k for k in left)
    metadata = backend.storage.list("metadata/")
    assert "metadata/1.root.json" in metadata and "metadata/1.targets.json" not in metadata
    repo = Repository.load(lambda n: backend.storage.get(f"metadata/{n}"))
    for t in repo.target_files.values():  # nothing the metadata references is gone
        assert backend.storage.exists(target_key(t)), t.path
    assert audit(_location(backend), endpoint_url=_endpoint(backend))["ok"]
    _, dev = backend.device("after-gc") if hasattr(backend, "s3_url") else _device(backend, "stable")
    assert dev.install().version == "3.0.0"
    again = collect_garbage(backend.storage, backend.keys, keep=1)
    assert not again.removed_targets


def test_gc_removes_what_interrupted_uploads_left_once_a_day_old(backend):
    """A publish killed mid-upload leaves an incomplete multipart upload (S3: when the endpoint
    went away and boto3 could not abort it) or a .tmp- staging file (a directory). Invisible to
    devices; gc removes it once older than abandoned_after (a day), never a younger one (a
    publish may be running), and never anything outside the repository's prefix."""
    import time

    backend.publish("1.0.0")
    if isinstance(backend, S3World):
        client, bucket = backend.storage.client, backend.storage.bucket
        inside = client.create_multipart_upload(Bucket=bucket, Key="repo/targets/demo-os/releases/9/x.rootfs.img.zst")
        client.upload_part(Bucket=bucket, Key="repo/targets/demo-os/releases/9/x.rootfs.img.zst", PartNumber=1,
                           UploadId=inside["UploadId"], Body=b"p" * 1024)
        client.create_multipart_upload(Bucket=bucket, Key="elsewhere/big.bin")

        def left() -> set[str]:
            return {u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    else:
        stale = backend.repo / "targets" / ".tmp-killed"
        stale.write_bytes(b"half")
        os.utime(stale, (time.time() - 2 * 86400,) * 2)
        (backend.repo / "metadata" / ".tmp-running").write_bytes(b"young")

        def left() -> set[str]:
            return {str(p.relative_to(backend.repo)) for p in backend.repo.rglob(".tmp-*")}
    before = left()
    if not isinstance(getattr(backend, "server", None), MotoServer):  # moto dates every upload 2010-11-10
        young = collect_garbage(backend.storage, backend.keys, keep=1)
        expected = {"targets/.tmp-killed"} if not isinstance(backend, S3World) else set()
        assert set(young.abandoned) == expected and left() == before - expected
    if isinstance(backend, S3World):
        plan = collect_garbage(backend.storage, None, keep=1, dry_run=True, abandoned_after=0)
        assert [a.split(" ")[0] for a in plan.abandoned] == ["targets/demo-os/releases/9/x.rootfs.img.zst"]
        assert left() == before  # a dry run aborts nothing
        done = collect_garbage(backend.storage, backend.keys, keep=1, abandoned_after=0)
        assert done.abandoned == plan.abandoned
        assert left() == {"elsewhere/big.bin"}
    else:
        collect_garbage(backend.storage, backend.keys, keep=1)
        assert left() == {"metadata/.tmp-running"}
    assert audit(_location(backend), endpoint_url=_endpoint(backend))["ok"]


def test_cli_repo_gc_dry_run_and_run(world):
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        world.publish(v)
    r = subprocess.run([*ABFLIP, "repo", "gc", "--repo", str(world.repo), "--keep", "2", "--dry-run"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "would remove 1.0.0" in r.stdout and "releases/1.0.0" in r.stdout
    r = subprocess.run([*ABFLIP, "repo", "gc", "--repo", str(world.repo), "--keep", "2", "--keys", str(world.keys.dir),
                        "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["removed_versions"] == {"demo-os": ["1.0.0"]} and out["deleted_objects"]
    r = subprocess.run([*ABFLIP, "repo", "gc", "--repo", str(world.repo), "--keep", "0"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
