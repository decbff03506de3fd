"""An idle check costs only TUF's own metadata: the channel pointer and the manifest are kept
in ``<state_dir>/offer/`` and re-used while the signed targets metadata says they did not
change (verified by length and hashes every time, so a damaged copy is fetched again)."""

from __future__ import annotations

from abflip.httpserver import RepoHandler


class _Counting(RepoHandler):
    sent: list[tuple[str, int]] = []

    def send_bytes(self, data, start, end):
        _Counting.sent.append((self.path, end - start))
        RepoHandler.send_bytes(self, data, start, end)


def _targets(sent):
    return [p for p, _ in sent if "/targets/" in p]


def test_idle_check_fetches_no_targets_and_a_damaged_copy_is_fetched_again(world):
    world.publish("1.0.0")
    sim, dev = world.device()
    world.handler = _Counting
    _Counting.sent = []
    assert dev.check()["available"] is False
    first = list(_Counting.sent)
    assert any(p.endswith("stable.json") for p in _targets(first))
    _Counting.sent = []
    assert dev.check()["available"] is False
    assert _targets(_Counting.sent) == []  # pointer and manifest from the verified cache
    assert all(p.endswith("timestamp.json") for p, _ in _Counting.sent)
    idle_bytes = sum(n for _, n in _Counting.sent)
    assert idle_bytes <= 1024, _Counting.sent  # issue 14: at most 1 KB per idle check
    # a copy damaged on disk does not verify: fetched again, and the answer is the same
    (sim.state_dir / "offer" / "release.json").write_bytes(b"{}")
    _Counting.sent = []
    assert dev.check()["version"] == "1.0.0"
    assert any(p.endswith("release.json") for p in _targets(_Counting.sent))
    # a new release: the new pointer and manifest are fetched
    world.publish("2.0.0")
    _Counting.sent = []
    chk = dev.check()
    assert chk["available"] and chk["version"] == "2.0.0"
    assert any(p.endswith("stable.json") for p in _targets(_Counting.sent))
