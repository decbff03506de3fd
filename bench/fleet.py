#!/usr/bin/env python3
"""Benchmark: what a fleet costs the origin behind a cache (issue 24).

    python3 bench/fleet.py [--devices 10000] [--workers 2] [--period 90] [--image-kib 1024] [--workdir DIR]

``--devices`` simulated devices, split over ``--workers`` processes, check for updates through nginx
(``ci/nginx-cdn.conf``, as docs/producer.md recommends) in front of the origin (``abflip serve``'s
handler over a repository directory, in this process, counting what it serves). A device here has
its own id (``device.id_file``), its own state directory with its own TUF metadata, and no slots:
each check is the applier's own code (``applier.offer.Offer.fetch``: the TUF refresh, the channel pointer and
the release manifest, verified and cached; ``applier.rollout.decide``; ``applier.policy``), and an
update fetches the image the way ``abflip download`` does (one ranged GET from the first byte, each
chunk verified against the signed manifest as it arrives) but writes nothing. The workers share a
fetcher each (one kept-alive connection to the cache), as devices behind one link would.

Time is compressed: a device's hourly check (``systemd/abflip.timer``) comes every ``--period``
seconds, and the origin's max-age for ``timestamp.json`` and 404s (``MAX_AGE``, 300 s of 3600)
shrinks by the same factor, so the origin sees what it would in real time. Each period starts
with the release engineer's step (the change visible through the cache after one max-age; the
devices wait that long, then check once each, spread over the rest of the period):

  0. first contact: every device fetches the whole TUF chain once (not counted as idle)
  1. idle: the channel points at 1.0.0, which every device runs
  2. 2.0.0 promoted at 1 %;  3. widened to 10 %;  4. to 100 %
  5. 2.1.0 promoted at 10 %;  6. 2.1.0 withdrawn back to 2.0.0;  7. idle again

It prints, per step, the devices that checked, the rollout's expected and reached fraction (the
expected one from the devices' buckets, ``applier.rollout.bucket``), origin requests and bytes per
device-check and the cache's hit ratio; then bytes per device per idle check, per check after a
change that did not concern the device, and per update (metadata, and the image); last line:

    fleet: D devices, origin Q req/check, hit H%, idle B bytes, update U bytes

(U: the metadata an update costs a device, as bench/device.py's "bytes per update"; the image comes
on top and is printed above). It asserts nothing about speed; ``--check`` makes it exit 1 unless
every step reached exactly its expected devices, no device started the withdrawn release and no
check failed (tests/test_fleet.py checks that, and more, on 50 devices). Results: README, "Fleet".
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/cdn.py: nginx with ci/nginx-cdn.conf
sys.path.insert(0, str(ROOT / "bench"))

from abflip.demo import HARDWARE, PRODUCT  # noqa: E402
from abflip.httpserver import RepoHandler, Server  # noqa: E402
from builder.channels import make_rollout, promote, set_rollout, withdraw  # noqa: E402
from builder.publish import MAX_AGE, publish_release  # noqa: E402
from builder.release import create_release  # noqa: E402
from device import delegated_repository  # noqa: E402  (bench/device.py)
from metadata.repository import DEFAULT_BIN_BITS  # noqa: E402

EPOCH = 1700000000
HOUR = 3600  # the device timer's interval, simulated
CHANNEL = "stable"
#: (name, what the release engineer does at the start of the step, the version the step rolls out)
STEPS = [
    ("first contact", None, None),
    ("idle", None, None),
    ("2.0.0 at 1 %", ("promote", "2.0.0", 1), "2.0.0"),
    ("2.0.0 at 10 %", ("rollout", "2.0.0", 10), "2.0.0"),
    ("2.0.0 at 100 %", ("rollout", "2.0.0", 100), "2.0.0"),
    ("2.1.0 at 10 %", ("promote", "2.1.0", 10), "2.1.0"),
    ("2.1.0 withdrawn", ("withdraw", "2.1.0", "2.0.0"), None),
    ("idle", None, None),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def device_id(i: int) -> str:
    return f"fleet-device-{i:06d}"


# -- the origin --------------------------------------------------------------------------------
class Origin(RepoHandler):
    """``abflip serve``'s handler, counting requests and body bytes (the origin's load)."""

    served: list[tuple[float, str, int]] = []

    def do_GET(self, head: bool = False) -> None:
        Origin.served.append((time.time(), self.path, 0))
        super().do_GET(head)

    def send_bytes(self, data, start: int, end: int) -> None:
        t, path, _ = Origin.served[-1]
        Origin.served[-1] = (t, path, end - start)
        RepoHandler.send_bytes(self, data, start, end)


# -- the repository and its releases -------------------------------------------------------------
class Producer:
    """A repository with the product delegated to its own key (16 hash bins, the default), keys that
    publish all the way (one operator), and releases 1.0.0, 2.0.0, 2.1.0 of a small image."""

    def __init__(self, work: Path, image_kib: int) -> None:
        self.work = work
        self.repo = work / "repo"
        self.storage, self.keys = delegated_repository(self.repo, work / "keys", DEFAULT_BIN_BITS)
        src = work / "src"
        src.mkdir()
        (src / "vmlinuz").write_bytes(b"kernel " * 500)
        self.releases = {}
        for n, version in enumerate(("1.0.0", "2.0.0", "2.1.0")):
            img = src / f"{version}.img"
            img.write_bytes(os.urandom(image_kib << 10))  # incompressible: the image is what is sent
            out = src / f"release-{version}"
            create_release(img, out, product=PRODUCT, version=version, compatible=[HARDWARE],
                           kernel=src / "vmlinuz", level=1, chunk_size=256 << 10, window=0, piece_size=64 << 10,
                           created=EPOCH + n)
            self.releases[version] = out
        publish_release(self.releases["1.0.0"], self.storage, self.keys, channel=CHANNEL)
        for version in ("2.0.0", "2.1.0"):
            publish_release(self.releases[version], self.storage, self.keys, channel="beta")

    @property
    def root(self) -> Path:
        return self.repo / "metadata" / "1.root.json"

    def step(self, action: tuple | None) -> None:
        if action is None:
            return
        kind, version, arg = action
        if kind == "promote":
            promote(self.storage, self.keys, product=PRODUCT, version=version, channel=CHANNEL,
                    rollout=make_rollout(arg))
        elif kind == "rollout":
            set_rollout(self.storage, self.keys, product=PRODUCT, channel=CHANNEL, percent=arg)
        elif kind == "withdraw":
            withdraw(self.storage, self.keys, product=PRODUCT, version=version, channel=CHANNEL, back_to=arg)


def expected_in(devices: int, version: str, percent: int) -> int:
    """How many of the fleet's devices the rollout of ``version`` at ``percent`` takes (their buckets)."""
    from applier.rollout import BUCKETS, bucket

    return sum(1 for i in range(devices) if bucket(device_id(i), PRODUCT, version) < percent * (BUCKETS // 100))


# -- the devices --------------------------------------------------------------------------------
@dataclass
class Tally:
    """What one worker's devices did in one step."""

    checks: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    idle: list[int] = field(default_factory=list)  # bytes of checks that fetched nothing but timestamp.json
    changed: list[int] = field(default_factory=list)  # bytes of checks that found new metadata, no update
    updates: list[tuple[int, int]] = field(default_factory=list)  # (metadata bytes, image bytes)
    started: collections.Counter = field(default_factory=collections.Counter)  # version -> updates begun
    versions: collections.Counter = field(default_factory=collections.Counter)  # at the end of the step
    late: float = 0.0  # seconds the worker ran behind its schedule, at most


def _counting_fetcher():
    from applier.fetch import HttpFetcher

    class Counting(HttpFetcher):
        """The applier's fetcher, counting what one check fetched (body bytes, and which files)."""

        def reset(self) -> None:
            self.bytes = 0
            self.files: list[str] = []

        def _fetch(self, url: str):
            self.files.append(url.rsplit("/", 1)[-1])
            return self._count(super()._fetch(url))

        def _count(self, pieces):
            for data in pieces:
                self.bytes += len(data)
                yield data

    f = Counting(timeout=60.0, deadline=120.0)
    f.reset()
    return f


def _worker(first: int, count: int, spec: dict, out: multiprocessing.Queue, starts) -> None:
    """Devices ``first`` .. ``first + count - 1``: their first contact at once, then each step once
    its change is made (``starts[step]``, wall clock), their checks spread over the step's period;
    a Tally per step. A step lasts longer than ``period`` when the workers cannot keep up."""
    from applier.agent import Device
    from applier.config import Config
    from applier.policy import check_offered, check_release
    from applier.release_control import read_device_id
    from applier.rollout import decide
    from applier.stream import verify_chunk
    from metadata.errors import Error, PolicyError
    from metadata.version import Version

    fetcher = _counting_fetcher()
    base = Path(spec["work"]) / "devices"
    devices = []
    for i in range(first, first + count):
        d = base / f"{i:06d}"
        (d / "esp").mkdir(parents=True, exist_ok=True)
        (d / "id").write_text(device_id(i) + "\n")
        cfg = Config(path=d / "abflip.toml", repository_url=spec["url"], trusted_root=Path(spec["root"]),
                     product=PRODUCT, channel=CHANNEL, hardware_id=HARDWARE, slots={}, esp=d / "esp",
                     state_dir=d / "state", id_file=d / "id")
        devices.append([Device(cfg, fetcher=fetcher), Version.parse("1.0.0")])

    def check(dev: Device, current: Version, tally: Tally) -> Version:
        fetcher.reset()
        offer = dev.offer(dev.session())
        offered = offer.fetch()  # the applier's own: TUF refresh, pointer, manifest
        client, channel, release = offer.client, offered.channel, offered.release
        ident, why = read_device_id(dev.config.id_file)
        decision = decide(channel.rollout, product=release.product, version=str(release.version), device_id=ident,
                          device_id_error=why)
        try:
            check_release(release, channel, product=PRODUCT, hardware_id=HARDWARE, floor=current, failed_versions=[])
            check_offered(channel, release, decision)
        except PolicyError:
            idle = all(f == "timestamp.json" or f.endswith(".root.json") for f in fetcher.files)
            (tally.idle if idle else tally.changed).append(fetcher.bytes)
            return current
        metadata = fetcher.bytes
        tally.started[str(release.version)] += 1
        image = release.image
        url = client.target_url(client.target_info(image.target))
        stream = fetcher.open_range(url, 0, image.compressed_size)  # as abflip download asks for it
        got = 0
        for i, chunk in enumerate(image.chunks):
            data = bytearray()
            while len(data) < chunk.length:
                piece = stream.read(chunk.length - len(data))
                if not piece:
                    raise RuntimeError(f"the image ended at {got + len(data)} bytes")
                data += piece
            verify_chunk(i, chunk, data, image.compression.piece_size)
            got += len(data)
        tally.updates.append((metadata, got))
        return release.version

    def one(entry: list, tally: Tally) -> None:
        try:
            entry[1] = check(entry[0], entry[1], tally)
        except Error as e:
            tally.errors[f"{type(e).__name__}: {e.message}"[:200]] += 1
        tally.checks += 1

    first_contact = Tally()
    for entry in devices:  # step 0, as fast as it goes: every device fetches the whole TUF chain once
        one(entry, first_contact)
    first_contact.versions = collections.Counter(str(v) for _, v in devices)
    out.put((0, first, first_contact))
    period, settle, steps = spec["period"], spec["settle"], spec["steps"]
    for step in range(1, steps):
        while starts[step] == 0:  # the release engineer's step is done; the cache has it after `settle`
            time.sleep(0.05)
        tally = Tally()
        begin = starts[step] + settle
        spread = period - settle - 0.5
        for k, entry in enumerate(devices):
            due = begin + spread * k / len(devices)
            now = time.time()
            if now < due:
                time.sleep(due - now)
            else:
                tally.late = max(tally.late, now - due)
            one(entry, tally)
        tally.versions = collections.Counter(str(v) for _, v in devices)
        out.put((step, first, tally))


# -- the run ------------------------------------------------------------------------------------
def run(devices: int, workers: int, period: float, image_kib: int, work: Path, nginx_workers: int = 1) -> dict:
    from cdn import Nginx

    max_age = max(1, round(MAX_AGE * period / HOUR))  # the origin's 300 s, compressed like the hour
    settle = max_age + 1.0  # the step's change is through the cache by then (nginx counts whole seconds)
    log(f"fleet: {devices} devices in {workers} processes, an hour every {period:g} s "
        f"(x{HOUR / period:.0f}), the origin's max-age {max_age} s")
    producer = Producer(work, image_kib)
    Origin.max_age = max_age
    Origin.served = []
    server = Server(producer.repo, handler=Origin, max_connections=256).__enter__()
    nginx = Nginx(work / "nginx", server.url, workers=nginx_workers)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    starts = ctx.Array("d", len(STEPS))
    spec = {"work": str(work), "url": nginx.url, "root": str(producer.root), "period": period, "settle": settle,
            "steps": len(STEPS)}
    per = -(-devices // workers)
    procs = [ctx.Process(target=_worker, args=(w * per, min(per, devices - w * per), spec, out, starts), daemon=True)
             for w in range(workers) if w * per < devices]
    for p in procs:
        p.start()
    results: dict[int, list[Tally]] = collections.defaultdict(list)

    def collect(step: int) -> None:
        for _ in procs:
            got, _first, tally = out.get(timeout=max(3600, period * 10))
            assert got == step, (got, step)
            results[step].append(tally)

    try:
        log(f"  step 0: {STEPS[0][0]}")
        windows = [(time.time(), 0.0)]
        collect(0)
        windows[0] = (windows[0][0], time.time())
        for step, (name, action, _) in enumerate(STEPS[1:], 1):
            began = time.time()
            producer.step(action)
            starts[step] = time.time()
            log(f"  step {step}: {name}")
            collect(step)
            time.sleep(max(0.0, began + period - time.time()))
            windows.append((began, time.time()))
        for p in procs:
            p.join(60)
        return _report(devices, results, windows, nginx, max_age, period)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        nginx.stop()
        server.__exit__()


def _report(devices: int, results: dict, windows: list[tuple[float, float]], nginx, max_age: int,
            period: float) -> dict:
    served = list(Origin.served)
    looked_up = nginx.entries()
    rows = []
    totals = {"checks": 0, "origin_requests": 0, "origin_bytes": 0}
    lookups: collections.Counter = collections.Counter()
    idle, changed, updates = [], [], []
    problems = []
    for step, (name, action, rolled) in enumerate(STEPS):
        tallies = results[step]
        lo, hi = windows[step]
        checks = sum(t.checks for t in tallies)
        errors = sum((t.errors for t in tallies), collections.Counter())
        versions = sum((t.versions for t in tallies), collections.Counter())
        started = sum((t.started for t in tallies), collections.Counter())
        origin = [b for t, _, b in served if lo <= t < hi]
        cache = collections.Counter(e.cache for e in looked_up if lo <= e.time < hi and e.cache != "-")
        expected = reached = None
        if rolled is not None:
            expected = expected_in(devices, rolled, action[2])
            reached = versions[rolled]
            if reached != expected:
                problems.append(f"step {step} ({name}): {reached} devices run {rolled}, expected {expected}")
        if step >= next(i for i, s in enumerate(STEPS) if s[0] == "2.1.0 withdrawn") and started["2.1.0"]:
            problems.append(f"step {step} ({name}): {started['2.1.0']} devices started the withdrawn 2.1.0")
        if errors:
            problems.append(f"step {step} ({name}): {sum(errors.values())} checks failed: {dict(errors)}")
        if step > 0:  # the first contact (a fleet's first day) is not a check of a running fleet
            totals["checks"] += checks
            totals["origin_requests"] += len(origin)
            totals["origin_bytes"] += sum(origin)
            lookups += cache
            idle += [b for t in tallies for b in t.idle]
            changed += [b for t in tallies for b in t.changed]
            updates += [u for t in tallies for u in t.updates]
        rows.append({"step": name, "checks": checks, "expected": expected, "reached": reached,
                     "versions": dict(versions), "started": dict(started), "origin_requests": len(origin),
                     "origin_bytes": sum(origin), "lookups": sum(cache.values()),
                     "hit": cache["HIT"] / sum(cache.values()) if cache else 1.0,
                     "late_s": max((t.late for t in tallies), default=0.0), "errors": dict(errors)})
    n = max(totals["checks"], 1)
    effective = sum(hi - lo for lo, hi in windows[1:]) / (len(windows) - 1)
    return {
        "devices": devices, "period_s": period, "effective_period_s": effective, "max_age_s": max_age, "steps": rows,
        "checks": totals["checks"],
        "origin_req_per_check": totals["origin_requests"] / n, "origin_bytes_per_check": totals["origin_bytes"] / n,
        "hit_ratio": lookups["HIT"] / sum(lookups.values()) if lookups else 1.0,
        "idle_bytes": sum(idle) / len(idle) if idle else 0, "changed_bytes": sum(changed) / len(changed) if changed else 0,
        "update_bytes": sum(m for m, _ in updates) / len(updates) if updates else 0,
        "image_bytes": sum(i for _, i in updates) / len(updates) if updates else 0,
        "problems": problems,
    }


def render(s: dict) -> str:
    out = ["| step | device checks | rollout expected | reached | origin req/check | origin bytes/check | "
           "cache hit | devices per version |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in s["steps"]:
        c = max(r["checks"], 1)
        exp = "" if r["expected"] is None else f"{r['expected'] / s['devices']:.2%} ({r['expected']})"
        got = "" if r["reached"] is None else f"{r['reached'] / s['devices']:.2%} ({r['reached']})"
        versions = ", ".join(f"{v}: {n}" for v, n in sorted(r["versions"].items()))
        out.append(f"| {r['step']} | {r['checks']:,} | {exp} | {got} | {r['origin_requests'] / c:.4f} | "
                   f"{r['origin_bytes'] / c:,.0f} | {r['hit']:.2%} | {versions} |")
    out.append("")
    out.append(f"per device: idle check {s['idle_bytes']:,.0f} B; check after a change that is not for it "
               f"{s['changed_bytes']:,.0f} B; update {s['update_bytes']:,.0f} B of metadata + {s['image_bytes']:,.0f} B "
               f"of image (from the cache)")
    out.append(f"origin over steps 1-{len(s['steps']) - 1}: {s['origin_req_per_check']:.4f} requests and "
               f"{s['origin_bytes_per_check']:,.0f} bytes per device-check ({s['checks']:,} checks; an hour every "
               f"{s['period_s']:g} s, max-age {s['max_age_s']} s)")
    if s["effective_period_s"] > s["period_s"] * 1.05:
        out.append(f"note: the steps took {s['effective_period_s']:.0f} s, not {s['period_s']:g} (the workers could not "
                   "keep up): fewer checks per max-age than in real time, so the origin's share per check is overstated")
    for p in s["problems"]:
        out.append(f"PROBLEM: {p}")
    out.append(f"fleet: {s['devices']} devices, origin {s['origin_req_per_check']:.4f} req/check, "
               f"hit {s['hit_ratio'] * 100:.2f}%, idle {s['idle_bytes']:.0f} bytes, update {s['update_bytes']:.0f} bytes")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2, help="device processes")
    ap.add_argument("--period", type=float, default=90.0, help="wall seconds for one simulated hour (one check each)")
    ap.add_argument("--image-kib", type=int, default=1024, help="each release's image (incompressible)")
    ap.add_argument("--nginx-workers", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--check", action="store_true", help="exit 1 unless every rollout step reached exactly its "
                    "devices and none started the withdrawn release")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="abflip-bench-fleet-"))
    if work.exists() and any(work.iterdir()):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        summary = run(args.devices, args.workers, args.period, args.image_kib, work, args.nginx_workers)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    print(render(summary), flush=True)
    return 1 if (args.check and summary["problems"]) else 0


if __name__ == "__main__":
    sys.exit(main())
