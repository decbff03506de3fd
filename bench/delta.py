#!/usr/bin/env python3
"""Benchmark: delta updates against full images and ``zstd --patch-from`` (issue 12).

Usage::

    python3 bench/delta.py [--tier small|large] [--runs 3] [--link-mbps 20] [--no-patch-from] [--workdir DIR]

A benchmark, not a test: it measures and prints, and exits non-zero only when something is
wrong (a command failed, a slot does not hold its image).

Method
------
1. **Package sets** (Debian bookworm, fetched with ``apt-get download`` into
   ``~/.cache/abflip-bench/debs`` and unpacked with ``dpkg -x``): a base set (``--tier large``
   about 1.2 GiB unpacked: Go, OpenJDK, LLVM, GCC, Emacs, Perl, Python, ...; ``small`` about
   0.35 GiB). *Security update*: the base with the newer versions of 4 source packages
   (openssl, curl, openssh, expat: their binary packages from bookworm-security/updates).
   *Feature update*: the base with more packages added (numpy, scipy, ruby, mesa) and
   python3.11, libc6, git, perl and tzdata upgraded.
2. **Images and releases**: erofs images (``builder.image``), releases with the defaults of
   when they were made (kept in the work directory: remove its ``release-*`` to make them again;
   the README's figures are of level-9 releases, the default then; 64 MiB chunks, 128 MiB
   window); 1.1.0 (security) and 1.2.0 (feature) each with ``--delta-from`` 1.0.0. Delta
   creation is timed on its own.
3. **Lower bound**: ``zstd -19 --patch-from=<1.0.0 image> <new image>`` (``--long`` as needed).
4. **Device**: a simulated device over a real TUF repository and HTTP on 127.0.0.1 runs
   ``abflip install`` as a process. ``bench/linkserver.py`` serves the repository from a separate
   process (as for ``bench/apply.py``); with ``--link-mbps`` every body leaves through one token
   bucket of that many 10**6 bit/s, the same link for both kinds of install (default: loopback,
   unlimited). *Full* (a device whose booted image's sha256 is not
   recorded, so it takes the full image) and *delta* (provisioned: it takes the delta), of the
   same target, alternated ``--runs`` times (median). Wall time, CPU time (user + system) and
   peak RSS (``/usr/bin/time``) of that process, and the delta's over the full install's
   (issue 25's goals: a security delta <= 0.5x the full install's wall time, a feature delta
   <= 1.0x). After each pair, ``dd conv=fsync`` writes the target image into a fresh file: the
   write both installs must do at least, on this disk at that moment. abflip runs with its
   bytecode cached, as installed (``bench/installed.py``; ``--no-bytecode-cache``: as it is).
5. **Floor**: after each install, ``abflip check`` on the same device (nothing left to do: the
   interpreter's start, imports and a TUF refresh, which every install pays before it writes),
   and one sha256 pass over the target image held in memory (what every install hashes, in one
   sequential pass: the signed image sha256). Their sum over the full install's wall is the
   lowest ratio any install that checks its image could reach on this machine.

The report's header names the link. The last lines are the issue's summary line, then the install
ratios at that link.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from installed import installed_env  # noqa: E402  (bench/installed.py)
from linkserver import ServerProcess  # noqa: E402  (bench/linkserver.py)

CACHE = Path.home() / ".cache" / "abflip-bench" / "debs"
SECURITY = {"libssl3": "3.0.22-1~deb12u2", "openssl": "3.0.22-1~deb12u2", "libcurl4": "7.88.1-10+deb12u15",
            "curl": "7.88.1-10+deb12u15", "openssh-client": "1:9.2p1-2+deb12u10", "libexpat1": "2.5.0-1+deb12u5"}
SECURITY_OLD = {"libssl3": "3.0.17-1~deb12u2", "openssl": "3.0.17-1~deb12u2", "libcurl4": "7.88.1-10+deb12u5",
                "curl": "7.88.1-10+deb12u5", "openssh-client": "1:9.2p1-2+deb12u7", "libexpat1": "2.5.0-1+deb12u2"}
UPGRADES = {"python3.11": "3.11.2-6+deb12u9", "libpython3.11-stdlib": "3.11.2-6+deb12u9",
            "libpython3.11-minimal": "3.11.2-6+deb12u9", "python3.11-minimal": "3.11.2-6+deb12u9",
            "libc6": "2.36-9+deb12u14", "libc-bin": "2.36-9+deb12u14", "git": "1:2.39.5-0+deb12u3",
            "perl-base": "5.36.0-7+deb12u4", "tzdata": "2026f-0+deb12u1"}
UPGRADES_OLD = {"python3.11": "3.11.2-6+deb12u8", "libpython3.11-stdlib": "3.11.2-6+deb12u8",
                "libpython3.11-minimal": "3.11.2-6+deb12u8", "python3.11-minimal": "3.11.2-6+deb12u8",
                "libc6": "2.36-9+deb12u7", "libc-bin": "2.36-9+deb12u7", "git": "1:2.39.5-0+deb12u2",
                "perl-base": "5.36.0-7+deb12u3", "tzdata": "2025b-0+deb12u1"}
BASE = {
    "small": ["libllvm14", "gcc-12", "cpp-12", "vim-runtime", "libicu72", "libperl5.36", "perl-modules-5.36",
              "libxml2", "locales", "git-man", "binutils-x86-64-linux-gnu", "libgcc-12-dev"],
    "large": ["golang-1.19-go", "golang-1.19-src", "openjdk-17-jre-headless", "libllvm14", "gcc-12", "cpp-12",
              "g++-12", "emacs-common", "libclang-cpp14", "libnode108", "vim-runtime", "libicu72", "libperl5.36",
              "perl-modules-5.36", "libstdc++-12-dev", "libgcc-12-dev", "binutils-x86-64-linux-gnu", "libxml2",
              "locales", "git-man"],
}
FEATURE_ADD = ["python3-numpy", "python3-scipy", "libruby3.1", "libgl1-mesa-dri"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fetch(pkgs: dict[str, str | None]) -> list[Path]:
    """The .deb of each package (a pinned version, or the candidate), cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out = []
    for name, ver in sorted(pkgs.items()):
        marker = CACHE / f"{name}={ver or 'candidate'}.path"
        if marker.exists() and Path(marker.read_text()).exists():
            out.append(Path(marker.read_text()))
            continue
        before = set(CACHE.glob("*.deb"))
        spec = f"{name}={ver}" if ver else name
        subprocess.run(["apt-get", "download", "-q", spec], cwd=CACHE, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        new = sorted(set(CACHE.glob("*.deb")) - before) or sorted(CACHE.glob(f"{name}_*.deb"))
        marker.write_text(str(new[0]))
        out.append(new[0])
    return out


def tree(work: Path, name: str, debs: list[Path]) -> Path:
    t = work / f"tree-{name}"
    if (work / f"tree-{name}.done").exists():
        return t
    shutil.rmtree(t, ignore_errors=True)
    t.mkdir(parents=True)
    for d in debs:
        subprocess.run(["dpkg", "-x", str(d), str(t)], check=True)
    (t / "etc").mkdir(exist_ok=True)
    (t / "etc" / "os-release").write_text(f'NAME="bench-os"\nVERSION_ID="{name}"\n')
    (work / f"tree-{name}.done").write_text("ok\n")
    return t


def image(work: Path, name: str, t: Path) -> Path:
    from builder.image import build_image

    p = work / f"{name}.erofs"
    if not p.exists():
        build_image(t, p, source_date_epoch=1700000000)
    return p


def release(work: Path, version: str, img: Path, delta_from: list[Path]) -> tuple[Path, float]:
    """The release directory and the seconds spent making its deltas."""
    import builder.release as br

    out = work / f"release-{version}"
    timing = work / f"release-{version}.delta-seconds"
    if (out / "release.json").exists() and timing.exists():
        return out, float(timing.read_text())
    shutil.rmtree(out, ignore_errors=True)
    spent = [0.0]
    orig = br.make_deltas

    def timed(*a, **kw):
        t0 = time.monotonic()
        try:
            return orig(*a, **kw)
        finally:
            spent[0] += time.monotonic() - t0

    br.make_deltas = timed
    try:
        k = work / "vmlinuz"
        k.write_bytes(b"bench kernel " * 1000)
        br.create_release(img, out, product="bench-os", version=version, compatible=["bench"], kernel=k,
                          created=1700000000, delta_from=delta_from)
    finally:
        br.make_deltas = orig
    timing.write_text(f"{spent[0]}\n")
    return out, spent[0]


def patch_from(work: Path, old: Path, new: Path) -> int:
    out = work / f"{new.stem}.patch-from.zst"
    if not out.exists():
        size = max(old.stat().st_size, new.stat().st_size)
        long = max(27, (size - 1).bit_length())
        tmp = out.with_name(out.name + ".tmp")  # a killed run leaves no partial stream to be taken for the result
        subprocess.run(["zstd", "-q", "-f", "-19", "-T2", f"--long={long}", f"--patch-from={old}", str(new),
                        "-o", str(tmp)], check=True)
        tmp.rename(out)
    return out.stat().st_size


def install(run: Path, url: str, repo: Path, channel: str, factory: tuple[Path, Path], slot_size: int, *,
            delta: bool, env: dict[str, str]) -> dict:
    """``abflip install`` as a process on a fresh simulated device; its result, time and RSS; then
    ``abflip check`` on the same device (nothing left to install): the start-up, imports and TUF
    refresh every install pays before it writes a byte."""
    from abflip.sim import SimDevice
    from applier.agent import Device

    shutil.rmtree(run, ignore_errors=True)
    img, rel_dir = factory
    sim = SimDevice.create(run, repository_url=url, trusted_root=(repo / "metadata" / "1.root.json").read_bytes(),
                           product="bench-os", hardware_id="bench", slot_size=slot_size, channel=channel)
    if delta:
        with open(img, "rb") as s, open(sim.slot_path("a"), "r+b") as d:
            shutil.copyfileobj(s, d, 1 << 20)
        Device(sim.config).provision(rel_dir)
        sim.boot()
    else:
        sim.provision(img, slot="a", version="1.0.0", product="bench-os")
        Device(sim.config).mark_good()
    t0 = time.monotonic()
    # /usr/bin/time: the RSS of the install alone (a child's ru_maxrss would include this
    # process's own RSS at fork time, which survives the exec).
    p = subprocess.run(["/usr/bin/time", "-f", "maxrss %M cpu %U %S", sys.executable, "-m", "abflip.cli", "install",
                        "--config", str(sim.config_path), "--json"], cwd=ROOT, capture_output=True, text=True,
                       env=env)
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"abflip install failed: {p.stderr[-2000:]}")
    result = json.loads(p.stdout.splitlines()[-1])["result"]
    _, rss, _, user, system = p.stderr.strip().splitlines()[-1].split()
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "abflip.cli", "check", "--config", str(sim.config_path), "--json"], cwd=ROOT,
                   capture_output=True, env=env, check=True)
    fixed = time.monotonic() - t0
    shutil.rmtree(run, ignore_errors=True)
    return {"result": result, "seconds": seconds, "rss": int(rss) * 1024, "cpu": float(user) + float(system),
            "fixed": fixed}


def hash_seconds(img: Path) -> float:
    """One sha256 pass over ``img`` held in memory: what any install that checks the image's
    sha256 hashes, on one core (the hash is one sequential pass)."""
    data = img.read_bytes()
    t0 = time.perf_counter()
    hashlib.sha256(data).digest()
    return time.perf_counter() - t0


def write_floor(work: Path, img: Path) -> float:
    """Seconds ``dd`` takes to write ``img`` into a fresh file and fsync it: what any install of
    that image costs at least on this disk (both kinds of install write the whole slot)."""
    out = work / "write-floor.img"
    out.unlink(missing_ok=True)
    with open(img, "rb") as f:  # read once, so only the write is timed
        while f.read(16 << 20):
            pass
    t0 = time.monotonic()
    subprocess.run(["dd", f"if={img}", f"of={out}", "bs=1M", "conv=fsync", "status=none"], check=True)
    seconds = time.monotonic() - t0
    out.unlink()
    return seconds


def link_name(mbps: float) -> str:
    return (f"{mbps:g} Mbit/s (a token bucket in bench/linkserver.py's process, shared by both kinds of install)"
            if mbps > 0 else "loopback, unlimited (bench/linkserver.py's process, no token bucket)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--tier", choices=sorted(BASE), default="large")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=3, help="installs of each kind (median)")
    ap.add_argument("--no-patch-from", action="store_true",
                    help="skip the zstd --patch-from lower bound (minutes at level 19 on a loaded machine)")
    ap.add_argument("--link-mbps", type=float, default=0.0,
                    help="limit the server's throughput to this many 10**6 bit/s (default 0: loopback, unlimited)")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="run abflip in this environment as it is (default: its bytecode cached, as installed)")
    a = ap.parse_args(argv)
    if a.runs < 1 or a.link_mbps < 0:
        ap.error("need --runs >= 1 and --link-mbps >= 0")
    link = f"at {a.link_mbps:g} Mbit/s" if a.link_mbps > 0 else "on loopback"
    work = a.workdir or Path.home() / ".cache" / "abflip-bench" / f"delta-{a.tier}"
    work.mkdir(parents=True, exist_ok=True)
    base = {p: None for p in BASE[a.tier]}
    sets = {
        "1.0.0": {**base, **SECURITY_OLD, **UPGRADES_OLD},
        "1.1.0": {**base, **SECURITY, **UPGRADES_OLD},
        "1.2.0": {**base, **SECURITY, **UPGRADES, **{p: None for p in FEATURE_ADD}},
    }
    imgs = {}
    for v, pkgs in sets.items():
        log(f"{v}: {len(pkgs)} packages")
        imgs[v] = image(work, v, tree(work, v, fetch(pkgs)))
    log("releases")
    r1, _ = release(work, "1.0.0", imgs["1.0.0"], [])
    rs, ts = release(work, "1.1.0", imgs["1.1.0"], [r1])
    rf, tf = release(work, "1.2.0", imgs["1.2.0"], [r1])
    log("zstd --patch-from")
    pf = {"security": 0, "feature": 0} if a.no_patch_from else {
        "security": patch_from(work, imgs["1.0.0"], imgs["1.1.0"]), "feature": patch_from(work, imgs["1.0.0"], imgs["1.2.0"])}

    from builder.publish import publish_release, write_signed
    from builder.storage.local import LocalStorage
    from metadata.keys import KeyConfig
    from metadata.manifest import Release
    from metadata.repository import init_repository

    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(work / "keys", ignore_errors=True)
    storage = LocalStorage(repo)
    write_signed(storage, init_repository(work / "keys"))
    keys = KeyConfig.load(work / "keys")
    publish_release(rs, storage, keys, channel="security")
    publish_release(rf, storage, keys, channel="feature")
    rel = {k: Release.from_bytes((d / "release.json").read_bytes()) for k, d in (("security", rs), ("feature", rf))}
    slot_size = max(p.stat().st_size for p in imgs.values()) + (64 << 20)
    runs: dict[tuple[str, str], list[dict]] = {}
    env = installed_env(work, cached=not a.no_bytecode_cache)
    log(f"link: {link_name(a.link_mbps)}")
    with ServerProcess(repo, a.link_mbps) as server:
        for kind, channel in (("security", "security"), ("feature", "feature")):
            for i in range(a.runs):
                for mode in ("full", "delta"):
                    got = install(work / "run", server.url, repo, channel, (imgs["1.0.0"], r1), slot_size,
                                  delta=mode == "delta", env=env)
                    log(f"device: {kind} update, {mode}, run {i + 1}: {got['seconds']:.2f} s, cpu {got['cpu']:.2f} s")
                    if got["result"]["kind"] != mode:
                        raise SystemExit(f"{kind} {mode}: the device used {got['result']['kind']}")
                    runs.setdefault((kind, mode), []).append(got)
                target = imgs["1.1.0" if kind == "security" else "1.2.0"]
                runs.setdefault((kind, "write"), []).append({"seconds": write_floor(work, target), "cpu": 0.0, "rss": 0,
                                                            "result": {}})
                runs.setdefault((kind, "hash"), []).append({"seconds": hash_seconds(target), "cpu": 0.0, "rss": 0,
                                                           "result": {}})
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    rows = {km: {**rs[0], "seconds": med(rs, "seconds"), "cpu": med(rs, "cpu"), "rss": int(med(rs, "rss"))}
            for km, rs in runs.items()}
    mib = lambda n: f"{n / (1 << 20):9.2f} MiB"  # noqa: E731
    print(f"tier {a.tier}: image 1.0.0 {mib(imgs['1.0.0'].stat().st_size)}, 1.1.0 {mib(imgs['1.1.0'].stat().st_size)}, "
          f"1.2.0 {mib(imgs['1.2.0'].stat().st_size)}; {os.cpu_count()} CPUs")
    print(f"link: {link_name(a.link_mbps)}")
    print(f"{'update':10} {'full':>13} {'abflip delta':>13} {'patch-from':>13} {'delta make':>10} "
          f"{'apply full':>10} {'apply delta':>11} {'RSS full':>9} {'RSS delta':>9}")
    pct = {}
    for kind, made in (("security", ts), ("feature", tf)):
        r = rel[kind]
        ref = r.deltas[0]
        full = r.image.compressed_size
        dbytes = ref.data.length + ref.manifest.length
        pct[kind] = (100 * dbytes / full, 100 * pf[kind] / full)
        f, d = rows[(kind, "full")], rows[(kind, "delta")]
        lower = mib(pf[kind]) if pf[kind] else f"{'skipped':>13}"
        print(f"{kind:10} {mib(full)} {mib(dbytes)} {lower} {made:9.1f}s {f['seconds']:9.1f}s "
              f"{d['seconds']:10.1f}s {f['rss'] >> 20:5d} MiB {d['rss'] >> 20:5d} MiB")
        print(f"{'':10} device downloaded: full {f['result']['bytes_downloaded']} B, delta "
              f"{d['result']['bytes_downloaded']} B")
    print()
    print(f"install {link}, median of {a.runs} (the same target, full image vs delta, alternated):")
    print("| update | full wall s | delta wall s | wall ratio | full CPU s | delta CPU s | CPU ratio | "
          "dd + fsync of the image s | start-up + refresh s | sha256 pass s | floor / full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratio, floor = {}, {}
    for kind in ("security", "feature"):
        f, d, w, hs = rows[(kind, "full")], rows[(kind, "delta")], rows[(kind, "write")], rows[(kind, "hash")]
        ratio[kind] = (d["seconds"] / f["seconds"], d["cpu"] / f["cpu"])
        fixed = statistics.median(r["fixed"] for m in ("full", "delta") for r in runs[(kind, m)])
        floor[kind] = (fixed + hs["seconds"]) / f["seconds"]
        print(f"| {kind} | {f['seconds']:.2f} | {d['seconds']:.2f} | {ratio[kind][0]:.2f}x | {f['cpu']:.2f} | "
              f"{d['cpu']:.2f} | {ratio[kind][1]:.2f}x | {w['seconds']:.2f} | {fixed:.2f} | {hs['seconds']:.2f} | "
              f"{floor[kind]:.2f}x |")
    print("floor: `abflip check` after the install (interpreter start, imports, a TUF refresh: less than an install's "
          "own) plus one sha256 pass over the target image in memory (the image's hash, one sequential pass), "
          "against the full install's wall: no install that checks its image can take less here")
    peak = int(max(rows[(k, "delta")]["rss"] for k in ("security", "feature"))) >> 20
    patch = (f"patch-from: security {pct['security'][1]:.2f}%, feature {pct['feature'][1]:.2f}%" if not a.no_patch_from
             else "patch-from: skipped")
    print(f"delta/full: security {pct['security'][0]:.2f}%, feature {pct['feature'][0]:.2f}%; {patch}; "
          f"peak RSS delta {peak} MiB")
    print(f"install delta/full {link}: security {ratio['security'][0]:.2f}x wall ({ratio['security'][1]:.2f}x cpu, "
          f"floor {floor['security']:.2f}x), feature {ratio['feature'][0]:.2f}x wall ({ratio['feature'][1]:.2f}x cpu, "
          f"floor {floor['feature']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
