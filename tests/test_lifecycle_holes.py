"""Each hole issue 20 found in the implicit lifecycle, as an attack story on a simulated device
over real HTTP and TUF: what an operator or a hostile release did, and what the device does now."""

from __future__ import annotations

from pathlib import Path

import pytest

from applier.lifecycle import RULES, Event, Phase, markdown
from builder.channels import set_rollout, withdraw
from abflip.demo import PRODUCT
from metadata.errors import PolicyError, UserError

from test_agent_lifecycle import agent

REPO = Path(__file__).resolve().parents[1]


def on_trial(world, version="2.0.0", *, failing_health=False):
    """Slot a on 1.0.0 (provisioned, blessed), ``version`` installed into slot b and booted on trial."""
    world.publish("1.0.0")
    sim, dev = agent(world)
    if failing_health:
        sim.add_hook("health-check", "10-app", "echo app down; exit 1")
    world.publish(version)
    dev.install()
    assert sim.boot().slot == "b"
    return sim, dev


def test_provision_while_a_failing_update_is_on_trial_is_refused_and_changes_nothing(world):
    """Hole 1: provision (no --force) during the trial of a bad 2.0.0 blessed it and raised the floor."""
    sim, dev = on_trial(world, failing_health=True)
    before = sorted(sim.entries())
    for force in (False, True):
        with pytest.raises(PolicyError, match="slot b is on trial.*would bless an image nobody judged"):
            dev.provision(world.built["2.0.0"], force=force)
    st = dev.status()
    assert sorted(sim.entries()) == before and any("+" in e for e in before)
    assert (st["state"], st["floor"], st["slots"]["a"]["status"]) == ("trial", None, "good")
    with pytest.raises(Exception, match="app down"):
        dev.boot_check()  # the health unit judges it, as it should
    assert sim.boot().slot == "a"


def test_provision_force_while_an_update_is_pending_drops_its_counting_entry(world):
    """Hole 2: provision --force while 2.0.0 was pending left abflip-2.0.0-b+3.conf counting with state idle."""
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.install()
    assert "abflip-2.0.0-b+3.conf" in sim.entries()
    r = dev.provision(world.built["1.0.0"], force=True)
    assert "abflip-2.0.0-b+3.conf" in r["removed_entries"]
    assert sim.entries() == ["abflip-1.0.0-a.conf"]
    st = dev.status()
    assert (st["state"], st["pending_entry"], st["slots"]["b"]["status"], st["floor"]) == ("idle", None, "unknown",
                                                                                         "1.0.0")
    assert sim.boot().slot == "a"


def test_a_release_withdrawn_after_apply_is_cancelled_by_the_timer_not_booted(world):
    """Hole 3: withdrawn between apply and the reboot: run rebooted into it and boot-check committed it."""
    world.publish("1.0.0")
    sim, dev = agent(world, windows=[])
    world.publish("2.0.0")
    dev.install()
    withdraw(world.storage, world.keys, product=PRODUCT, version="2.0.0", channel="stable", back_to="1.0.0")
    chk = dev.check()
    assert "cancels the pending 2.0.0" in chk["next"] and "withdrawn" in chk["next"]
    r = dev.run()
    assert not r["rebooted"] and dev.reboots == [] and "pending 2.0.0 was cancelled" in r["discarded"]
    st = dev.status()
    assert (st["state"], st["pending_entry"], st["floor"], st["target"]) == ("idle", None, None, None)
    assert sim.entries() == ["abflip-1.0.0-a.conf"] and sim.boot().slot == "a"


def test_a_trial_withdrawn_before_its_boot_is_rolled_back_not_committed(world):
    """Hole 3, the other order: the check saw the withdrawal, then the device rebooted anyway
    (a power cut, an operator's reboot): boot-check does not bless it."""
    sim, dev = on_trial(world)
    withdraw(world.storage, world.keys, product=PRODUCT, version="2.0.0", channel="stable", back_to="1.0.0")
    assert "rolls 2.0.0 back" in dev.check()["next"]
    with pytest.raises(Exception, match="2.0.0 was withdrawn from channel stable before this boot.*slot a .1.0.0. "
                                        "boots next"):
        dev.boot_check()
    assert dev.reboots == [1] and sim.boot().slot == "a"
    st = dev.boot_check()
    assert (st["state"], st["floor"], st["failed_versions"]) == ("rolled-back", None, ["2.0.0"])


def test_discarding_a_withdrawn_stage_after_a_rollback_stays_rolled_back(world):
    """Hole 4: on a rolled-back device, apply discarding a withdrawn stage said committed while it
    runs 1.0.0 under floor 2.0.0; the check before it did not say the stage would go."""
    world.publish("1.0.0")
    sim, dev = agent(world, windows=[])
    world.publish("2.0.0")
    dev.install()
    sim.boot()
    dev.boot_check()  # 2.0.0 committed: floor 2.0.0
    dev.rollback()
    sim.boot()
    assert dev.boot_check()["state"] == "rolled-back"
    world.publish("3.0.0")
    dev.download()
    withdraw(world.storage, world.keys, product=PRODUCT, version="3.0.0", channel="stable", back_to="2.0.0")
    chk = dev.check()
    assert "the next apply discards the staged 3.0.0 (3.0.0 was withdrawn from channel stable)" == chk["next"]
    st = dev.status()
    assert "discards the staged 3.0.0" in st["next"]
    r = dev.run()
    assert "3.0.0 was withdrawn" in r["discarded"]
    st = dev.status()
    assert (st["state"], st["booted_version"], st["floor"]) == ("rolled-back", "1.0.0", "2.0.0")


def test_reset_state_on_a_valid_state_file_refuses_and_keeps_everything(world):
    """Hole 5: reset-state on a valid file forgot the floor, the failed versions and a staged slot."""
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.download()
    before = (sim.state_dir / "state.json").read_bytes()
    with pytest.raises(UserError, match="the state file is valid .state staged, floor none.: there is nothing to "
                                        "rebuild; nothing was changed"):
        dev.reset_state()
    assert (sim.state_dir / "state.json").read_bytes() == before
    assert dev.status()["last_error"] is None  # a refusal of an interactive verb is not the device's error


def test_reset_state_of_an_invalid_file_keeps_its_floor_and_failed_versions(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    import json

    p = sim.state_dir / "state.json"
    d = json.loads(p.read_text())
    d.update(floor="1.5.0", failed_versions=["1.6.0", "not a version"], state="bogus")
    p.write_text(json.dumps(d))
    st = dev.status()
    assert st["state_invalid"] and st["floor"] == "1.5.0" and st["failed_versions"] == ["1.6.0"]
    r = dev.reset_state()
    assert (r["action"], r["floor"], r["failed_versions"]) == ("rebuilt", "1.5.0", ["1.6.0"])
    assert (sim.state_dir / "state.json.invalid").exists()


def test_after_a_manual_rollback_check_gives_true_reasons(world):
    """Hole 7: after rolling back a committed 2.0.0, check said 2.0.0 is "not newer than 2.0.0,
    the version this device runs" (it runs 1.0.0) and, with --allow-downgrade, that it "failed to boot"."""
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    dev.install()
    sim.boot()
    dev.boot_check()
    dev.rollback()
    sim.boot()
    dev.boot_check()
    chk = dev.check()
    assert chk["current"] == "1.0.0"
    assert chk["reason"] == ("2.0.0 is not newer than 2.0.0, the highest version this device committed (it runs 1.0.0 "
                             "since a rollback; the floor stays)")
    chk = dev.check(allow_downgrade=True)
    assert "was rolled back on this device before" in chk["reason"] and "failed to boot" not in chk["reason"]


def test_check_and_status_say_what_happens_next(world):
    world.publish("1.0.0")
    sim, dev = agent(world, windows=[])
    assert dev.status()["next"] == "nothing to do until the channel offers a release this device takes"
    world.publish("2.0.0")
    assert dev.check()["next"] == "the next run downloads 2.0.0"
    dev.download()
    assert dev.status()["next"] == "2.0.0 is staged in slot b: applied in the next maintenance window"
    world.publish("3.0.0")
    assert dev.check()["next"] == ("the next apply discards the staged 2.0.0 (channel stable no longer offers it "
                                   "(it offers 3.0.0))")
    dev.install()
    assert dev.status()["next"] == "a reboot tries 3.0.0 in slot b with 3 tries"
    sim.boot()
    assert dev.status()["next"] == ("boot-check judges 3.0.0 (on trial, 2 more tries): health hooks, then bless or "
                                    "roll back")
    st = dev.boot_check()
    assert (st["action"], st["message"]) == ("committed", "blessed 3.0.0 in slot b: committed (floor 3.0.0)")
    st = dev.rollback()
    assert st["next"] == "the next boot starts slot a (1.0.0): a rollback of 3.0.0 was requested"


def test_a_paused_rollout_does_not_start_a_release(world):
    world.publish("1.0.0")
    sim, dev = agent(world)
    world.publish("2.0.0")
    set_rollout(world.storage, world.keys, product=PRODUCT, channel="stable", paused=True)
    chk = dev.check()
    assert not chk["available"] and "paused" in chk["reason"]
    assert chk["next"] == "nothing to do until the channel offers a release this device takes"


def test_an_unreadable_state_file_says_run_as_root(world, monkeypatch):
    """Hole 6: status as non-root said the state file was invalid and showed a rebuilt picture.
    The CLI refuses such a user up front (abflip.commands._device.require_access, tests/test_daily_use.py);
    below it, a library caller is told the same, never that the file is invalid."""
    world.publish("1.0.0")
    sim, dev = agent(world)
    import applier.state

    def deny(path, limit):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(applier.state, "read_file", deny)
    from metadata.errors import DeviceError

    with pytest.raises(DeviceError, match="permission denied") as e:
        dev.status()
    assert "run abflip as root" in e.value.hint


def test_the_table_is_total_and_the_docs_show_it():
    """Every verb's event has a rule or a refusal in every phase, and docs/architecture.md shows
    the table generated from the code."""
    from applier.lifecycle import REFUSALS, VERBS, rule

    for e in VERBS:
        for p in Phase:
            assert rule(p, e) is not None or (p, e) in REFUSALS, (p, e)
    assert {r.event for r in RULES} == set(Event)
    docs = (REPO / "docs" / "architecture.md").read_text()
    assert markdown() in docs, "regenerate the table: python -m applier.lifecycle"
