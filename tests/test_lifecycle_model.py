"""The lifecycle model checker (issue 20) in CI: every verb, boot, power cut inside a verb and
repository change, breadth-first from a provisioned device, every invariant at every state
(tests/model/checker.py). A deeper run: ``python -m tests.model --depth 6 --cut-depth 3``."""

from __future__ import annotations

import pytest

from model.checker import explore
from model.world import build_releases

DEPTH, CUT_DEPTH, RECOVERY = 5, 2, 1


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    return build_releases(tmp_path_factory.mktemp("model-releases"))


def test_every_state_the_lifecycle_reaches_keeps_the_invariants(releases, capsys):
    c = explore(releases, depth=DEPTH, cut_depth=CUT_DEPTH, recovery=RECOVERY)
    with capsys.disabled():
        print(f"\nlifecycle model: {c.states} states, {c.transitions} transitions (depth {DEPTH}, power cuts inside "
              f"the verbs of the first {CUT_DEPTH} levels: {c.by_event['cut']}), {len(c.violations)} violations")
    assert c.states > 1000 and c.by_event["cut"] > 300  # it did explore (not a test that cannot fail)
    assert set(c.by_event) >= {"download", "apply", "install", "run", "boot", "boot-check", "mark-good", "rollback",
                               "provision", "provision-force", "reset-state", "repo:publish", "repo:withdraw",
                               "repo:pause", "repo:narrow", "cut"}
    assert not c.violations, "\n".join(c.violations[:20])


def test_the_checker_finds_a_hole(releases, monkeypatch):
    """Put back hole 1 of issue 20 (provision on a trial blessed it) and the checker must say so."""
    import applier.lifecycle as lifecycle
    import applier.provision as provision

    real_require = lifecycle.require
    monkeypatch.setattr(provision, "require", lambda state, event, slot=None: None)
    monkeypatch.setattr(provision, "move", lambda state, event, to=None, **kw: setattr(state, "state", "idle")
                        or setattr(state, "rollback", None))
    c = explore(releases, depth=4, cuts=False)
    assert any("blessed, though 3.0.0's health check fails" in v for v in c.violations), c.violations[:5]
    assert lifecycle.require is real_require
