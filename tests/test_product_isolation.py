"""Issue 21 part 1: a repository that no product can break. Product evil-os's CI (or anyone who can write
its files: a folder repository) damages evil-os's own metadata every way it can; demo-os must go on
publishing, the online signer must go on signing snapshot and timestamp, and demo-os devices must go on
updating over HTTP. Each story on a folder repository and on moto's S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from tuf.api.metadata import Metadata, TargetFile

from abflip.demo import PRODUCT
from builder.errors import AlreadyExists
from builder.gc import collect_garbage
from builder.publish import commit, load_tagged, publish_release, write_signed
from builder.signer import sign_online
from metadata.errors import RepositoryError, UserError
from metadata.keys import KeyConfig
from metadata.repository import MAX_CANDIDATES, Repository, init_repository, product_name_problem

from s3server import backend, dummy_credentials, moto, seaweedfs  # noqa: F401  (fixtures)
from test_online_signer import EVIL, _split  # demo-os and evil-os, each with its own CI key

ABFLIP = [sys.executable, "-m", "abflip.cli"]


def _load(storage) -> Repository:
    return load_tagged(storage)[0]


def _evil_publishes(w, evil_ci: KeyConfig, name: str, *, now: datetime | None = None) -> int:
    """evil-os's CI signs a new version of its role listing one more target; returns that version."""
    repo, tag = load_tagged(w.storage)
    repo.add_target(TargetFile.from_data(f"{EVIL}/channels/{name}.json", name.encode(), ["sha256"]))
    assert commit(w.storage, evil_ci, repo, tag, now=now, online=False)
    return repo.delegated[EVIL].signed.version


def _overwrite(w, name: str, data: bytes) -> None:
    """What a CI with plain PutObject (or anyone on a folder repository) can do to a metadata file."""
    w.storage.put(f"metadata/{name}", data, content_type="application/json", cache_control="x")


def _plant(w, name: str, data: bytes) -> None:
    w.storage.put(f"metadata/{name}", data, content_type="application/json", cache_control="x", create_only=True)


def _started(backend):
    """evil-os at v1 and demo-os 1.0.0 visible; a demo-os device on 1.0.0."""
    signer, demo_ci, evil_ci = _split(backend)
    publish_release(backend.built["1.0.0"], backend.storage, demo_ci, channel="stable")
    assert _evil_publishes(backend, evil_ci, "first") == 1
    s = sign_online(backend.storage, signer)
    assert s.included[EVIL] == 1 and s.included[PRODUCT] == 1 and not s.skipped
    sim, dev = backend.device()
    return signer, demo_ci, evil_ci, sim, dev


def _demo_goes_on(backend, signer, demo_ci, dev, version: str = "2.0.0") -> list[str]:
    """demo-os publishes, the signer includes it and renews the timestamp, the device installs it;
    returns the signer's refusals."""
    ts = _load(backend.storage).timestamp.signed.version
    r = publish_release(backend.built[version], backend.storage, demo_ci, channel="stable")
    assert r.changed and not r.visible
    s = sign_online(backend.storage, signer)
    assert PRODUCT in s.newly_included and "timestamp.json" in s.signed and s.timestamp_version > ts
    assert dev.check()["version"] == version
    assert dev.install().version == version
    forced = sign_online(backend.storage, signer, force=True)  # the scheduled renewal goes on too
    assert forced.signed == ("timestamp.json",) or "timestamp.json" in forced.signed
    return list(s.skipped)


DAMAGE = {
    "junk": lambda md: b"{not json",
    "empty": lambda md: b"",
    "older copy": lambda md: md["older"],
    "deeply nested": lambda md: b'{"signed": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    "oversized": lambda md: b" " * (5_000_001) + b"{}",
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_product_overwriting_its_current_role_costs_only_its_own_new_metadata(backend, damage):
    signer, demo_ci, evil_ci, sim, dev = _started(backend)
    older = _load(backend.storage).delegated[EVIL].to_bytes()
    assert _evil_publishes(backend, evil_ci, "second") == 2
    sign_online(backend.storage, signer)  # the snapshot names evil-os v2 now
    good = backend.storage.get(f"metadata/2.{EVIL}.json")
    _overwrite(backend, f"2.{EVIL}.json", DAMAGE[damage]({"older": older}))

    refused = "\n".join(_demo_goes_on(backend, signer, demo_ci, dev))
    assert f"2.{EVIL}.json" in refused, refused  # a refusal line naming evil-os
    repo = _load(backend.storage)
    assert repo.snapshot.signed.meta[f"{EVIL}.json"].version == 2  # its last good version stays named
    assert EVIL in repo.unavailable_products()
    # evil-os itself cannot build on a role it cannot read: a repository error naming it, nothing written
    before = sorted(backend.storage.names("metadata/"))
    with pytest.raises(RepositoryError, match=f"{EVIL}'s metadata cannot be loaded: 2.{EVIL}.json"):
        _evil_publishes(backend, evil_ci, "third")
    assert sorted(backend.storage.names("metadata/")) == before
    # gc leaves evil-os alone and goes on for demo-os; verify (as a device reads it) checks demo-os's channel
    gc = collect_garbage(backend.storage, None, keep=5, dry_run=True)
    assert any(s["path"] == f"{EVIL}/" for s in gc.skipped)
    if hasattr(backend, "repo"):  # the folder repository (the S3 one is read as devices do: over HTTP above)
        from abflip.audit import audit

        report = audit(str(backend.repo))
        assert [c["ok"] for c in report["channels"] if c["product"] == PRODUCT] == [True]
        assert any(p.startswith(f"role {EVIL} cannot be loaded") for p in report["problems"]), report["problems"]
    # once evil-os's file is put back (from a backup), evil-os publishes again
    _overwrite(backend, f"2.{EVIL}.json", good)
    assert _evil_publishes(backend, evil_ci, "third") == 3
    assert sign_online(backend.storage, signer).included[EVIL] == 3


def test_special_files_where_a_products_metadata_should_be_never_hang_or_crash_the_signer(world):
    """Folder repository: a directory and a FIFO at evil-os's candidate versions, a 3 GiB (sparse) one."""
    signer, demo_ci, evil_ci, sim, dev = _started(world)
    meta = world.repo / "metadata"
    (meta / f"2.{EVIL}.json").mkdir()
    os.mkfifo(meta / f"3.{EVIL}.json")
    with open(meta / f"4.{EVIL}.json", "wb") as f:
        f.truncate(3 << 30)
    refused = "\n".join(_demo_goes_on(world, signer, demo_ci, dev))
    assert f"4.{EVIL}.json is 3221225472 bytes, more than the limit 5000000" in refused
    assert f"3.{EVIL}.json is a FIFO, not a regular file" in refused
    assert f"2.{EVIL}.json is a directory, not a regular file" in refused
    # evil-os is still at v1 and can publish: above the special files
    assert _evil_publishes(world, evil_ci, "second") == 5
    assert sign_online(world.storage, signer).included[EVIL] == 5


def test_a_flood_of_junk_at_future_versions_freezes_nothing(backend):
    signer, demo_ci, evil_ci, sim, dev = _started(backend)
    for v in [*range(2, 2 + MAX_CANDIDATES + 4), 10**6]:  # more than the signer examines
        _plant(backend, f"{v}.{EVIL}.json", b"junk")
    snap = _load(backend.storage).snapshot.signed.version
    for v in [*range(snap + 1, snap + 30), 10**9]:  # junk at the next snapshot numbers too (a folder repository)
        _plant(backend, f"{v}.snapshot.json", b"junk")
    refused = "\n".join(_demo_goes_on(backend, signer, demo_ci, dev))
    assert f"{10**6}.{EVIL}.json" in refused and "were not examined" in refused
    assert _load(backend.storage).snapshot.signed.version == 10**9 + 1  # above every file there
    assert _evil_publishes(backend, evil_ci, "second") == 10**6 + 1  # evil-os goes above its junk
    assert sign_online(backend.storage, signer).included[EVIL] == 10**6 + 1


def test_an_overwritten_current_snapshot_does_not_stop_the_signer(backend):
    """A CI that can write N.snapshot.json (a folder repository; a bucket without the create-only
    policy) puts the previous snapshot (validly signed) there, then junk: the signer builds on the
    newest snapshot that verifies and signs above."""
    signer, demo_ci, evil_ci, sim, dev = _started(backend)
    for bad in ("previous", "junk"):
        repo = _load(backend.storage)
        current = repo.snapshot.signed.version
        previous = backend.storage.get(f"metadata/{current - 1}.snapshot.json")
        _overwrite(backend, f"{current}.snapshot.json", previous if bad == "previous" else b"junk")
        version = "2.0.0" if bad == "previous" else "3.0.0"
        refused = "\n".join(_demo_goes_on(backend, signer, demo_ci, dev, version))
        assert f"{current}.snapshot.json" in refused and "newest snapshot that verifies" in refused
        assert _load(backend.storage).snapshot.signed.meta[f"{EVIL}.json"].version == 1


def test_expired_new_metadata_is_never_included(backend):
    signer, demo_ci, evil_ci, sim, dev = _started(backend)
    long_ago = datetime.now(timezone.utc) - timedelta(days=365)
    assert _evil_publishes(backend, evil_ci, "stale", now=long_ago) == 2
    s = sign_online(backend.storage, signer)
    assert any(line.startswith(f"2.{EVIL}.json: it expired at") for line in s.skipped), s.skipped
    assert s.included[EVIL] == 1


def test_the_signer_never_writes_metadata_devices_would_refuse_for_its_size(world, monkeypatch):
    from metadata import repository

    signer, demo_ci, evil_ci, sim, dev = _started(world)
    publish_release(world.built["2.0.0"], world.storage, demo_ci, channel="stable")
    monkeypatch.setitem(repository.MAX_METADATA_BYTES, "snapshot", 1000)  # as if the fleet accepted 1000 bytes
    before = sorted(world.storage.names("metadata/"))
    with pytest.raises(UserError, match=r"role snapshot v\d+ would be \d+ bytes, more than devices accept \(1000\)"):
        sign_online(world.storage, signer)
    assert sorted(world.storage.names("metadata/")) == before


# -- names and storage permissions -------------------------------------------------------------
@pytest.mark.parametrize("new, existing, why", [
    ("edge.prod-a", "prod-a", "prod-a's CI's wildcards would reach its file metadata/1.edge.prod-a.json"),
    ("prod-a", "edge.prod-a", "its CI's wildcards would reach edge.prod-a's file metadata/1.edge.prod-a.json"),
    ("prod-a-bin-zz", "prod-a", "prod-a's CI's wildcards would reach its file metadata/1.prod-a-bin-zz.json"),
    ("prod-a", "prod-a-bin-zz", "would reach prod-a-bin-zz's file"),
    ("x.prod-a-bin-3", "prod-a", "prod-a's CI's wildcards would reach"),
])
def test_product_names_reachable_by_another_products_wildcards_are_refused(new, existing, why):
    assert why in product_name_problem(new, [existing])
    assert product_name_problem(existing, []) is None


def test_repo_delegate_refuses_a_colliding_name_in_both_orders_and_accepts_the_rest(world):
    keys = ["--keys", str(world.keys.dir), "--to", str(world.repo)]

    def delegate(name: str) -> subprocess.CompletedProcess:
        p = subprocess.run([*ABFLIP, "repo", "delegate", name, *keys, "--generate"], capture_output=True,
                           text=True, timeout=120)
        if p.returncode == 0:
            assert subprocess.run([*ABFLIP, "repo", "commit", *keys], capture_output=True, timeout=120).returncode == 0
        return p

    assert delegate("prod-a").returncode == 0
    for bad in ("edge.prod-a", "prod-a-bin-zz"):
        p = delegate(bad)
        assert p.returncode == 2 and f"error (user): product '{bad}'" in p.stderr and "Traceback" not in p.stderr
    assert delegate("prod-b").returncode == 0 and delegate("prod-a.tools").returncode == 0
    roles = _load(world.storage).targets.signed.delegations.roles
    assert sorted(roles) == ["prod-a", "prod-a.tools", "prod-b"]


def test_every_metadata_write_is_conditional_as_the_bucket_policy_requires(moto, tmp_path, built):
    """docs/keys.md denies any PutObject under metadata/ that carries neither If-None-Match nor If-Match:
    every write abflip's producer commands make there carries one (observed on the requests to moto)."""
    from builder.storage.s3 import S3Storage
    from s3server import S3World

    w = S3World(tmp_path, built, moto)
    signer, demo_ci, evil_ci = _split(w)  # (the test's own set-up writes as it likes)
    seen: list[tuple[str, dict]] = []
    w.storage.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: seen.append((request.url, dict(request.headers))))
    fresh = S3Storage.from_url(f"s3://{moto.new_bucket()}/repo", endpoint_url=moto.endpoint, region="us-east-1")
    fresh.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: seen.append((request.url, dict(request.headers))))
    write_signed(fresh, init_repository(tmp_path / "new-keys"), new=True)  # 'repo init': created only if absent
    publish_release(built["1.0.0"], w.storage, demo_ci, channel="stable")
    sign_online(w.storage, signer, force=True)
    publish_release(built["2.0.0"], w.storage, w.keys, channel="beta")  # all keys: the whole publish order
    metadata = [(u, h) for u, h in seen if "/metadata/" in u]
    assert len(metadata) > 10 and any(u.endswith("/timestamp.json") for u, _ in metadata)
    for url, headers in metadata:
        assert "If-None-Match" in headers or "If-Match" in headers, url
    with pytest.raises(AlreadyExists):  # and the store refuses to overwrite what exists
        _plant(w, "1.root.json", b"{}")


def test_repo_snapshot_cli_says_which_product_was_refused_and_goes_on(world):
    signer, demo_ci, evil_ci, sim, dev = _started(world)
    _overwrite(world, f"1.{EVIL}.json", b"junk")
    publish_release(world.built["2.0.0"], world.storage, demo_ci, channel="stable")
    sdir = world.tmp / "signer-keys"
    sdir.mkdir()
    for k in [*signer.roles["snapshot"], *signer.roles["timestamp"]]:
        (sdir / k.uri[len("file2:"):]).write_bytes((world.keys.dir / k.uri[len("file2:"):]).read_bytes())
    KeyConfig(sdir / "keys.json", signer.roles, signer.expiry_days).save()
    p = subprocess.run([*ABFLIP, "repo", "snapshot", "--repo", str(world.repo), "--keys", str(sdir), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["newly_included"][PRODUCT] == 2
    assert any(s.startswith(f"1.{EVIL}.json: 1.{EVIL}.json is not valid TUF metadata") for s in out["skipped"])
    assert out["kept"] == {EVIL: out["kept"][EVIL]} and f"1.{EVIL}.json" in out["kept"][EVIL]
    assert dev.check()["version"] == "2.0.0"
    p = subprocess.run([*ABFLIP, "repo", "refresh", "--repo", str(world.repo), "--keys", str(world.keys.dir), "--force"],
                       capture_output=True, text=True, timeout=120)  # the scheduled re-signing goes on too
    assert p.returncode == 0 and "re-signed" in p.stdout and "timestamp.json" in p.stdout, p.stderr


def test_the_producers_limits_are_the_devices():
    """The signer refuses what devices refuse: the limits are python-tuf ngclient's, which the device uses."""
    import inspect

    from tuf.ngclient import UpdaterConfig

    from applier import client
    from metadata.repository import MAX_METADATA_BYTES

    c = UpdaterConfig()
    assert MAX_METADATA_BYTES == {"root": c.root_max_length, "timestamp": c.timestamp_max_length,
                                  "snapshot": c.snapshot_max_length, "targets": c.targets_max_length}
    assert "updater_config or UpdaterConfig()" in inspect.getsource(client)  # the device keeps the defaults
