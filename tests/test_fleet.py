"""A small fleet through the cache (issue 24): bench/fleet.py with 50 devices, for correctness only
(the bench's numbers are for bench runs): every rollout step reaches exactly the devices whose
buckets it covers, nobody starts the withdrawn release, those running it keep it, no check fails,
and an idle check costs what bench/device.py says (the timestamp, ~370 bytes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cdn import NGINX

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_fifty_devices_through_the_cache(tmp_path, capsys):
    if NGINX is None:
        pytest.fail("nginx is missing: apt-get install nginx (.ci/run installs it)")
    import fleet

    summary = fleet.run(50, 2, 4.0, 64, tmp_path)
    assert not summary["problems"], summary["problems"]
    steps = {r["step"]: r for r in summary["steps"][1:-1]}
    for name, version, percent in (("2.0.0 at 1 %", "2.0.0", 1), ("2.0.0 at 10 %", "2.0.0", 10),
                                   ("2.0.0 at 100 %", "2.0.0", 100), ("2.1.0 at 10 %", "2.1.0", 10)):
        assert steps[name]["reached"] == fleet.expected_in(50, version, percent), (name, steps[name])
    assert steps["2.0.0 at 100 %"]["versions"] == {"2.0.0": 50}
    took = steps["2.1.0 at 10 %"]["versions"]["2.1.0"]
    assert took > 0  # the 10 % of 2.1.0 took it, and keep running it after the withdrawal
    assert summary["steps"][-1]["versions"] == {"2.0.0": 50 - took, "2.1.0": took}
    assert not any(r["started"].get("2.1.0") for r in summary["steps"][6:])
    assert all(r["checks"] == 50 for r in summary["steps"])
    assert 300 <= summary["idle_bytes"] <= 450, summary["idle_bytes"]
    assert summary["image_bytes"] >= 64 << 10
    assert summary["hit_ratio"] > 0.5  # 50 devices at a max-age of 1 s: the cache still answers most
    line = fleet.render(summary).splitlines()[-1]
    assert line.startswith("fleet: 50 devices, origin ") and " req/check, hit " in line and line.endswith(" bytes")
