"""Hash bins per product (issue 14; TAP 15 succinct delegations): the product role lists its
channel pointers and the releases they point at, each bin every release target whose path
hashes to it. Stories over a local repository and real HTTP: a device update never loads a bin;
promote, withdraw and gc keep the product role's current set; a product key cannot make its role
delegate elsewhere, nor its bins list what is not theirs; old repositories move to bins."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from tuf.api.metadata import DelegatedRole, Delegations, Metadata, SuccinctRoles, Targets

from abflip.audit import audit
from abflip.demo import PRODUCT
from abflip.httpserver import RepoHandler
from builder.channels import promote, withdraw
from builder.gc import collect_garbage
from builder.publish import publish_release, write_signed
from builder.signer import sign_online
from metadata.errors import UserError
from metadata.keys import KeyConfig, generate_file_key, load_signer
from metadata.manifest import Release
from metadata.repository import DEFAULT_BIN_BITS, Repository
from metadata.staging import clear_staged, commit_staged, stage_bins, stage_delegation, stage_rotation

ROOT = Path(__file__).resolve().parent.parent
ABFLIP = [sys.executable, "-m", "abflip.cli"]
EVIL = "evil-os"
BINS = {f"{PRODUCT}-bin-{i:x}" for i in range(1 << DEFAULT_BIN_BITS)}
VERSIONS = ("1.0.0", "2.0.0", "3.0.0")


def _load(storage) -> Repository:
    return Repository.load(lambda n: storage.get(f"metadata/{n}"))


def _delegate(w, product: str = PRODUCT, bits: int = DEFAULT_BIN_BITS) -> None:
    stage_delegation(_load(w.storage), w.keys, product, [generate_file_key(w.keys.dir, f"ci-{product}")], bits=bits)
    write_signed(w.storage, commit_staged(_load(w.storage), w.keys))
    clear_staged(w.keys.dir)


def _only(keys: KeyConfig, *roles: str) -> KeyConfig:
    return KeyConfig(keys.path, {r: keys.roles[r] for r in roles}, keys.expiry_days)


def _files(w, version: str) -> set[str]:
    """The target paths of one release: manifest, image, boot files."""
    rel = Release.from_bytes((w.built[version] / "release.json").read_bytes())
    return {rel.target_path, rel.image.target, *(bf.target for bf in rel.boot.files().values())}


def _own(w) -> set[str]:
    return set(_load(w.storage).delegated[PRODUCT].signed.targets)


def _pointers(*channels: str) -> set[str]:
    return {f"{PRODUCT}/channels/{c}.json" for c in channels}


class _Recording(RepoHandler):
    paths: list[str] = []

    def do_GET(self, head=False):
        _Recording.paths.append(self.path)
        return RepoHandler.do_GET(self, head)


def test_a_device_update_loads_the_small_product_role_and_never_a_bin(world):
    _delegate(world)
    signer, ci = _only(world.keys, "snapshot", "timestamp"), _only(world.keys, PRODUCT)
    publish_release(world.built["1.0.0"], world.storage, ci, channel="stable")
    sign_online(world.storage, signer)
    sim, dev = world.device()
    publish_release(world.built["2.0.0"], world.storage, ci, channel="stable")
    publish_release(world.built["3.0.0"], world.storage, ci, channel="beta")
    s = sign_online(world.storage, signer)
    assert not s.skipped and set(s.included) == {"targets", PRODUCT, *BINS}

    repo = _load(world.storage)
    assert _own(world) == _pointers("stable", "beta") | _files(world, "2.0.0") | _files(world, "3.0.0")
    for version in VERSIONS:  # every release in the bin its path hashes to (the product role's copies are equal)
        for path in _files(world, version):
            [holder] = [b for b in BINS if path in repo.delegated[b].signed.targets]
            assert holder == repo.role_for_path(path)
            assert repo.target_files[path] == repo.delegated[holder].signed.targets[path]
    assert not any(p.startswith(f"{PRODUCT}/channels/") for b in BINS for p in repo.delegated[b].signed.targets)

    _Recording.paths = []
    world.handler = _Recording
    assert dev.install().version == "2.0.0"
    assert not [p for p in _Recording.paths if "-bin-" in p]
    assert [p for p in _Recording.paths if p.endswith(f".{PRODUCT}.json")]  # the product role, and no other role
    assert audit(str(world.repo), deep=True)["ok"]


def test_promote_withdraw_and_gc_keep_the_product_roles_current_set(world):
    _delegate(world)
    world.publish("1.0.0", channel="stable")
    world.publish("2.0.0", channel="beta")
    assert _own(world) == _pointers("stable", "beta") | _files(world, "1.0.0") | _files(world, "2.0.0")
    before = len(world.storage.get(f"metadata/{_load(world.storage).delegated[PRODUCT].signed.version}.{PRODUCT}.json"))

    promote(world.storage, world.keys, product=PRODUCT, version="2.0.0", channel="stable")
    assert _own(world) == _pointers("stable", "beta") | _files(world, "2.0.0")  # 1.0.0 only in its bins now
    assert _files(world, "1.0.0") <= set(_load(world.storage).target_files)
    world.publish("3.0.0", channel="stable")
    md = _load(world.storage).delegated[PRODUCT]
    assert _own(world) == _pointers("stable", "beta") | _files(world, "2.0.0") | _files(world, "3.0.0")
    assert abs(len(world.storage.get(f"metadata/{md.signed.version}.{PRODUCT}.json")) - before) < 64  # flat

    withdraw(world.storage, world.keys, product=PRODUCT, version="3.0.0", channel="stable", back_to="1.0.0")
    assert _own(world) == _pointers("stable", "beta") | _files(world, "1.0.0") | _files(world, "2.0.0")

    sim, dev = world.device()
    r = collect_garbage(world.storage, world.keys, keep=1)  # keeps 3.0.0 (newest), 1.0.0 and 2.0.0 (pinned)
    assert r.removed_versions == {}
    promote(world.storage, world.keys, product=PRODUCT, version="2.0.0", channel="stable")
    r = collect_garbage(world.storage, world.keys, keep=1)
    assert r.removed_versions == {PRODUCT: ["1.0.0"]}
    repo = _load(world.storage)
    assert not _files(world, "1.0.0") & {p for b in BINS for p in repo.delegated[b].signed.targets}
    assert _own(world) == _pointers("stable", "beta") | _files(world, "2.0.0")
    assert _files(world, "3.0.0") <= set(repo.target_files)  # kept (newest), in its bins only
    assert not [k for k in world.storage.list("targets/") if "/1.0.0/" in k]
    stale = [k for k in world.storage.list("metadata/") if "-bin-" in k
             and int(k.split("/")[1].split(".")[0]) < repo.delegated[k.split(".")[1]].signed.version - 1]
    assert stale == []  # old bin versions are deleted like other roles'
    assert dev.install().version == "2.0.0"
    assert audit(str(world.repo))["ok"]


def _plant(storage, name: str, md: Metadata) -> None:
    storage.put(f"metadata/{name}", md.to_bytes(), content_type="application/json", cache_control="x",
                create_only=True)


def test_a_product_key_cannot_delegate_elsewhere_nor_fill_bins_with_what_is_not_theirs(world):
    _delegate(world)
    _delegate(world, EVIL)
    signer, demo_ci, evil_ci = (_only(world.keys, "snapshot", "timestamp"), _only(world.keys, PRODUCT),
                                _only(world.keys, EVIL))
    publish_release(world.built["1.0.0"], world.storage, demo_ci, channel="stable")
    sign_online(world.storage, signer)
    sim, dev = world.device()
    repo = _load(world.storage)
    signer_of = {}
    for product, keys in ((PRODUCT, demo_ci), (EVIL, evil_ci)):
        k = keys.roles[product][0]
        signer_of[product] = load_signer(k.uri, repo.role_keys(product)[0][k.keyid], keys.dir)
    d, e = signer_of[PRODUCT], signer_of[EVIL]
    path = f"{PRODUCT}/releases/1.0.0/release.json"
    own_bin = repo.role_for_path(path)
    other_bin = next(b for b in sorted(BINS) if b != own_bin)
    listed = repo.delegated[own_bin].signed.targets[path]

    def next_of(role: str, md: Metadata, signer) -> str:
        md.signed.version = max(repo.highest.get(role, 0), repo.delegated[role].signed.version) + 1
        repo.highest[role] = md.signed.version
        md.signatures.clear()
        md.sign(signer)
        _plant(world.storage, f"{md.signed.version}.{role}.json", md)
        return f"{md.signed.version}.{role}.json"

    def copy(role: str) -> Metadata:
        return Metadata.from_bytes(repo.delegated[role].to_bytes())

    refused = {}
    # bins: a path that hashes elsewhere; another product's path; signed by another product's key
    md = copy(other_bin)
    md.signed.targets[path] = listed
    refused[next_of(other_bin, md, d)] = "hash to another bin"
    md = copy(own_bin)
    md.signed.targets[f"{EVIL}/releases/1.0.0/release.json"] = listed
    refused[next_of(own_bin, md, d)] = "outside demo-os's delegation"
    md = copy(own_bin)
    refused[next_of(own_bin, md, e)] = "not signed by its threshold"
    # the product role: a delegation to another role, to its bins with other keys, other bins
    good = repo.delegated[PRODUCT].signed.delegations
    evil_key = repo.role_keys(EVIL)[0]
    md = copy(PRODUCT)
    md.signed.delegations = Delegations(keys=dict(evil_key), roles={
        EVIL: DelegatedRole(EVIL, list(evil_key), 1, True, paths=[f"{PRODUCT}/*/*/*"])})
    refused[next_of(PRODUCT, md, d)] = "delegates to roles other than its hash bins"
    md = copy(PRODUCT)
    md.signed.delegations = Delegations(keys=dict(evil_key), roles=None, succinct_roles=SuccinctRoles(
        list(evil_key), 1, DEFAULT_BIN_BITS, f"{PRODUCT}-bin"))
    refused[next_of(PRODUCT, md, d)] = "other keys"
    for bits, prefix in ((12, f"{PRODUCT}-bin"), (DEFAULT_BIN_BITS, f"{EVIL}-bin"), (DEFAULT_BIN_BITS, EVIL)):
        md = copy(PRODUCT)
        md.signed.delegations = Delegations(keys=dict(good.keys), roles=None, succinct_roles=SuccinctRoles(
            list(good.succinct_roles.keyids), 1, bits, prefix))
        refused[next_of(PRODUCT, md, d)] = "bins named"
    # the other product: its role delegating to bins named like demo-os's, with its own key
    md = Metadata(Targets(version=1, expires=repo.delegated[PRODUCT].signed.expires))
    md.signed.delegations = Delegations(keys=dict(evil_key), roles=None, succinct_roles=SuccinctRoles(
        list(evil_key), 1, DEFAULT_BIN_BITS, f"{PRODUCT}-bin"))
    refused[next_of(EVIL, md, e)] = "bins named"

    s = sign_online(world.storage, signer)
    skipped = dict(line.split(": ", 1) for line in s.skipped)
    for name, why in refused.items():
        assert why in skipped.get(name, ""), (name, skipped.get(name))
    assert s.included[PRODUCT] == 1 and all(s.included[b] == 1 for b in BINS)
    assert EVIL not in s.included  # never published honestly
    assert dev.check()["version"] == "1.0.0"  # the device reads the honest role
    # The junk cannot freeze the product: its next publish goes above every planted version.
    publish_release(world.built["2.0.0"], world.storage, demo_ci, channel="stable")
    s = sign_online(world.storage, signer)
    assert s.included[PRODUCT] == max(int(n.split(".")[0]) for n in refused if f".{PRODUCT}.json" in n) + 1
    assert dev.install().version == "2.0.0"
    assert audit(str(world.repo))["ok"]


def test_bin_names_never_meet_another_products_role(world):
    _delegate(world)
    pair = generate_file_key(world.keys.dir, "ci-x")
    with pytest.raises(UserError, match="one of demo-os's hash bins"):
        stage_delegation(_load(world.storage), world.keys, f"{PRODUCT}-bin-3", [pair])
    _delegate(world, "other-bin-a", bits=0)
    # bins or not, other's CI wildcards (metadata/*.other-bin-*.json, docs/keys.md) would reach other-bin-a's files
    for bits in (4, 0):
        with pytest.raises(UserError, match="product 'other': its CI's wildcards would reach other-bin-a's file"):
            stage_delegation(_load(world.storage), world.keys, "other", [pair], bits=bits)
    with pytest.raises(UserError, match="bin bits"):
        stage_delegation(_load(world.storage), world.keys, "another", [pair], bits=9)
    stage_delegation(_load(world.storage), world.keys, "another", [pair], bits=0)


def test_an_old_repository_moves_to_bins_at_the_products_next_publish(world):
    _delegate(world, bits=0)  # a product role listing every release, as before issue 14
    ci = _only(world.keys, PRODUCT, "snapshot", "timestamp")
    publish_release(world.built["1.0.0"], world.storage, ci, channel="stable")
    publish_release(world.built["2.0.0"], world.storage, ci, channel="stable")
    sim, dev = world.device()
    assert _own(world) == _pointers("stable") | _files(world, "1.0.0") | _files(world, "2.0.0")

    stage_bins(_load(world.storage), world.keys, PRODUCT, DEFAULT_BIN_BITS)
    write_signed(world.storage, commit_staged(_load(world.storage), world.keys))
    clear_staged(world.keys.dir)
    repo = _load(world.storage)
    assert repo.has_bins(PRODUCT) and repo.delegated[PRODUCT].signed.delegations is None  # not moved yet: as before
    assert not sign_online(world.storage, world.keys).skipped
    assert dev.check()["version"] == "2.0.0"
    with pytest.raises(UserError, match="already has 16 hash bins"):
        stage_bins(_load(world.storage), world.keys, PRODUCT, 5)

    publish_release(world.built["3.0.0"], world.storage, ci, channel="stable")  # the product key moves it
    repo = _load(world.storage)
    assert _own(world) == _pointers("stable") | _files(world, "3.0.0")
    in_bins = {p for b in BINS for p in repo.delegated[b].signed.targets}
    assert in_bins == _files(world, "1.0.0") | _files(world, "2.0.0") | _files(world, "3.0.0")
    _Recording.paths = []
    world.handler = _Recording
    assert dev.install().version == "3.0.0"
    assert not [p for p in _Recording.paths if "-bin-" in p]
    assert audit(str(world.repo))["ok"]


def test_rotating_a_products_key_re_signs_its_role_and_every_bin_and_devices_follow(world):
    _delegate(world)
    world.publish("1.0.0")
    world.publish("2.0.0")
    sim, dev = world.device()
    old = world.keys.roles[PRODUCT][0].keyid
    new = generate_file_key(world.keys.dir, "ci-new")
    with pytest.raises(UserError, match="hash bin of demo-os"):
        stage_rotation(_load(world.storage), world.keys, f"{PRODUCT}-bin-0", add=[new])
    stage_rotation(_load(world.storage), world.keys, PRODUCT, add=[new], revoke=[old])
    files = commit_staged(_load(world.storage), world.keys)
    assert {f.name.split(".", 1)[1][:-5] for f in files} == {"targets", PRODUCT, *BINS, "snapshot", ""}
    write_signed(world.storage, files)
    clear_staged(world.keys.dir)
    repo = _load(world.storage)
    assert not repo.skipped
    for name in (PRODUCT, *BINS):
        assert list(repo.delegated[name].signatures) == [new[0].keyid] and repo.verification(name).verified
    assert repo.delegated[PRODUCT].signed.delegations.succinct_roles.keyids == [new[0].keyid]
    assert dev.install().version == "2.0.0"
    assert audit(str(world.repo))["ok"]


def test_bins_are_re_signed_before_they_expire(world):
    _delegate(world)
    world.publish("1.0.0")
    exp = _load(world.storage).delegated[f"{PRODUCT}-bin-0"].signed.expires
    # a publish near expiry re-signs every due bin with the product role
    r = publish_release(world.built["2.0.0"], world.storage, world.keys, channel="stable", now=exp - timedelta(days=1))
    assert r.changed
    repo = _load(world.storage)
    assert all(repo.delegated[b].signed.expires > exp for b in BINS)
    # and so does a refresh by the product's own key, or nothing without it
    later = repo.delegated[f"{PRODUCT}-bin-0"].signed.expires - timedelta(days=1)
    names = [f.name for f in _load(world.storage).refresh_files(world.keys, now=later)]
    assert {n.split(".", 1)[1][:-5] for n in names} >= {PRODUCT, *BINS}
    names = [f.name for f in _load(world.storage).refresh_files(_only(world.keys, "snapshot", "timestamp"), now=later)]
    assert not [n for n in names if PRODUCT in n]


def test_verify_loads_every_bin_and_finds_a_release_missing_from_its_bin(world):
    _delegate(world)
    world.publish("1.0.0")
    report = audit(str(world.repo))
    assert report["ok"] and BINS <= set(report["roles"])
    repo = _load(world.storage)
    path = f"{PRODUCT}/releases/1.0.0/release.json"
    b = repo.role_for_path(path)
    del repo.delegated[b].signed.targets[path]  # a hand-made inconsistency: devices unaffected, gc would miss it
    repo.mark_changed(b)
    write_signed(world.storage, repo.signed_files(world.keys))
    report = audit(str(world.repo))
    assert not report["ok"] and [p for p in report["problems"] if f"not by its hash bin {b}" in p]


def test_the_conformance_client_finds_a_release_that_only_a_bin_lists(world, tmp_path):
    _delegate(world)
    world.publish("1.0.0")
    world.publish("2.0.0")  # stable moves on: 1.0.0 is listed by its bins only
    assert f"{PRODUCT}/releases/1.0.0/release.json" not in _own(world)
    md, td = tmp_path / "md", tmp_path / "td"
    client = [sys.executable, "-m", "applier.conformance", "--metadata-dir", str(md)]
    assert subprocess.run([*client, "init", str(world.repo / "metadata" / "1.root.json")], cwd=ROOT).returncode == 0
    r = subprocess.run([*client, "--metadata-url", f"{world.url}/metadata", "--target-base-url",
                        f"{world.url}/targets", "--target-dir", str(td), "--target-name",
                        f"{PRODUCT}/releases/1.0.0/release.json", "download"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (td / "demo-os%2Freleases%2F1.0.0%2Frelease.json").read_bytes() == \
        (world.built["1.0.0"] / "release.json").read_bytes()


def test_cli_delegate_with_and_without_bins_and_move_to_bins(world):
    keys, repo = str(world.keys.dir), str(world.repo)

    def abflip(*args):
        return subprocess.run([*ABFLIP, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)

    r = abflip("repo", "delegate", PRODUCT, "--keys", keys, "--to", repo, "--generate", "--bin-bits", "9")
    assert r.returncode == 2 and "bin bits" in r.stderr and not (world.keys.dir / f"{PRODUCT}.pem").exists()
    r = abflip("repo", "delegate", PRODUCT, "--keys", keys, "--to", repo, "--generate", "--bin-bits", "0")
    assert r.returncode == 0, r.stderr
    assert abflip("repo", "commit", "--keys", keys, "--to", repo).returncode == 0
    world.keys = KeyConfig.load(world.keys.dir)  # the product's new key
    world.publish("1.0.0")
    assert not _load(world.storage).has_bins(PRODUCT)
    r = abflip("repo", "bins", PRODUCT, "--keys", keys, "--to", repo)
    assert r.returncode == 0, r.stderr
    assert abflip("repo", "commit", "--keys", keys, "--to", repo).returncode == 0
    r = abflip("repo", "bins", PRODUCT, "--keys", keys, "--to", repo)
    assert r.returncode == 2 and "already has 16 hash bins" in r.stderr
    before = sorted(world.keys.dir.iterdir())
    r = abflip("repo", "rotate", f"{PRODUCT}-bin-3", "--keys", keys, "--to", repo, "--generate", "1")
    assert r.returncode == 2 and "rotate the keys of demo-os" in r.stderr
    assert sorted(world.keys.dir.iterdir()) == before  # no key file made for it
    world.publish("2.0.0")
    assert _own(world) == _pointers("stable") | _files(world, "2.0.0")
    r = abflip("repo", "verify", repo)
    assert r.returncode == 0, r.stderr


def test_a_device_on_a_missing_channel_is_told_the_channels_of_a_product_with_bins(world):
    _delegate(world)
    world.publish("1.0.0", channel="stable")
    world.publish("2.0.0", channel="edge")
    sim, dev = world.device()
    client = dev.offer(dev.session())._client()
    client.refresh()
    assert client.channels(PRODUCT) == ["edge", "stable"]
    assert client.channels("no-such-product") == []


def test_publishing_at_a_time_touches_a_few_bins_and_the_product_role_only(world):
    _delegate(world)
    world.publish("1.0.0")
    before = {n: md.signed.version for n, md in _load(world.storage).delegated.items()}
    world.publish("2.0.0", now=datetime.now(timezone.utc))
    after = {n: md.signed.version for n, md in _load(world.storage).delegated.items()}
    moved = {n for n in after if after[n] != before[n]}
    assert PRODUCT in moved and moved - {PRODUCT} == {_load(world.storage).role_for_path(p) for p in _files(world, "2.0.0")}
