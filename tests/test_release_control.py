"""Release control (issue 13 parts 2 and 3): phased rollouts decided on the device from a signed
channel pointer, pause, withdrawal. Simulated fleets: hundreds of device ids through the pure
bucket function, and a handful of simulated devices over real HTTP."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from abflip.demo import PRODUCT
from applier.agent import Device
from applier.config import Config
from applier.policy import StageDiscarded
from applier.release_control import read_device_id
from applier.rollout import BUCKETS, bucket, decide, device_id_problem
from builder.channels import make_rollout, promote, set_rollout, withdraw
from metadata.errors import RepositoryError, UserError
from metadata.manifest import Channel, ManifestError, Rollout
from metadata.version import Version

from helpers import assert_untouched
from s3server import backend, dummy_credentials, moto, seaweedfs  # noqa: F401  (fixtures)

ABFLIP = [sys.executable, "-m", "abflip.cli"]
FLEET = [hashlib.sha256(f"device-{i}".encode()).hexdigest()[:32] for i in range(2000)]


# -- the pure bucket: a simulated fleet -------------------------------------------------------
def _in(percent: int, seed: str) -> set[str]:
    return {d for d in FLEET if decide(Rollout(percent, seed=seed), product=PRODUCT, version="2.0.0",
                                       device_id=d).allowed}


def test_the_rollout_percentage_holds_within_sampling_error_and_only_widens():
    previous: set[str] = set()
    for pct in (0, 1, 5, 10, 25, 50, 90, 100):
        members = _in(pct, "2.0.0")
        p = pct / 100
        sigma = math.sqrt(len(FLEET) * p * (1 - p))
        assert abs(len(members) - len(FLEET) * p) <= 4 * sigma + 1, (pct, len(members))
        assert previous <= members, f"a device flipped out when widening to {pct} %"
        previous = members
    assert previous == set(FLEET)


def test_the_bucket_is_deterministic_per_device_and_new_per_release_unless_seeded():
    assert [bucket(d, PRODUCT, "2.0.0") for d in FLEET[:50]] == [bucket(d, PRODUCT, "2.0.0") for d in FLEET[:50]]
    assert all(0 <= bucket(d, PRODUCT, "x") < BUCKETS for d in FLEET)
    first_v2 = {d for d in FLEET if decide(Rollout(10), product=PRODUCT, version="2.0.0", device_id=d).allowed}
    first_v3 = {d for d in FLEET if decide(Rollout(10), product=PRODUCT, version="3.0.0", device_id=d).allowed}
    assert first_v2 != first_v3  # by default each release draws its own first 10 %
    seeded = [{d for d in FLEET if decide(Rollout(10, seed="canary"), product=PRODUCT, version=v,
                                          device_id=d).allowed} for v in ("2.0.0", "3.0.0")]
    assert seeded[0] == seeded[1]  # a fixed seed keeps the same cohort first
    other = {d for d in FLEET if decide(Rollout(10, seed="canary"), product="other-os", version="2.0.0",
                                        device_id=d).allowed}
    assert other != seeded[0]  # and products draw independently


def test_pause_stops_only_devices_that_have_not_started():
    inside = next(d for d in FLEET if bucket(d, PRODUCT, "2.0.0") < 1000)
    outside = next(d for d in FLEET if bucket(d, PRODUCT, "2.0.0") >= 1000)
    paused = Rollout(10, paused=True)
    assert not decide(paused, product=PRODUCT, version="2.0.0", device_id=inside).allowed
    assert decide(paused, product=PRODUCT, version="2.0.0", device_id=inside, started=True).allowed
    assert not decide(paused, product=PRODUCT, version="2.0.0", device_id=outside, started=True).allowed
    d = decide(Rollout(10), product=PRODUCT, version="2.0.0", device_id=None, device_id_error="no file")
    assert not d.allowed and "no usable id (no file)" in d.reason
    assert decide(Rollout(100), product=PRODUCT, version="2.0.0", device_id=None).allowed
    assert decide(None, product=PRODUCT, version="2.0.0", device_id=None).allowed


# -- hostile input: the pointer's rollout and withdrawn fields, the device id ----------------
def _pointer(**extra) -> bytes:
    d = {"schema": "abflip-channel/2", "product": PRODUCT, "channel": "stable", "version": "2.0.0",
         "release": f"{PRODUCT}/releases/2.0.0/release.json", **extra}
    return json.dumps(d).encode()


@pytest.mark.parametrize("extra, message", [
    ({"rollout": {"percent": 101, "paused": False}}, "rollout.percent=101 is not an integer in [0, 100]"),
    ({"rollout": {"percent": -1, "paused": False}}, "rollout.percent=-1"),
    ({"rollout": {"percent": 10.5, "paused": False}}, "rollout.percent=10.5"),
    ({"rollout": {"percent": True, "paused": False}}, "rollout.percent=True"),
    ({"rollout": {"percent": "10", "paused": False}}, "rollout.percent='10'"),
    ({"rollout": {"percent": 10**100, "paused": False}}, "is not an integer in [0, 100]"),
    ({"rollout": {"percent": 10}}, "rollout.paused=None is not true or false"),
    ({"rollout": {"percent": 10, "paused": "no"}}, "rollout.paused='no'"),
    ({"rollout": {"percent": 10, "paused": False, "seed": "a b"}}, "rollout.seed 'a b' is malformed"),
    ({"rollout": {"percent": 10, "paused": False, "seed": "x" * 65}}, "rollout.seed"),
    ({"rollout": {"percent": 10, "paused": False, "widen": 1}}, "rollout has unknown key(s) 'widen'"),
    ({"rollout": [10]}, "rollout is not an object"),
    ({"withdrawn": "2.0.0"}, "withdrawn must list at most 256 versions"),
    ({"withdrawn": ["1.0.0"] * 257}, "withdrawn must list at most 256 versions"),
    ({"withdrawn": ["1.0"]}, "withdrawn version '1.0' is not a semantic version"),
    ({"withdrawn": [7]}, "withdrawn version '7'"),
    ({"withdrawn": ["1.0.0", "1.0.0+rebuild"]}, "withdrawn lists '1.0.0+rebuild' twice"),
    ({"percent": 10}, "channel pointer has unknown key(s) 'percent'"),
])
def test_a_hostile_rollout_or_withdrawn_field_is_a_repository_error(extra, message):
    with pytest.raises(ManifestError) as e:
        Channel.from_bytes(_pointer(**extra))
    assert message in e.value.message
    assert isinstance(e.value, RepositoryError)


def test_pointers_without_release_control_stay_channel_1_byte_for_byte():
    plain = Channel(PRODUCT, "stable", Version.parse("2.0.0"), f"{PRODUCT}/releases/2.0.0/release.json")
    assert json.loads(plain.to_bytes())["schema"] == "abflip-channel/1"
    phased = Channel(PRODUCT, "stable", Version.parse("2.0.0"), plain.release, rollout=Rollout(10))
    assert json.loads(phased.to_bytes())["schema"] == "abflip-channel/2"  # a /1-only device refuses, never ignores it
    assert Channel.from_bytes(phased.to_bytes()).rollout == Rollout(10)
    assert Channel.from_bytes(_pointer(withdrawn=["2.0.0+b"])).is_withdrawn("2.0.0")


@pytest.mark.parametrize("percent, seed, message", [
    (101, None, "rollout.percent=101"), (-5, None, "rollout.percent=-5"), (10, "bad seed", "rollout.seed"),
])
def test_the_producer_refuses_what_the_device_would(percent, seed, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        make_rollout(percent, seed=seed)


@pytest.mark.parametrize("content, why", [
    (b"", "is malformed"),
    (b"0" * 32 + b"\n", "all zeros"),
    (b"a" * 129, "is malformed"),
    (b"a" * 5000, "is 5000 bytes, more than the limit 4096"),
    (b"\xff\xfe", "not ASCII"),
    (b"abc\ndef\n", "is malformed"),
    (b"abc def", "is malformed"),
    (b"-rf", "is malformed"),
])
def test_a_bad_device_id_file_keeps_the_device_out_of_partial_rollouts(tmp_path, content, why):
    p = tmp_path / "machine-id"
    p.write_bytes(content)
    device_id, problem = read_device_id(p)
    assert device_id is None and why in problem
    assert not decide(Rollout(99), product=PRODUCT, version="2.0.0", device_id=None, device_id_error=problem).allowed


def test_device_id_file_of_the_wrong_kind(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    assert "is a FIFO, not a regular file" in read_device_id(tmp_path / "fifo")[1]  # never blocks on a FIFO
    assert "cannot read" in read_device_id(tmp_path / "missing")[1]
    assert "is a directory, not a regular file" in read_device_id(tmp_path)[1]
    assert "is a character device" in read_device_id(Path("/dev/zero"))[1]
    (tmp_path / "machine-id").write_text("4c4c4544004d3510804bb4c04f4d3732\n")
    assert read_device_id(tmp_path / "machine-id") == ("4c4c4544004d3510804bb4c04f4d3732", None)
    assert device_id_problem("4c4c4544004d3510804bb4c04f4d3732") is None


def test_device_id_file_config_key_is_validated(world):
    """The key must be a path; whatever the file is, it only keeps the device out of partial
    rollouts (tests/test_hostile_files.py runs every command with a FIFO there)."""
    sim, _ = world.device()
    text = sim.config_path.read_text()
    (sim.root / "iddir").mkdir()
    sim.config_path.write_text(text.replace("[device]\n", '[device]\nid_file = "iddir"\n'))
    config = Config.load(sim.config_path)
    assert config.id_file == sim.root / "iddir"
    assert "is a directory, not a regular file" in read_device_id(config.id_file)[1]
    sim.config_path.write_text(text.replace("[device]\n", "[device]\nid_file = 7\n"))
    with pytest.raises(UserError, match=r"device\.id_file"):
        Config.load(sim.config_path)
    sim.config_path.write_text(text.replace("[device]\n", '[device]\nid_fille = "x"\n'))
    with pytest.raises(UserError, match="id_file"):  # the nearest valid name
        Config.load(sim.config_path)


# -- a handful of simulated devices over HTTP -------------------------------------------------
def _ids(n_in: int, n_out: int, percent: int, seed: str = "2.0.0") -> tuple[list[str], list[str]]:
    cut = percent * (BUCKETS // 100)
    ins = [d for d in FLEET if bucket(d, PRODUCT, seed) < cut][:n_in]
    outs = [d for d in FLEET if bucket(d, PRODUCT, seed) >= cut][:n_out]
    return ins, outs


def _stored_pointer(world, channel: str = "stable"):
    """The file of the channel's current pointer in the repository directory."""
    from builder.publish import target_key
    from metadata.repository import Repository

    repo = Repository.load(lambda n: world.storage.get(f"metadata/{n}"))
    return world.repo / target_key(repo.target_files[f"{PRODUCT}/channels/{channel}.json"])


def _device(world, name: str, device_id: str):
    sim, _ = world.device(name)
    (sim.root / "machine-id").write_text(device_id + "\n")
    sim.config_path.write_text(sim.config_path.read_text().replace("[device]\n", '[device]\nid_file = "machine-id"\n'))
    return sim, Device(sim.config)


def test_a_phased_rollout_widens_over_http_and_pause_stops_devices_that_have_not_started(world):
    world.publish("1.0.0")
    world.publish("2.0.0", channel="beta")
    promote(world.storage, world.keys, product=PRODUCT, version="2.0.0", channel="stable", rollout=Rollout(0))
    ins, outs = _ids(3, 2, 50)
    fleet = {d: _device(world, f"dev{i}", d) for i, d in enumerate(ins + outs)}
    for d, (sim, dev) in fleet.items():
        chk = dev.check()
        assert not chk["available"] and not chk["rollout"]["in"], chk
        assert "not in the rollout yet" in chk["reason"] and chk["rollout"]["percent"] == 0
        assert dev.run(reboot=False)["download"] is None
        assert_untouched(sim, dev)
    set_rollout(world.storage, world.keys, product=PRODUCT, channel="stable", percent=50)
    first, second, third = (fleet[d] for d in ins)
    assert first[1].check()["rollout"]["in"]
    assert first[1].install().version == "2.0.0"
    second[1].download()  # started before the pause
    for d in outs:
        chk = fleet[d][1].check()
        assert not chk["available"] and "bucket" in chk["rollout"]["reason"]
    set_rollout(world.storage, world.keys, product=PRODUCT, channel="stable", paused=True)
    chk = third[1].check()
    assert not chk["available"] and "paused at 50 %" in chk["reason"]
    assert third[1].run(reboot=False)["download"] is None
    assert_untouched(*third)
    # the device that had started finishes: the staged release is still the one on offer
    assert second[1].run(reboot=False)["apply"]["version"] == "2.0.0"
    status = third[1].status()["release_control"]
    assert status["rollout"]["paused"] and not status["rollout"]["in"]
    set_rollout(world.storage, world.keys, product=PRODUCT, channel="stable", paused=False, percent=100)
    for d in [ins[2], *outs]:
        assert fleet[d][1].install().version == "2.0.0"


def test_a_mirror_cannot_widen_a_rollout(world):
    world.publish("1.0.0")
    world.publish("2.0.0", channel="beta")
    promote(world.storage, world.keys, product=PRODUCT, version="2.0.0", channel="stable", rollout=Rollout(0))
    _, outs = _ids(0, 1, 0)
    sim, dev = _device(world, "m", outs[0])
    stored = _stored_pointer(world)
    widened = Channel.from_bytes(stored.read_bytes())
    stored.write_bytes(Channel(PRODUCT, "stable", widened.version, widened.release, rollout=Rollout(100)).to_bytes())
    with pytest.raises(RepositoryError):
        dev.check()
    assert_untouched(sim, dev)


# -- withdrawal -------------------------------------------------------------------------------
def test_a_withdrawn_release_is_discarded_when_staged_and_reported_when_running(world):
    world.publish("1.0.0")
    world.publish("2.0.0")
    staged_sim, staged = world.device("staged")
    running_sim, running = world.device("running")
    runner_sim, runner = world.device("runner")
    staged.download()
    runner.download()
    running.install()
    assert running_sim.boot().slot == "b"
    running.boot_check()
    withdraw(world.storage, world.keys, product=PRODUCT, version="2.0.0", channel="stable", back_to="1.0.0")

    with pytest.raises(StageDiscarded, match="2.0.0 was withdrawn from channel stable: the staged 2.0.0 was discarded"):
        staged.apply(now=True)
    st = staged.status()
    assert st["target"] is None and st["state"] == "idle" and st["slots"]["b"]["status"] == "unknown"
    assert "withdrawn" in st["last_error"]["message"]
    assert_untouched(staged_sim, staged)
    assert not (staged_sim.state_dir / "staged").exists()
    assert staged_sim.boot().slot == "a"

    out = runner.run(reboot=False)  # the timer: discards, applies nothing, says why
    assert out["apply"] is None and "withdrawn" in out["discarded"]
    assert_untouched(runner_sim, runner)

    chk = running.check()  # the device running it keeps it: no forced downgrade
    assert chk["current"] == "2.0.0" and chk["current_withdrawn"] and not chk["available"]
    assert running.run(reboot=False)["download"] is None
    st = running.status()
    assert st["booted_version"] == "2.0.0" and st["release_control"]["booted_withdrawn"]
    assert st["release_control"]["withdrawn"] == ["2.0.0"]


def test_a_stage_replaced_by_a_newer_release_is_not_applied(world):
    world.publish("1.0.0")
    world.publish("2.0.0")
    sim, dev = world.device()
    dev.download()
    world.publish("3.0.0")
    with pytest.raises(StageDiscarded, match=r"no longer offers it \(it offers 3.0.0\)"):
        dev.apply(now=True)
    assert_untouched(sim, dev)
    assert dev.install().version == "3.0.0"


def test_withdrawing_the_current_release_offers_it_to_nobody_and_a_publish_does_not_bring_it_back(world):
    world.publish("1.0.0")
    world.publish("2.0.0")
    sim, dev = world.device()
    withdraw(world.storage, world.keys, product=PRODUCT, version="2.0.0", channel="stable")
    chk = dev.check()
    assert chk["version"] == "2.0.0" and chk["withdrawn"] and not chk["available"]
    assert "withdrawn from channel stable" in chk["reason"]
    with pytest.raises(UserError, match="2.0.0 was withdrawn from channel stable"):
        world.publish("2.0.0")
    r = world.publish("3.0.0")  # the withdrawn list carries over
    assert r.changed
    assert Channel.from_bytes(_stored_pointer(world).read_bytes()).withdrawn == ("2.0.0",)
    assert dev.install().version == "3.0.0"


def test_channel_cli_rollout_pause_withdraw_and_a_bad_percentage(world):
    world.publish("1.0.0")
    world.publish("2.0.0", channel="beta")
    base = ["--repo", str(world.repo), "--keys", str(world.keys.dir)]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*ABFLIP, "channel", *args, *base], capture_output=True, text=True, timeout=120)

    p = cli("promote", PRODUCT, "2.0.0", "--to", "stable", "--rollout", "101")
    assert p.returncode == 2 and p.stderr.startswith("error (user): rollout.percent=101"), p.stderr
    assert "Traceback" not in p.stderr
    p = cli("promote", PRODUCT, "2.0.0", "--to", "stable", "--rollout", "1")
    assert p.returncode == 0 and "rollout 1 %" in p.stdout, p.stderr
    p = cli("rollout", PRODUCT, "--channel", "stable", "--percent", "10", "--json")
    assert json.loads(p.stdout)["rollout"] == {"percent": 10, "paused": False}
    p = cli("pause", PRODUCT, "--channel", "stable")
    assert p.returncode == 0 and "(paused)" in p.stdout
    p = cli("withdraw", PRODUCT, "2.0.0", "--channel", "stable", "--back-to", "1.0.0")
    assert p.returncode == 0 and "points at 1.0.0; withdrawn: 2.0.0" in p.stdout, p.stderr
    p = cli("rollout", PRODUCT, "--channel", "nope", "--percent", "10")
    assert p.returncode == 2 and "has no channel 'nope'" in p.stderr


# -- rollouts that no publish can widen (issue 21 part 3) ----------------------------------------
def test_a_publish_keeps_the_channels_rollout_and_pause(world):
    world.publish("1.0.0")
    world.publish("2.0.0", channel="beta")
    promote(world.storage, world.keys, product=PRODUCT, version="2.0.0", channel="stable", rollout=Rollout(10))
    r = world.publish("3.0.0")  # to stable, at 10 %: not to the whole fleet
    assert r.changed and r.rollout == {"percent": 10, "paused": False}
    ptr = Channel.from_bytes(_stored_pointer(world).read_bytes())
    assert (str(ptr.version), ptr.rollout) == ("3.0.0", Rollout(10))  # no seed: 3.0.0 draws its own cohort
    _, outs = _ids(0, 1, 10, seed="3.0.0")
    sim, dev = _device(world, "out", outs[0])
    chk = dev.check()
    assert chk["version"] == "3.0.0" and not chk["available"] and chk["rollout"]["percent"] == 10
    assert dev.run(reboot=False)["download"] is None
    assert_untouched(sim, dev)
    set_rollout(world.storage, world.keys, product=PRODUCT, channel="stable", paused=True)
    set_rollout(world.storage, world.keys, product=PRODUCT, channel="stable", percent=30)
    promote(world.storage, world.keys, product=PRODUCT, version="3.0.0", channel="stable",
            rollout=make_rollout(30, paused=True, seed="canary"))
    assert world.publish("3.0.0").changed is False  # re-publishing changes nothing, rollout included
    with pytest.raises(UserError, match="rollout.percent=101"):
        make_rollout(101)
    # an explicit --rollout is the only way a publish widens: 100 % to every device
    p = subprocess.run([*ABFLIP, "publish", str(world.built["2.0.0"]), "--to", str(world.repo), "--keys",
                        str(world.keys.dir), "--channel", "beta", "--rollout", "100", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["rollout"] == {"percent": 100, "paused": False}


def _paused(world, percent: int) -> None:
    """1.0.0 published; 2.0.0 on beta and, at ``percent`` with the seed canary, paused on stable."""
    world.publish("1.0.0")
    world.publish("2.0.0", channel="beta")
    promote(world.storage, world.keys, product=PRODUCT, version="2.0.0", channel="stable",
            rollout=make_rollout(percent, seed="canary"))
    set_rollout(world.storage, world.keys, product=PRODUCT, channel="stable", paused=True)


def test_a_paused_channel_stays_paused_for_the_next_release(world):
    _paused(world, 50)
    world.publish("3.0.0")
    ptr = Channel.from_bytes(_stored_pointer(world).read_bytes())
    assert ptr.rollout == Rollout(50, paused=True, seed="canary")  # a fixed seed stays: the same cohort first
    ins, _ = _ids(1, 0, 50, seed="canary")
    sim, dev = _device(world, "in", ins[0])
    chk = dev.check()
    assert not chk["available"] and "paused at 50 %" in chk["reason"]


def test_withdraw_refuses_a_version_that_was_never_published(world):
    world.publish("1.0.0")
    world.publish("2.0.0")
    before = _stored_pointer(world).read_bytes()
    for version in ("9.9.9", "2.0.1"):
        with pytest.raises(UserError, match=f"{PRODUCT} {version} was never published"):
            withdraw(world.storage, world.keys, product=PRODUCT, version=version, channel="stable")
    assert _stored_pointer(world).read_bytes() == before
    p = subprocess.run([*ABFLIP, "channel", "withdraw", PRODUCT, "7.0.0", "--channel", "stable", "--repo",
                        str(world.repo), "--keys", str(world.keys.dir)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith(f"error (user): {PRODUCT} 7.0.0 was never published"), p.stderr
    r = withdraw(world.storage, world.keys, product=PRODUCT, version="1.0.0+rebuild", channel="stable")
    assert r.withdrawn == ("1.0.0+rebuild",)  # published: build metadata does not make another version
    assert withdraw(world.storage, world.keys, product=PRODUCT, version="1.0.0", channel="stable").changed is False


def test_channel_show_and_list_say_what_each_channel_offers(world):
    _paused(world, 10)
    withdraw(world.storage, world.keys, product=PRODUCT, version="1.0.0", channel="stable")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*ABFLIP, "channel", *args, "--repo", str(world.repo)], capture_output=True, text=True,
                              timeout=120)

    p = cli("list", "--json")
    assert p.returncode == 0, p.stderr
    rows = {c["channel"]: c for c in json.loads(p.stdout)["channels"]}
    assert rows["stable"] == {"product": PRODUCT, "channel": "stable", "version": "2.0.0", "visible": True,
                              "release": f"{PRODUCT}/releases/2.0.0/release.json", "phased": True, "percent": 10,
                              "paused": True, "seed": "canary", "withdrawn": ["1.0.0"]}
    assert rows["beta"]["phased"] is False and rows["beta"]["percent"] == 100 and rows["beta"]["withdrawn"] == []
    p = cli("list")
    assert f"{PRODUCT}/stable  2.0.0  rollout 10 % (paused; seed canary)  withdrawn 1.0.0" in p.stdout.splitlines()
    assert f"{PRODUCT}/beta  2.0.0  every device" in p.stdout.splitlines()
    p = cli("show", PRODUCT, "--channel", "stable")
    assert p.returncode == 0 and "  rollout    10 % (paused; seed canary)" in p.stdout and "withdrawn  1.0.0" in p.stdout
    p = cli("show", PRODUCT, "--channel", "nope")
    assert p.returncode == 2 and "has no channel 'nope'" in p.stderr
    p = cli("show", "other-os")
    assert p.returncode == 2 and "has no product 'other-os'" in p.stderr
    # repo verify prints the rollout state too
    p = subprocess.run([*ABFLIP, "repo", "verify", str(world.repo)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"  {PRODUCT}/stable: 2.0.0  rollout 10 % paused seed canary; withdrawn 1.0.0  ok" in p.stdout.splitlines()
    p = subprocess.run([*ABFLIP, "repo", "verify", str(world.repo), "--json"], capture_output=True, text=True,
                       timeout=120)
    stable = next(c for c in json.loads(p.stdout)["channels"] if c["channel"] == "stable")
    assert stable["rollout"] == {"percent": 10, "paused": True, "seed": "canary"} and stable["withdrawn"] == ["1.0.0"]


def test_publish_keeps_the_rollout_and_withdraw_refuses_the_unpublished_on_either_backend(backend):
    """The part-3 refusals on a folder repository and on moto's S3 server; read back with channel_states."""
    from builder.channels import channel_states

    backend.publish("1.0.0")
    backend.publish("2.0.0", channel="beta")
    promote(backend.storage, backend.keys, product=PRODUCT, version="2.0.0", channel="stable", rollout=Rollout(5))
    set_rollout(backend.storage, backend.keys, product=PRODUCT, channel="stable", paused=True)
    assert backend.publish("3.0.0").rollout == {"percent": 5, "paused": True}
    with pytest.raises(UserError, match=f"{PRODUCT} 4.0.0 was never published"):
        withdraw(backend.storage, backend.keys, product=PRODUCT, version="4.0.0", channel="stable")
    rows = {c["channel"]: c for c in channel_states(backend.storage, PRODUCT)}
    assert (rows["stable"]["version"], rows["stable"]["percent"], rows["stable"]["paused"]) == ("3.0.0", 5, True)
    assert rows["stable"]["withdrawn"] == [] and rows["beta"]["phased"] is False
