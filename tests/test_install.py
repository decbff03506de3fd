"""The device path end to end over real HTTP on 127.0.0.1, and the attacks and faults of
issue 2. Every refusal must leave the device booting what it booted: no new entry for the
inactive slot, and the systemd-boot model still picks slot a."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest

from abflip.httpserver import RepoHandler
from metadata.errors import DeviceError, PolicyError, RepositoryError, TransportError
from helpers import assert_untouched, release_of  # noqa: F401  (re-exported for other tests)


def test_install_update_boot_and_bless(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0")
    result = dev.install()
    assert (result.version, result.slot, result.entry) == ("2.0.0", "b", "abflip-2.0.0-b+3.conf")
    rel = release_of(world, "2.0.0")
    assert result.bytes_downloaded == rel.image.compressed_size
    slot_b = sim.slot_path("b").read_bytes()[: rel.image.size]
    assert hashlib.sha256(slot_b).hexdigest() == rel.image.sha256
    text = (sim.esp / "loader/entries/abflip-2.0.0-b+3.conf").read_text()
    assert "sort-key abflip" in text and "version 2.0.0" in text
    assert "options root=PARTLABEL=root-b abflip.slot=b ro" in text
    assert (sim.esp / "abflip/2.0.0-b/vmlinuz").read_bytes() == (world.built["2.0.0"] / "vmlinuz").read_bytes()
    assert dev.status()["state"] == "pending"

    booted = sim.boot()
    assert (booted.slot, booted.entry) == ("b", "abflip-2.0.0-b+2-1.conf")
    assert dev.status()["state"] == "trial"
    status = dev.mark_good()
    assert status["state"] == "committed" and status["floor"] == "2.0.0"
    assert "abflip-2.0.0-b.conf" in sim.entries()
    assert sim.boot().entry == "abflip-2.0.0-b.conf"
    # idempotent
    assert dev.mark_good()["state"] == "committed"


def test_install_twice_is_idempotent(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0")
    dev.install()
    again = dev.install()
    assert again.already and again.bytes_downloaded == 0
    assert sim.entries().count("abflip-2.0.0-b+3.conf") == 1


def test_unblessed_update_rolls_back_after_tries(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0")
    dev.install()
    for _ in range(3):  # the new image "crashes" before mark-good each time
        assert sim.boot().slot == "b"
    outcome = sim.boot()
    assert outcome.slot == "a"  # tries exhausted: systemd-boot falls back by itself
    status = dev.status()
    assert status["state"] == "rolled-back" and status["failed_versions"] == ["2.0.0"]
    with pytest.raises(PolicyError, match="rolled back on this device before"):
        dev.install()


def test_tampered_chunk_is_refused_before_decompression(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0")
    rel = release_of(world, "2.0.0")
    obj = world.object(rel.image.target)
    data = bytearray(obj.read_bytes())
    third = rel.image.chunks[2]
    data[third.offset + third.length // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    # a stale entry for slot b must go before the first byte is written (invariant 2)
    (sim.esp / "loader/entries/abflip-0.9.0-b.conf").write_text("title old\nsort-key abflip\nversion 0.9.0\n"
                                                                 "linux /x\noptions abflip.slot=b\n")
    with pytest.raises(RepositoryError, match="chunk 2 .*failed verification"):
        dev.install()
    assert_untouched(sim, dev)
    st = dev.status()
    assert st["state"] == "downloading" and st["target"]["chunks_done"] == 2
    assert st["last_error"]["blame"] == "repository"
    # nothing of the tampered chunk reached the slot
    tail = sim.slot_path("b").read_bytes()[third.out_offset: third.out_offset + third.out_length]
    assert tail == bytes(len(tail))


def test_truncated_image_is_refused(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0")
    rel = release_of(world, "2.0.0")
    obj = world.object(rel.image.target)
    obj.write_bytes(obj.read_bytes()[: rel.image.compressed_size - 1000])
    with pytest.raises(RepositoryError, match="ended before chunk"):
        dev.install()
    assert_untouched(sim, dev)


def test_release_json_not_matching_targets_metadata(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0")
    obj = world.object("demo-os/releases/2.0.0/release.json")
    manifest = json.loads(obj.read_bytes())
    manifest["compatible"].append("attacker-board")
    obj.write_bytes(json.dumps(manifest).encode())
    with pytest.raises(RepositoryError, match="does not match the signed targets metadata"):
        dev.install()
    assert_untouched(sim, dev)


def test_wrong_hardware_is_refused(world):
    world.publish("1.0.0")
    sim, dev = world.device(hardware_id="other-board")
    world.publish("2.0.0")
    with pytest.raises(PolicyError, match="not compatible with this hardware"):
        dev.install()
    assert_untouched(sim, dev)


@pytest.mark.parametrize("offered", ["1.0.0", "2.0.0"])
def test_version_not_newer_is_refused(world, offered):
    world.publish(offered)
    sim, dev = world.device(booted_version="2.0.0")
    with pytest.raises(PolicyError, match="not newer"):
        dev.install()
    assert_untouched(sim, dev)
    if offered == "1.0.0":  # an explicit downgrade is allowed
        assert dev.install(allow_downgrade=True).version == "1.0.0"


def test_expired_timestamp_is_refused(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0", now=datetime.now(timezone.utc) - timedelta(days=3))
    with pytest.raises(RepositoryError, match="timestamp.json is expired"):
        dev.install()
    assert_untouched(sim, dev)


def test_image_larger_than_slot_is_refused(world):
    world.publish("1.0.0")
    rel = release_of(world, "2.0.0")
    sim, dev = world.device(slot_size=rel.image.size - 4096)
    world.publish("2.0.0")
    with pytest.raises(DeviceError, match="holds only"):
        dev.install()
    assert_untouched(sim, dev)


def test_unknown_booted_slot_refuses_to_write(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.publish("2.0.0")
    sim.cmdline.write_text("ro quiet\n")
    for p in sim.efivars.iterdir():
        p.unlink()
    before = sim.slot_path("b").read_bytes()
    with pytest.raises(DeviceError, match="cannot tell which slot is booted"):
        dev.install()
    assert sim.slot_path("b").read_bytes() == before


class _DropOnce(RepoHandler):
    """Cuts the image response short once, mid-body (a dropped connection)."""

    dropped = 0

    def send_bytes(self, data, start, end):
        if self.path.endswith(".zst") and _DropOnce.dropped == 0:
            _DropOnce.dropped += 1
            self.wfile.write(bytes(memoryview(data)[start:start + (end - start) // 2]))
            self.wfile.flush()
            self.connection.close()
            return
        RepoHandler.send_bytes(self, data, start, end)


class _IgnoreRange(RepoHandler):
    honour_range = False


class _Refuse(RepoHandler):
    def send_bytes(self, data, start, end):
        if self.path.endswith(".zst"):
            self.connection.close()
            return
        RepoHandler.send_bytes(self, data, start, end)


def test_dropped_connection_is_retried_with_a_range(world):
    world.publish("1.0.0")
    sim, dev = world.device(retries=2)
    world.publish("2.0.0")
    _DropOnce.dropped = 0
    world.handler = _DropOnce
    result = dev.install()
    assert _DropOnce.dropped == 1
    rel = release_of(world, "2.0.0")
    assert rel.image.compressed_size < result.bytes_downloaded < 2 * rel.image.compressed_size
    assert sim.boot().slot == "b"


def test_rerun_after_transport_failure_resumes_at_last_chunk(world):
    world.publish("1.0.0")
    sim, dev = world.device(retries=0)
    world.publish("2.0.0")
    rel = release_of(world, "2.0.0")
    world.handler = _DropOnce
    _DropOnce.dropped = 0
    with pytest.raises(TransportError):
        dev.install()
    done = dev.status()["target"]["chunks_done"]
    assert 0 < done < len(rel.image.chunks)
    assert_untouched(sim, dev)
    world.handler = _IgnoreRange  # and the server now ignores Range: the device skips what it has
    result = dev.install()
    assert result.resumed_at_chunk == done
    assert result.bytes_downloaded == rel.image.compressed_size - rel.image.chunks[done].offset
    assert hashlib.sha256(sim.slot_path("b").read_bytes()[: rel.image.size]).hexdigest() == rel.image.sha256


def test_server_down_is_a_transport_error(world):
    world.publish("1.0.0")
    sim, dev = world.device(retries=0)
    world.publish("2.0.0")
    world.handler = _Refuse
    with pytest.raises(TransportError):
        dev.install()
    assert_untouched(sim, dev)


class _Trickle(RepoHandler):
    """Sends timestamp.json one byte at a time, slowly: a slow-retrieval attack."""

    def send_bytes(self, data, start, end):
        if self.path.endswith("timestamp.json"):
            import time
            for i in range(start, end):
                self.wfile.write(bytes(memoryview(data)[i:i + 1]))
                self.wfile.flush()
                time.sleep(0.2)
            return
        RepoHandler.send_bytes(self, data, start, end)


def test_slow_metadata_gives_up_at_the_configured_deadline(world):
    import time

    world.publish("1.0.0")
    sim, dev = world.device(retries=0)
    world.publish("2.0.0")
    text = sim.config_path.read_text().replace("[network]\n", "[network]\ndeadline = 1.5\n")
    sim.config_path.write_text(text)
    from applier.agent import Device

    dev = Device(sim.config)
    world.handler = _Trickle
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="too slow"):
        dev.install()
    assert time.monotonic() - t0 < 10
    assert_untouched(sim, dev)
