"""The producer's TUF repository on an in-memory store (no network, fast): thresholds,
staged multi-party signing, delegation per product, rotation, refresh before expiry.
A python-tuf ngclient reads the same store through a simulated fetcher (as in python-tuf's
tests/repository_simulator.py) wherever what a device concludes matters."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from metadata.errors import UserError
from metadata.keys import KeyConfig, RoleKeys, generate_file_key, signer_from
from metadata.repository import Repository, RoleSpec, init_repository
from metadata.staging import (
    clear_staged,
    commit_staged,
    sign_staged,
    stage_delegation,
    stage_rotation,
    staged_files,
)
from metadata.status import repository_status

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


class Store:
    """metadata/ and targets/ of a repository, in memory."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def read(self, name: str) -> bytes | None:
        return self.files.get(f"metadata/{name}")

    def write(self, files) -> list[str]:
        for f in files:
            key = f"metadata/{f.name}"
            assert not (f.create_only and key in self.files), f"{key} overwritten"
            self.files[key] = f.data
        return [f.name for f in files]

    def add_target(self, path: str, data: bytes) -> TargetFile:
        t = TargetFile.from_data(path, data, ["sha256"])
        d, name = path.rsplit("/", 1)
        self.files[f"targets/{d}/{t.hashes['sha256']}.{name}"] = data
        return t

    def repo(self) -> Repository:
        return Repository.load(self.read)


class SimFetcher(FetcherInterface):
    def __init__(self, store: Store) -> None:
        self.store = store

    def _fetch(self, url: str):
        key = url.split("://sim/", 1)[1]
        if key not in self.store.files:
            raise tuf_exc.DownloadHTTPError(f"{url} not found", 404)
        return iter([self.store.files[key]])


def device(store: Store, tmp: Path, root: bytes, name: str = "dev") -> Updater:
    d = tmp / name
    d.mkdir(exist_ok=True)
    return Updater(str(d), "http://sim/metadata/", str(d), "http://sim/targets/", SimFetcher(store), bootstrap=root)


@pytest.fixture
def repo_keys(tmp_path):
    store = Store()
    store.write(init_repository(tmp_path / "keys", roles={"root": RoleSpec(3, 2), "targets": RoleSpec(2, 2)}))
    return store, KeyConfig.load(tmp_path / "keys")


def test_init_with_thresholds_and_private_keys_0600(repo_keys, tmp_path):
    store, config = repo_keys
    repo = store.repo()
    assert repo.root.signed.roles["root"].threshold == 2 and len(repo.root.signed.roles["root"].keyids) == 3
    assert repo.root.signed.roles["targets"].threshold == 2
    assert len(config.roles["root"]) == 3 and len(config.roles["snapshot"]) == 1
    for pem in (tmp_path / "keys").glob("*.pem"):
        assert pem.stat().st_mode & 0o777 == 0o600
    assert repo.verification("root").verified and len(repo.verification("root").signed) == 3


def test_threshold_must_fit_the_keys(tmp_path):
    with pytest.raises(UserError, match="threshold 3 with 2 key"):
        init_repository(tmp_path / "k", roles={"root": RoleSpec(2, 3)})


def test_publishing_below_threshold_names_the_role(repo_keys):
    store, config = repo_keys
    config.roles["targets"] = config.roles["targets"][:1]  # this machine holds one of two targets keys
    repo = store.repo()
    repo.add_target(store.add_target("other/x", b"x"))
    with pytest.raises(UserError, match="role targets needs 2 signature"):
        repo.signed_files(config, now=NOW)


def test_delegation_routes_product_targets_and_ci_key_publishes_only_its_product(repo_keys, tmp_path):
    """A product role without hash bins (--bin-bits 0, the layout before issue 14; bins: tests/test_bins.py)."""
    store, config = repo_keys
    store.write(_publish(store, config, "prod/channels/stable.json", b"v1"))  # before the delegation
    key, uri = generate_file_key(tmp_path / "keys", "ci-prod")
    stage_delegation(store.repo(), config, "prod", [(key, uri)], bits=0)
    names = store.write(commit_staged(store.repo(), config))
    clear_staged(config.dir)
    assert names[0].endswith(".targets.json") and "1.prod.json" in names  # the old target moved into the role
    repo = store.repo()
    assert "prod/channels/stable.json" in repo.delegated["prod"].signed.targets
    assert "prod/channels/stable.json" not in repo.targets.signed.targets
    assert "prod/channels/stable.json" in repo.target_files and repo.is_current

    # CI: only its delegated key and the online keys
    ci = KeyConfig(config.path, {r: config.roles[r] for r in ("prod", "snapshot", "timestamp")}, config.expiry_days)
    names = store.write(_publish(store, ci, "prod/channels/stable.json", b"v2"))
    assert [n.split(".", 1)[1] for n in names] == ["prod.json", "snapshot.json", "json"]  # targets untouched
    with pytest.raises(UserError, match="role targets needs 2"):
        _publish(store, ci, "other/channels/stable.json", b"x")

    upd = device(store, tmp_path, store.read("1.root.json"))
    upd.refresh()
    info = upd.get_targetinfo("prod/channels/stable.json")
    assert info is not None and info.length == 2
    snap = store.repo().snapshot.signed.meta
    assert set(snap) == {"targets.json", "prod.json"}


def _publish(store, config, path, data):
    repo = store.repo()
    repo.add_target(store.add_target(path, data))
    return repo.signed_files(config, now=datetime.now(timezone.utc))


def test_staged_root_collects_signatures_from_key_holders(repo_keys, tmp_path):
    store, config = repo_keys
    holders = {k.keyid: k.uri for k in config.roles["root"]}
    # this machine holds one root key; the others sign on their own machines
    kid0 = config.roles["root"][0].keyid
    local = KeyConfig(config.path, {**config.roles, "root": config.roles["root"][:1]}, config.expiry_days)
    new_key, new_uri = generate_file_key(tmp_path / "keys", "root-new")
    [staged] = stage_rotation(store.repo(), local, "root", add=[(new_key, new_uri)], threshold=3)
    assert staged == local.dir / "staged" / "2.root.json"
    with pytest.raises(UserError) as e:
        commit_staged(store.repo(), local)
    assert "role root v2 needs 1 more from the previous root (threshold 2" in e.value.message
    st = repository_status(store.read, local.dir)["staged"][0]
    assert not st["verified"] and kid0 in st["signed"]
    for kid, uri in holders.items():
        if kid != kid0:
            signer, _ = signer_from(uri, config.dir)
            sign_staged(staged, signer)
    names = store.write(commit_staged(store.repo(), local))
    assert names[0] == "2.root.json"
    repo = store.repo()
    assert repo.root.signed.roles["root"].threshold == 3 and new_key.keyid in repo.root.signed.roles["root"].keyids


def test_refresh_resigns_online_roles_when_due(repo_keys):
    store, config = repo_keys
    repo = store.repo()
    assert repo.refresh_files(config, now=NOW - timedelta(days=1000)) == []  # long before expiry: nothing due
    ts_exp = repo.timestamp.signed.expires
    files = store.repo().refresh_files(config, now=ts_exp - timedelta(hours=1))
    assert [f.name for f in files] == ["timestamp.json"]
    store.write(files)
    snap_exp = store.repo().snapshot.signed.expires
    files = store.repo().refresh_files(config, now=snap_exp - timedelta(days=1))
    assert [f.name.split(".", 1)[1] for f in files] == ["snapshot.json", "json"]
    store.write(files)
    assert store.repo().is_current


def test_refresh_with_force(repo_keys):
    store, config = repo_keys
    files = store.repo().refresh_files(config, now=NOW - timedelta(days=1000), force=True)
    assert [f.name for f in files] == ["timestamp.json"]


def test_status_reports_every_role(repo_keys):
    store, _ = repo_keys
    st = repository_status(store.read)
    by = {r["role"]: r for r in st["roles"]}
    assert by["root"]["threshold"] == 2 and len(by["root"]["signed"]) == 3 and by["root"]["verified"]
    assert by["timestamp"]["version"] == 1 and by["timestamp"]["online"] and not by["root"]["online"]


def test_stale_staged_change_is_refused(repo_keys, tmp_path):
    store, config = repo_keys
    key, uri = generate_file_key(tmp_path / "keys", "ci")
    stage_delegation(store.repo(), config, "prod", [(key, uri)])
    store.write(_publish(store, config, "other/x", b"x"))  # targets moved on meanwhile
    with pytest.raises(UserError, match="not the next version of targets"):
        commit_staged(store.repo(), config)
    assert staged_files(config.dir)


def test_revoke_unknown_key_is_refused(repo_keys):
    store, config = repo_keys
    with pytest.raises(UserError, match="is not a key of role timestamp"):
        stage_rotation(store.repo(), config, "timestamp", revoke=["feedface"])


def test_config_keeps_uris_not_keys(repo_keys):
    _, config = repo_keys
    text = config.path.read_text()
    assert "PRIVATE" not in text and all(isinstance(k, RoleKeys) for ks in config.roles.values() for k in ks)


def _delegated(store, config, tmp_path, product="prod", bits=0):
    """A product role without hash bins unless ``bits`` (the layout before issue 14; bins: tests/test_bins.py)."""
    key, uri = generate_file_key(tmp_path / "keys", f"ci-{product}")
    stage_delegation(store.repo(), config, product, [(key, uri)], bits=bits)
    store.write(commit_staged(store.repo(), config))
    clear_staged(config.dir)
    store.write(_publish(store, config, f"{product}/channels/stable.json", b"v1"))
    return key


def test_rotating_a_delegated_key_resigns_the_role_and_devices_follow(repo_keys, tmp_path):
    store, config = repo_keys
    old = _delegated(store, config, tmp_path)
    upd = device(store, tmp_path, store.read("1.root.json"))
    upd.refresh()
    assert upd.get_targetinfo("prod/channels/stable.json") is not None
    new, uri = generate_file_key(tmp_path / "keys", "ci-prod")
    [staged] = stage_rotation(store.repo(), config, "prod", add=[(new, uri)], revoke=[old.keyid])
    assert staged.name.endswith(".targets.json")
    names = store.write(commit_staged(store.repo(), config))
    assert [n.split(".", 1)[1] for n in names] == ["targets.json", "prod.json", "snapshot.json", "json"]
    repo = store.repo()
    assert list(repo.delegated["prod"].signatures) == [new.keyid] and repo.verification("prod").verified
    upd = device(store, tmp_path, store.read("1.root.json"), "dev2")
    upd.refresh()
    assert upd.get_targetinfo("prod/channels/stable.json").length == 2


def test_refresh_resigns_a_delegated_role_whose_key_is_here(repo_keys, tmp_path):
    store, config = repo_keys
    _delegated(store, config, tmp_path)
    exp = store.repo().delegated["prod"].signed.expires
    files = store.repo().refresh_files(config, now=exp - timedelta(days=1))
    assert [f.name.split(".", 1)[1] for f in files] == ["prod.json", "snapshot.json", "json"]
    ci_less = KeyConfig(config.path, {r: config.roles[r] for r in ("snapshot", "timestamp")}, config.expiry_days)
    files = store.repo().refresh_files(ci_less, now=exp - timedelta(days=1))
    assert "prod" not in " ".join(f.name for f in files)  # no key for it here: left alone
