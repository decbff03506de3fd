#!/usr/bin/env python3
"""Benchmark: what a device pays when nothing happens, and per update (issue 14).

    python3 bench/device.py [--runs 7] [--releases 50,500] [--layouts bins,flat] [--workdir DIR] [--no-bytecode-cache]

Measures, and asserts nothing about speed:

1. **Start-up**, warm page cache, median of ``--runs``: ``python3 -c pass`` beside
   ``abflip status --json``, ``abflip boot-check --json`` and an idle ``abflip check --json``
   (real CLI processes against a simulated device, the repository served over HTTP on
   127.0.0.1 by a server thread of this process), each also with the module count and whether
   boto3 / pydantic were imported. Every process, ``python3 -c pass`` too, runs with its
   bytecode cached, as an installed package has it (``PYTHONPYCACHEPREFIX`` in the work
   directory, written by a first run, even where ``PYTHONDONTWRITEBYTECODE`` is set);
   ``--no-bytecode-cache`` measures with the environment as it is instead (a source checkout
   under ``PYTHONDONTWRITEBYTECODE=1`` compiles abflip's modules in every process).
2. **Bytes on the wire** (counted by the server: response bodies, every file): per idle check
   (TUF timestamp only when nothing changed) and per update (the check that finds release
   ``N`` after the device saw ``N - 1``: TUF metadata, channel pointer, manifest; not the
   image) when the product has ``N`` releases, for each ``N`` in ``--releases``, for each layout
   in ``--layouts`` (the product delegated to its own key, as ``abflip repo delegate`` does):
   ``bins``, the default since issue 14 (16 hash bins; the product role lists the channel
   pointers and the releases they point at), and ``flat`` (``--bin-bits 0``: the product role
   lists every release, as before). The releases are tiny (a 1 MiB image); publishing 500 takes
   a few minutes per layout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from installed import installed_env  # noqa: E402  (bench/installed.py)

from abflip.demo import HARDWARE, PRODUCT, make_rootfs  # noqa: E402
from abflip.httpserver import RepoHandler, Server  # noqa: E402
from abflip.sim import SimDevice  # noqa: E402
from applier.agent import Device  # noqa: E402
from builder.image import build_image  # noqa: E402
from builder.publish import publish_release, write_signed  # noqa: E402
from builder.release import create_release  # noqa: E402
from builder.storage.local import LocalStorage  # noqa: E402
from metadata.keys import KeyConfig, generate_file_key  # noqa: E402
from metadata.repository import DEFAULT_BIN_BITS, Repository, init_repository  # noqa: E402
from metadata.staging import clear_staged, commit_staged, stage_delegation  # noqa: E402

EPOCH = 1700000000
ABFLIP = [sys.executable, "-m", "abflip.cli"]


class Counting(RepoHandler):
    sent: list[tuple[str, int]] = []

    def send_bytes(self, data, start, end):
        Counting.sent.append((self.path, end - start))
        RepoHandler.send_bytes(self, data, start, end)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(argv: list[str], runs: int, env: dict[str, str]) -> float:
    subprocess.run(argv, capture_output=True, env=env)  # warm the page cache (and write the bytecode cache)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, env=env)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def imports(argv: list[str], env: dict[str, str]) -> tuple[int, bool, bool]:
    p = subprocess.run([sys.executable, "-X", "importtime", *argv[1:]], capture_output=True, text=True, env=env)
    names = [ln.rsplit("|", 1)[1].strip() for ln in p.stderr.splitlines() if ln.startswith("import time:")][1:]
    loaded = set(names)  # an import that failed on purpose (sys.modules[name] = None) is listed too
    boto = any(n == "botocore.session" or n.startswith("boto3.") for n in loaded)
    return len(names), boto, "pydantic" in loaded


LAYOUTS = {"bins": DEFAULT_BIN_BITS, "flat": 0}


def delegated_repository(repo: Path, keys_dir: Path, bits: int) -> tuple[LocalStorage, KeyConfig]:
    """A new repository in ``repo`` whose product is delegated to its own key (as ``abflip repo
    delegate`` does) with ``2**bits`` hash bins; the keys in ``keys_dir`` sign every role."""
    storage = LocalStorage(repo)
    write_signed(storage, init_repository(keys_dir))
    keys = KeyConfig.load(keys_dir)

    def load() -> Repository:
        return Repository.load(lambda n: storage.get(f"metadata/{n}"))

    stage_delegation(load(), keys, PRODUCT, [generate_file_key(keys.dir, f"ci-{PRODUCT}")], bits=bits)
    write_signed(storage, commit_staged(load(), keys))
    clear_staged(keys.dir)
    return storage, keys


class Bench:
    def __init__(self, work: Path, bits: int) -> None:
        self.work = work
        base = work / "src"
        base.mkdir(parents=True)
        (base / "vmlinuz").write_bytes(b"kernel " * 500)
        (base / "initrd.img").write_bytes(b"initrd " * 500)
        tree = make_rootfs(base / "tree", "1.0.0", size=1 << 20, seed=1)
        self.image = build_image(tree, base / "rootfs.erofs", source_date_epoch=EPOCH).path
        self.base = base
        self.repo = work / "repo"
        self.storage, self.keys = delegated_repository(self.repo, work / "keys", bits)
        self.count = 0

    def release(self, n: int) -> Path:
        out = self.base / f"release-{n}"
        create_release(self.image, out, product=PRODUCT, version=f"1.0.{n}", compatible=[HARDWARE],
                       kernel=self.base / "vmlinuz", initrd=self.base / "initrd.img", options="ro",
                       chunk_size=256 << 10, window=256 << 10, created=EPOCH)
        return out

    def publish_up_to(self, n: int) -> None:
        while self.count < n:
            self.count += 1
            rel = self.release(self.count)
            publish_release(rel, self.storage, self.keys, channel="stable")
            shutil.rmtree(rel)
            if self.count % 50 == 0:
                log(f"  published {self.count} releases")

    def device(self, url: str, name: str) -> tuple[SimDevice, Device]:
        rel = self.release(0)
        sim = SimDevice.create(self.work / name, repository_url=url,
                               trusted_root=(self.repo / "metadata" / "1.root.json").read_bytes(), product=PRODUCT,
                               hardware_id=HARDWARE, slot_size=8 << 20, retries=1, timeout=10.0)
        sim.provision(self.image, slot="a", version="1.0.0", product=PRODUCT)
        shutil.rmtree(rel)
        dev = Device(sim.config)
        dev.mark_good()
        return sim, dev


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--releases", default="50,500", help="comma-separated release counts for the bytes table")
    ap.add_argument("--layouts", default="bins,flat", help=f"comma-separated, of {', '.join(LAYOUTS)}")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="run the start-up processes in this environment as it is (no bytecode cache of our own)")
    args = ap.parse_args()
    counts = sorted(int(x) for x in args.releases.split(",") if x)
    layouts = [x for x in args.layouts.split(",") if x]
    if not layouts or set(layouts) - set(LAYOUTS):
        ap.error(f"--layouts: choose from {', '.join(LAYOUTS)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="abflip-bench-device-"))
    if work.exists() and any(work.iterdir()):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(work / layouts[0], LAYOUTS[layouts[0]])
    env = installed_env(work, cached=not args.no_bytecode_cache)
    with Server(bench.repo, handler=Counting) as server:
        bench.publish_up_to(1)
        sim, dev = bench.device(server.url, "dev")
        dev.check()
        cfg = str(sim.config.path)
        rows = [("python3 -c pass", [sys.executable, "-c", "pass"])]
        rows += [(f"abflip {' '.join(c)}", [*ABFLIP, *c, "--config", cfg])
                 for c in (["status", "--json"], ["boot-check", "--json"], ["check", "--json"])]
        rows.append(("abflip status --json --config=PATH (through typer)", [*ABFLIP, "status", "--json", f"--config={cfg}"]))
        base = None
        warm = "warm" if args.no_bytecode_cache else "warm, bytecode cached"
        print(f"| command ({warm}) | median s | vs `python3 -c pass` | modules | boto3 | pydantic |")
        print("|---|---:|---:|---:|---|---|")
        for label, argv in rows:
            t = timed(argv, args.runs, env)
            base = base or t
            n, boto, pyd = imports(argv, env)
            print(f"| `{label}` | {t:.3f} | {t / base:.2f}x | {n} | {'yes' if boto else 'no'} | {'yes' if pyd else 'no'} |",
                  flush=True)
    print()
    print("| layout | releases of the product | bytes per idle check | bytes per update (metadata) | of which TUF "
          "metadata | largest file | hash bins fetched |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for layout in layouts:
        if layout != layouts[0]:
            bench = Bench(work / layout, LAYOUTS[layout])
        with Server(bench.repo, handler=Counting) as server:
            for n in counts:
                bench.publish_up_to(n - 1)
                sim, dev = bench.device(server.url, f"dev-{n}")
                dev.check()
                Counting.sent = []
                dev.check()
                idle = sum(b for _, b in Counting.sent)
                bench.publish_up_to(n)
                Counting.sent = []
                found = dev.check()
                assert found["available"] and found["version"] == f"1.0.{n}", found
                update = sum(b for _, b in Counting.sent)
                tuf = sum(b for p, b in Counting.sent if p.startswith("/metadata/"))
                bins = sum(1 for p, _ in Counting.sent if f"{PRODUCT}-bin-" in p)
                path, size = max(Counting.sent, key=lambda s: s[1])
                print(f"| {layout} | {n} | {idle:,} | {update:,} | {tuf:,} | {path.rsplit('/', 1)[-1]} {size:,} B "
                      f"| {bins} |", flush=True)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
