"""Split signing (issue 13 part 1): product CIs hold only their delegated key; the repository's
online signer holds snapshot and timestamp and checks each product's new metadata against its
delegation before it includes it. Attack stories over real HTTP, on a local repository and on
the moto and SeaweedFS S3 servers."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tuf.api.metadata import Metadata, Targets

from abflip.demo import PRODUCT
from builder.errors import AlreadyExists
from builder.publish import publish_release, write_signed
from builder.signer import sign_online
from metadata.errors import UserError
from metadata.keys import KeyConfig, generate_file_key, load_signer
from metadata.repository import DEFAULT_BIN_BITS, Repository
from metadata.staging import clear_staged, commit_staged, stage_delegation

from s3server import backend, dummy_credentials, moto, seaweedfs  # noqa: F401  (fixtures)

ABFLIP = [sys.executable, "-m", "abflip.cli"]
EVIL = "evil-os"


def _load(storage) -> Repository:
    return Repository.load(lambda n: storage.get(f"metadata/{n}"))


def _only(keys: KeyConfig, *roles: str) -> KeyConfig:
    """A keys directory's configuration reduced to some roles (what one CI job is given)."""
    return KeyConfig(keys.path, {r: keys.roles[r] for r in roles}, keys.expiry_days)


def _split(w, bits: int = DEFAULT_BIN_BITS):
    """Delegate demo-os and evil-os to their own CI keys (with 2^bits hash bins); return (signer,
    demo CI, evil CI) keys."""
    for product in (PRODUCT, EVIL):
        stage_delegation(_load(w.storage), w.keys, product, [generate_file_key(w.keys.dir, f"ci-{product}")],
                         bits=bits)
        write_signed(w.storage, commit_staged(_load(w.storage), w.keys))
        clear_staged(w.keys.dir)
    return _only(w.keys, "snapshot", "timestamp"), _only(w.keys, PRODUCT), _only(w.keys, EVIL)


def _plant(storage, name: str, md: Metadata) -> None:
    storage.put(f"metadata/{name}", md.to_bytes(), content_type="application/json", cache_control="x",
                create_only=True)


def test_a_product_ci_publish_is_visible_only_after_the_online_signer_ran(backend):
    signer_keys, demo_ci, _ = _split(backend)
    r = publish_release(backend.built["1.0.0"], backend.storage, demo_ci, channel="stable")
    assert r.changed and not r.visible
    ts_before = _load(backend.storage).timestamp.signed.version
    assert _load(backend.storage).timestamp.signed.version == ts_before  # the CI signed no timestamp
    s = sign_online(backend.storage, signer_keys)
    bins = {f"{PRODUCT}-bin-{i:x}" for i in range(1 << DEFAULT_BIN_BITS)}  # every bin signed with the product role
    assert s.newly_included == {PRODUCT: 1, **{b: 1 for b in bins}} and not s.skipped
    assert _load(backend.storage).is_current
    assert sign_online(backend.storage, signer_keys).signed == ()  # nothing new, nothing due
    # republishing the same release with the CI key only is a no-op
    again = publish_release(backend.built["1.0.0"], backend.storage, demo_ci, channel="stable")
    assert not again.changed and again.visible


@pytest.mark.parametrize("bits", [0, DEFAULT_BIN_BITS], ids=["flat", "bins"])
def test_a_compromised_product_key_cannot_freeze_roll_back_or_hide_another_products_releases(backend, bits):
    signer_keys, demo_ci, evil_ci = _split(backend, bits)
    publish_release(backend.built["1.0.0"], backend.storage, demo_ci, channel="stable")
    sign_online(backend.storage, signer_keys)
    sim, dev = backend.device()
    old_demo = _load(backend.storage).delegated[PRODUCT]  # v1: lists only 1.0.0
    publish_release(backend.built["2.0.0"], backend.storage, demo_ci, channel="stable")  # demo-os v2, not visible
    evil_key = evil_ci.roles[EVIL][0]
    repo = _load(backend.storage)
    e = load_signer(evil_key.uri, repo.role_keys(EVIL)[0][evil_key.keyid], evil_ci.dir)

    # The evil CI holds no snapshot/timestamp key: it can neither run the signer nor publish demo-os.
    with pytest.raises(UserError, match="snapshot"):
        sign_online(backend.storage, evil_ci)
    with pytest.raises(UserError, match=f"role {PRODUCT} needs 1 signature"):
        publish_release(backend.built["3.0.0"], backend.storage, evil_ci, channel="stable")

    # Roll back / freeze: demo-os's old metadata as the next versions (re-signed by the evil key, and replayed as is)
    forged = Metadata.from_bytes(old_demo.to_bytes())
    forged.signed.version = 3
    forged.sign(e)
    _plant(backend.storage, f"3.{PRODUCT}.json", forged)
    backend.storage.put(f"metadata/4.{PRODUCT}.json", old_demo.to_bytes(), content_type="application/json",
                        cache_control="x", create_only=True)
    # Hide: evil-os's own (validly signed) metadata claiming demo-os's channel, pointing at 1.0.0
    evil_md = Metadata(Targets(version=1, expires=old_demo.signed.expires))
    evil_md.signed.targets[f"{PRODUCT}/channels/stable.json"] = old_demo.signed.targets[f"{PRODUCT}/channels/stable.json"]
    evil_md.sign(e)
    _plant(backend.storage, f"1.{EVIL}.json", evil_md)
    # ... and a snapshot of its own at the next number, pinning demo-os at v1
    snap = Metadata.from_bytes(repo.snapshot.to_bytes())
    snap.signed.version += 1
    snap.signed.meta[f"{PRODUCT}.json"].version = 1
    snap.signatures.clear()
    snap.sign(e)
    _plant(backend.storage, f"{snap.signed.version}.snapshot.json", snap)

    s = sign_online(backend.storage, signer_keys)
    assert s.included[PRODUCT] == 2  # the honest v2, not the forged v3 / replayed v4
    refused = "\n".join(s.skipped)
    assert f"3.{PRODUCT}.json" in refused and f"4.{PRODUCT}.json: 4.{PRODUCT}.json carries version 1" in refused
    assert f"1.{EVIL}.json" in refused and "outside evil-os's delegation" in refused
    assert f"{snap.signed.version}.snapshot.json" in refused
    assert EVIL not in s.included
    assert s.timestamp_version < 20  # nobody but the signer moved the timestamp
    # over HTTP, the device sees demo-os 2.0.0 and installs it
    assert dev.check()["version"] == "2.0.0"
    assert dev.install().version == "2.0.0"

    # The junk files cannot freeze the product either: its next publish goes above them.
    r = publish_release(backend.built["3.0.0"], backend.storage, demo_ci, channel="stable")
    assert not r.visible
    assert sign_online(backend.storage, signer_keys).newly_included[PRODUCT] == 5
    assert dev.check()["version"] == "3.0.0"


def test_two_product_cis_publish_concurrently_and_one_signer_run_shows_both(world):
    """Create-only role files: two CIs never clobber each other, the signer includes both."""
    import threading

    signer_keys, demo_ci, evil_ci = _split(world)
    errors: list[BaseException] = []

    def ci(keys: KeyConfig, version: str, channel: str) -> None:
        try:
            publish_release(world.built[version], world.storage, keys, channel=channel)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ci, args=(demo_ci, "1.0.0", "stable")),
               threading.Thread(target=ci, args=(demo_ci, "2.0.0", "edge"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = sign_online(world.storage, signer_keys)
    targets = _load(world.storage).delegated[PRODUCT].signed.targets
    assert {f"{PRODUCT}/channels/stable.json", f"{PRODUCT}/channels/edge.json"} <= set(targets)
    assert s.included[PRODUCT] == 2


def test_repo_snapshot_cli_reports_what_it_included_and_refused(world):
    signer_keys, demo_ci, evil_ci = _split(world)
    publish_release(world.built["1.0.0"], world.storage, demo_ci, channel="stable")
    # a junk file where the next demo-os version would go
    try:
        world.storage.put(f"metadata/2.{PRODUCT}.json", b"{not json", content_type="application/json",
                          cache_control="x", create_only=True)
    except AlreadyExists:
        pytest.fail("2.demo-os.json should be free")
    sdir = world.tmp / "signer-keys"
    sdir.mkdir()
    import shutil

    for k in [*signer_keys.roles["snapshot"], *signer_keys.roles["timestamp"]]:
        shutil.copy(world.keys.dir / k.uri[len("file2:"):], sdir)
    KeyConfig(sdir / "keys.json", signer_keys.roles, signer_keys.expiry_days).save()
    p = subprocess.run([*ABFLIP, "repo", "snapshot", "--repo", str(world.repo), "--keys", str(sdir)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"included {PRODUCT} v1" in p.stdout
    assert f"refused 2.{PRODUCT}.json" in p.stdout
    # the product CI's keys cannot run the signer: a user error, exit 2, nothing signed
    cdir = world.tmp / "ci-keys"
    cdir.mkdir()
    shutil.copy(world.keys.dir / demo_ci.roles[PRODUCT][0].uri[len("file2:"):], cdir)
    KeyConfig(cdir / "keys.json", demo_ci.roles, demo_ci.expiry_days).save()
    before = sorted(p.name for p in (world.repo / "metadata").iterdir())
    p = subprocess.run([*ABFLIP, "repo", "snapshot", "--repo", str(world.repo), "--keys", str(cdir)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error (user): role snapshot needs 1 signature"), p.stderr
    assert "Traceback" not in p.stderr
    assert sorted(p.name for p in (world.repo / "metadata").iterdir()) == before
