"""TUF's threat classes, each as an attack story over real HTTP on 127.0.0.1: the attacker
controls the repository's storage (writes any object) or the server (misbehaving
handlers), and sometimes some keys. Every attack ends in a clear error rooted in the
repository or the transport, naming the role, and the device keeps booting what it booted.
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime, timedelta, timezone

import pytest
from securesystemslib.signer import CryptoSigner
from helpers import assert_untouched
from tuf.api.metadata import Metadata, MetaFile

import metadata.repository as repository
from abflip.httpserver import RepoHandler
from applier.agent import Device
from applier.fetch import HttpFetcher
from builder.publish import write_signed
from metadata.errors import PolicyError, RepositoryError, TransportError, UserError
from metadata.keys import KeyConfig, generate_file_key, load_signer
from metadata.repository import Repository
from metadata.staging import (
    clear_staged,
    commit_staged,
    stage_delegation,
    stage_rotation,
)


# -- helpers: the repository as its owner (or an attacker with storage access) sees it -----
def load(world) -> Repository:
    return Repository.load(lambda n: world.storage.get(f"metadata/{n}"))


def commit(world) -> list[str]:
    files = commit_staged(load(world), world.keys)
    write_signed(world.storage, files)
    clear_staged(world.keys.dir)
    return [f.name for f in files]


def signer(world, role: str, index: int = 0) -> CryptoSigner:
    repo = load(world)
    keys, _ = repo.role_keys(role)
    k = world.keys.roles[role][index]
    return load_signer(k.uri, keys[k.keyid], world.keys.dir)


def plant(world, name: str, md: Metadata) -> None:
    """The attacker writes a metadata file straight into the bucket."""
    (world.repo / "metadata" / name).write_bytes(md.to_bytes())


def resign(md: Metadata, *signers) -> Metadata:
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    return md


def timestamp_for(repo: Repository, snapshot_version: int, *signers, version: int | None = None) -> Metadata:
    ts = repo.timestamp
    ts.signed.version = version or ts.signed.version + 1
    ts.signed.snapshot_meta = MetaFile(snapshot_version)
    ts.signed.expires = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=1)
    return resign(ts, *signers)


def refused(dev, sim, match: str, exc=RepositoryError):
    with pytest.raises(exc, match=match) as e:
        dev.install()
    assert_untouched(sim, dev)
    return e.value


# -- arbitrary installation ------------------------------------------------------------------
def test_targets_with_a_bad_signature_is_refused(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0")
    repo = load(world)
    md = repo.targets
    path = "demo-os/channels/stable.json"
    md.signed.targets[path].hashes["sha256"] = "0" * 64  # tampered after signing
    plant(world, f"{md.signed.version}.targets.json", md)
    refused(dev, sim, "targets")


def test_targets_signed_by_a_wrong_key_is_refused(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0")
    md = load(world).targets
    plant(world, f"{md.signed.version}.targets.json", resign(md, CryptoSigner.generate_ed25519()))
    e = refused(dev, sim, "targets")
    assert "signed by 0/1 keys" in e.message


@pytest.fixture
def two_of_three(world):
    """targets: threshold 2 of 3 keys (a rotation done the offline way: staged, then committed)."""
    world.publish("1.0.0")
    new = [generate_file_key(world.keys.dir, "targets") for _ in range(2)]
    stage_rotation(load(world), world.keys, "targets", add=new, threshold=2)
    commit(world)
    assert load(world).root.signed.roles["targets"].threshold == 2
    return world


def test_key_compromise_below_threshold_is_refused(two_of_three):
    world = two_of_three
    sim, dev = world.device()
    # the attacker stole one targets key (plus the online keys) and lists a malicious channel
    repo = load(world)
    ts_signer, snap_signer, t_signer = signer(world, "timestamp"), signer(world, "snapshot"), signer(world, "targets", 1)
    md = repo.targets
    md.signed.version += 1
    evil = repository.TargetFile.from_data("demo-os/channels/stable.json", b"{}", ["sha256"])
    md.signed.targets[evil.path] = evil
    plant(world, f"{md.signed.version}.targets.json", resign(md, t_signer))
    snap = repo.snapshot
    snap.signed.version += 1
    snap.signed.meta["targets.json"] = MetaFile(md.signed.version)
    plant(world, f"{snap.signed.version}.snapshot.json", resign(snap, snap_signer))
    plant(world, "timestamp.json", timestamp_for(repo, snap.signed.version, ts_signer))
    refused(dev, sim, r"targets was signed by 1/2 keys: below the role's signature threshold")


def test_root_compromise_below_threshold_is_refused(world):
    world.publish("1.0.0")
    new = [generate_file_key(world.keys.dir, "root") for _ in range(2)]
    stage_rotation(load(world), world.keys, "root", add=new, threshold=2)
    commit(world)
    sim, dev = world.device()
    # one stolen root key signs a root that hands every role to the attacker
    evil = CryptoSigner.generate_ed25519()
    md = load(world).next_root()
    for role in ("root", "targets", "snapshot", "timestamp"):
        for kid in list(md.signed.roles[role].keyids):
            md.signed.revoke_key(kid, role)
        md.signed.add_key(evil.public_key, role)
        md.signed.roles[role].threshold = 1
    plant(world, f"{md.signed.version}.root.json", resign(md, signer(world, "root", 0), evil))
    refused(dev, sim, "root")


def test_producer_refuses_to_publish_below_threshold(two_of_three):
    world = two_of_three
    world.keys.roles["targets"] = world.keys.roles["targets"][:1]
    with pytest.raises(UserError, match="role targets needs 2 signature") as e:
        world.publish("2.0.0")
    assert "1 more from keyids" in e.value.message


# -- endless data, slow retrieval --------------------------------------------------------------
class _Endless(RepoHandler):
    """Answers one kind of file with its bytes followed by endless padding (no length)."""

    suffix = "timestamp.json"

    def do_GET(self, head=False):
        if not self.path.endswith(_Endless.suffix):
            return RepoHandler.do_GET(self, head)
        path = self.resolve()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(path.read_bytes())
            for _ in range(10_000):  # 640 MB, far beyond any bound
                self.wfile.write(b" " * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


@pytest.mark.parametrize("suffix,match", [("timestamp.json", "timestamp.json: Downloaded .* exceeding"),
                                          ("release.json", "release.json: Downloaded .* exceeding")])
def test_endless_data_is_cut_off(world, suffix, match):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0")
    _Endless.suffix = suffix
    world.handler = _Endless
    t = time.monotonic()
    refused(dev, sim, match)
    assert time.monotonic() - t < 10


class _Trickle(RepoHandler):
    """Sends timestamp.json one byte every 0.1 s: never idle long enough to time out."""

    def send_bytes(self, data, start, end):
        if not self.path.endswith("timestamp.json"):
            return RepoHandler.send_bytes(self, data, start, end)
        for i in range(start, end):
            self.wfile.write(bytes(memoryview(data)[i:i + 1]))
            self.wfile.flush()
            time.sleep(0.1)


def test_slow_retrieval_gives_up_at_the_deadline(world):
    world.publish("1.0.0")
    sim, _ = world.device()
    world.publish("2.0.0")
    dev = Device(sim.config, fetcher=HttpFetcher(timeout=2.0, deadline=1.5))
    world.handler = _Trickle
    t = time.monotonic()
    e = refused(dev, sim, "slow|deadline", TransportError)
    assert time.monotonic() - t < 6
    assert "refreshing TUF metadata" in e.message


# -- freeze, rollback, mix-and-match ----------------------------------------------------------
def test_freeze_replayed_expired_timestamp_names_role_and_date(world):
    world.publish("1.0.0", now=datetime.now(timezone.utc) - timedelta(days=3))
    stale = (world.repo / "metadata" / "timestamp.json").read_bytes()
    expired_at = Metadata.from_bytes(stale).signed.expires
    sim, dev = world.device()
    world.publish("2.0.0")
    (world.repo / "metadata" / "timestamp.json").write_bytes(stale)  # the mirror is frozen
    e = refused(dev, sim, "role timestamp expired at")
    assert f"{expired_at:%Y-%m-%d %H:%M:%S}" in e.message


def test_rollback_of_timestamp_is_refused(world):
    world.publish("1.0.0")
    old = (world.repo / "metadata" / "timestamp.json").read_bytes()
    world.publish("2.0.0")
    sim, dev = world.device()
    with pytest.raises(PolicyError):  # not for this device: 2.0.0 is needed, but it refreshes to see
        dev.install(allow_downgrade=False) if False else _refresh_only(dev)
    (world.repo / "metadata" / "timestamp.json").write_bytes(old)
    refused(dev, sim, "timestamp.*version|version.*timestamp")


def _refresh_only(dev):
    dev.offer(dev.session())._client().refresh()
    raise PolicyError("refreshed")


def test_rollback_of_snapshot_by_a_compromised_online_key_is_refused(world):
    world.publish("1.0.0")
    world.publish("2.0.0")
    sim, dev = world.device()
    with pytest.raises(PolicyError):
        _refresh_only(dev)
    # with the stolen timestamp key: a newer timestamp naming an older snapshot
    plant(world, "timestamp.json", timestamp_for(load(world), 1, signer(world, "timestamp")))
    refused(dev, sim, "snapshot")


def test_rollback_of_targets_by_compromised_online_keys_is_refused(world):
    world.publish("1.0.0")
    world.publish("2.0.0")
    sim, dev = world.device()
    with pytest.raises(PolicyError):
        _refresh_only(dev)
    repo = load(world)
    ts_signer, snap_signer = signer(world, "timestamp"), signer(world, "snapshot")
    snap = repo.snapshot
    snap.signed.version += 1
    snap.signed.meta["targets.json"] = MetaFile(1)  # points back at the first targets
    plant(world, f"{snap.signed.version}.snapshot.json", resign(snap, snap_signer))
    plant(world, "timestamp.json", timestamp_for(repo, snap.signed.version, ts_signer))
    refused(dev, sim, "targets")


def test_rollback_of_root_is_refused(world):
    world.publish("1.0.0")
    stage_rotation(load(world), world.keys, "timestamp", add=[generate_file_key(world.keys.dir, "timestamp")])
    commit(world)
    sim, dev = world.device()
    world.publish("2.0.0")
    # the next root the device probes for is the old one again
    (world.repo / "metadata" / "3.root.json").write_bytes((world.repo / "metadata" / "1.root.json").read_bytes())
    refused(dev, sim, "root")


@pytest.mark.parametrize("role", ["snapshot", "targets"])
def test_mix_and_match_is_refused(world, role):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0")
    repo = load(world)
    current = repo.role(role).signed.version
    # serve the previous version's (validly signed) file under the current name
    older = (world.repo / "metadata" / f"{current - 1}.{role}.json").read_bytes()
    (world.repo / "metadata" / f"{current}.{role}.json").write_bytes(older)
    refused(dev, sim, role)


# -- rotation: a device with an old root follows every rotation, then ignores revoked keys -----
def test_device_follows_rotations_and_rejects_revoked_keys(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    sim2, dev2 = world.device("dev2")
    with pytest.raises(PolicyError):
        _refresh_only(dev)  # the device holds root v1 and timestamp signed by the first key
    old_root = world.keys.roles["root"][0].keyid
    old_ts_signer = signer(world, "timestamp")
    old_root_signer = signer(world, "root")
    # 1. root key rotated: new key in, old key revoked (the old key signs the handover)
    stage_rotation(load(world), world.keys, "root", add=[generate_file_key(world.keys.dir, "root")], revoke=[old_root])
    assert commit(world)[0] == "2.root.json"
    # 2. root threshold 1 -> 2 of 3
    stage_rotation(load(world), world.keys, "root", add=[generate_file_key(world.keys.dir, "root") for _ in range(2)],
                   threshold=2)
    commit(world)
    # 3. online keys rotated, the old timestamp key revoked
    ts_old = world.keys.roles["timestamp"][0].keyid
    stage_rotation(load(world), world.keys, "timestamp", add=[generate_file_key(world.keys.dir, "timestamp")],
                   revoke=[ts_old])
    commit(world)
    stage_rotation(load(world), world.keys, "snapshot", add=[generate_file_key(world.keys.dir, "snapshot")],
                   revoke=[world.keys.roles["snapshot"][0].keyid])
    commit(world)
    # 4. targets key rotated (targets re-signed with the new key on commit)
    stage_rotation(load(world), world.keys, "targets", add=[generate_file_key(world.keys.dir, "targets")],
                   revoke=[world.keys.roles["targets"][0].keyid])
    names = commit(world)
    assert names[0] == "6.root.json" and any(n.endswith(".targets.json") for n in names)
    root = load(world).root.signed
    assert root.version == 6 and root.roles["root"].threshold == 2 and old_root not in root.roles["root"].keyids

    world.publish("2.0.0")
    assert dev.install().version == "2.0.0"  # root v1 -> v6 over HTTP
    assert (sim.state_dir / "tuf" / "root.json").exists()

    # the revoked timestamp key signs a newer timestamp: ignored (not trusted any more)
    repo = load(world)
    plant(world, "timestamp.json", timestamp_for(repo, repo.snapshot.signed.version, old_ts_signer, version=10_000))
    refused(dev2, sim2, "timestamp")
    # the revoked root key alone cannot sign a root v7
    md = repo.next_root()
    plant(world, "7.root.json", resign(md, old_root_signer))
    refused(dev2, sim2, "root")


class _Serve(RepoHandler):
    """A man in the middle: answers some metadata names with the bytes it chose."""

    files: dict[str, bytes] = {}

    def body(self, path):
        return _Serve.files.get(path.name) or RepoHandler.body(self, path)


def test_fast_forward_recovery_after_timestamp_key_rotation(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    # with the stolen timestamp key, a man in the middle fast-forwards the device's timestamp to 99999
    repo = load(world)
    _Serve.files = {"timestamp.json": timestamp_for(repo, repo.snapshot.signed.version, signer(world, "timestamp"),
                                                    version=99_999).to_bytes()}
    world.handler = _Serve
    with pytest.raises(PolicyError):
        _refresh_only(dev)
    world.handler = RepoHandler
    world.publish("2.0.0")
    refused(dev, sim, "timestamp")  # the honest timestamp now looks like a rollback: the device is stuck
    # recovery: rotate the timestamp key; the device drops the timestamp the old key signed
    stage_rotation(load(world), world.keys, "timestamp", add=[generate_file_key(world.keys.dir, "timestamp")],
                   revoke=[world.keys.roles["timestamp"][0].keyid])
    commit(world)
    assert load(world).timestamp.signed.version < 99_999
    assert dev.install().version == "2.0.0"


# -- delegation: one product's key cannot release another product ---------------------------
def test_release_signed_by_another_products_key_is_refused(world, monkeypatch):
    world.publish("1.0.0")
    x_key = generate_file_key(world.keys.dir, "ci-demo-os")
    y_key = generate_file_key(world.keys.dir, "ci-other")
    stage_delegation(load(world), world.keys, "demo-os", [x_key])
    commit(world)
    stage_delegation(load(world), world.keys, "other-os", [y_key])
    commit(world)
    sim, dev = world.device()
    assert "demo-os/channels/stable.json" in load(world).delegated["demo-os"].signed.targets

    # product Y's CI (its key + the online keys) cannot sign product X's release
    ci_y = KeyConfig(world.keys.path, {r: world.keys.roles[r] for r in ("other-os", "snapshot", "timestamp")},
                     world.keys.expiry_days)
    with pytest.raises(UserError, match="role demo-os needs 1 signature"):
        from builder.publish import publish_release
        publish_release(world.built["2.0.0"], world.storage, ci_y, channel="stable")

    # ... and if it writes the objects into X's paths and signs X's role with its own key anyway,
    # the device refuses X's metadata
    y_signer = load_signer(y_key[1], y_key[0], world.keys.dir)
    real_sign = repository._sign

    def sign_as_y(md, signers, threshold, role, *args, **kw):
        if role == "demo-os":
            return real_sign(md, [y_signer], 1, role)
        return real_sign(md, signers, threshold, role, *args, **kw)

    monkeypatch.setattr(repository, "_sign", sign_as_y)
    with contextlib.suppress(RepositoryError):  # the producer's own re-read notices too
        world.publish("2.0.0")
    monkeypatch.undo()
    refused(dev, sim, "demo-os")


def test_rollback_of_a_delegated_role_is_refused(world):
    world.publish("1.0.0")
    stage_delegation(load(world), world.keys, "demo-os", [generate_file_key(world.keys.dir, "ci-demo-os")])
    commit(world)
    world.publish("2.0.0")  # demo-os v2 lists 2.0.0
    sim, dev = world.device()
    with pytest.raises(PolicyError):
        _refresh_only(dev)
    # compromised online keys point snapshot back at demo-os v1 (which only knows 1.0.0)
    repo = load(world)
    assert repo.delegated["demo-os"].signed.version == 2
    ts_signer, snap_signer = signer(world, "timestamp"), signer(world, "snapshot")
    snap = repo.snapshot
    snap.signed.version += 1
    snap.signed.meta["demo-os.json"] = MetaFile(1)
    plant(world, f"{snap.signed.version}.snapshot.json", resign(snap, snap_signer))
    plant(world, "timestamp.json", timestamp_for(repo, snap.signed.version, ts_signer))
    refused(dev, sim, "demo-os")
