"""Issue 5 on real firmware (OVMF + systemd-boot 252 under QEMU): the agent's ``boot-check`` commits
a good trial boot, and ``abflip rollback`` of a committed update makes systemd-boot boot the
other slot by renaming the booted entry to ``+0-1`` (tries used up: sorted last)."""

from __future__ import annotations

import pytest

from .test_update_scenarios import ONE_BOOT_TIMEOUT_S, Releases, Rig, _assert_booted, releases, rig  # noqa: F401


@pytest.mark.e2e
def test_rollback_of_a_committed_update_boots_the_old_slot(rig: Rig, releases: Releases) -> None:
    rig.factory_install(releases.v1)
    rig.publish(releases.v2)
    with rig.slots_attached():
        assert rig.device().install().entry == "abflip-2.0.0-b+3.conf"

    first = rig.boot(ONE_BOOT_TIMEOUT_S)
    _assert_booted(first, "2.0.0", "b", "abflip-2.0.0-b+2-1.conf")
    rig.set_booted_from(first)
    with rig.slots_attached():
        status = rig.device().boot_check()
    assert (status["state"], status["floor"], status["booted_entry"]) == ("committed", "2.0.0", "abflip-2.0.0-b.conf")
    assert rig.entries() == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b.conf"]

    with rig.slots_attached():
        status = rig.device().rollback()
    assert status["action"] == "rollback-on-reboot" and status["rollback"]["to_slot"] == "a", status
    assert rig.entries() == ["abflip-1.0.0-a.conf", "abflip-2.0.0-b+0-1.conf"]

    second = rig.boot(ONE_BOOT_TIMEOUT_S)
    _assert_booted(second, "1.0.0", "a", "abflip-1.0.0-a.conf")  # the firmware's own choice
    rig.set_booted_from(second)
    with rig.slots_attached():
        status = rig.device().boot_check()
    assert (status["state"], status["booted_slot"], status["failed_versions"]) == ("rolled-back", "a", ["2.0.0"])
    assert rig.entries() == ["abflip-1.0.0-a.conf"]  # the exhausted entry is pruned
    assert not rig.esp.exists("abflip/2.0.0-b/vmlinuz")
