#!/usr/bin/env python3
"""Compression at CLI parity: abflip's chunked stream vs ``zstd -T0 --long=27 -<level>``.

    python3 bench/compress.py [--image IMG] [--level 9] [--variant CHUNK:WINDOW[:THREADS[:ldm]] ...] [--runs 1]
                              [--verity]

Both compress the same image from the page cache (one untimed read first), in the same run,
on all cores, runs interleaved (CLI, each variant, then again); medians are reported. Reported per variant: compressed size and wall time, and each as a ratio to
the zstd CLI (goals: size <= 1.01x, time <= 1.10x). The default image is the erofs image
``bench/apply.py`` caches in ``.bench/apply/rootfs.erofs``: when absent, it is built with
apply's defaults (1 GiB, /usr with 25 % long-range repeats, see ``bench/rootfs.py``); when
present, it is whatever apply last built there (its ``cache.json`` says what).

``--verity`` (issue 22) also runs each variant as ``release create --verity`` does it: the dm-verity hash tree
(builder/verity.py) and then the image and the tree compressed as one stream; reported as the time ratio to the
same variant without the tree (goal: <= 1.10x), in wall time and in CPU time (all threads: the machine is shared,
and CPU time is what a loaded machine stretches least).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.compress import compress_image  # noqa: E402

MIB = 1 << 20


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": MIB, "G": 1 << 30}.get(s[-1:], 1)
    return int(s[:-1] if s[-1:] in "KMG" else s) * mult


def default_image() -> Path:
    img = ROOT / ".bench" / "apply" / "rootfs.erofs"
    if not img.is_file():
        print("bench: building the 1 GiB image with bench/apply.py's builder ...", file=sys.stderr)
        sys.path.insert(0, str(ROOT / "bench"))
        import apply  # type: ignore[import-not-found]

        work = ROOT / ".bench" / "apply"
        work.mkdir(parents=True, exist_ok=True)
        apply.ensure_image(work, 1024, apply.Cache.load(work / "cache.json"), keep_tree=False)
    return img


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MIB):
            pass


def run_cli(image: Path, level: int, out: Path) -> tuple[float, int]:
    t0 = time.monotonic()
    subprocess.run(["zstd", "-q", "-f", "-T0", f"-{level}", "--long=27", str(image), "-o", str(out)], check=True)
    return time.monotonic() - t0, out.stat().st_size


def run_abflip(image: Path, level: int, chunk: int, window: int, threads: int, ldm: bool, out: Path,
               verity: bool = False) -> tuple[float, int, int, float]:
    from builder.verity import default_salt, make_tree

    tail = out.with_name("rootfs.verity")
    tail.unlink(missing_ok=True)
    t0, c0 = time.monotonic(), time.process_time()
    if verity:
        make_tree(image, tail, default_salt("bench"), threads=threads)
    r = compress_image(image, out, level=level, chunk_size=chunk, window=window, threads=threads, ldm=ldm,
                       tail=tail if verity else None)
    return time.monotonic() - t0, r.compressed_size, r.compression.window, time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--level", type=int, default=9)
    ap.add_argument("--variant", action="append", default=[],
                    help="CHUNK:WINDOW[:THREADS[:ldm]], e.g. 32M:32M or 64M:32M:0:ldm (default: the shipped defaults)")
    ap.add_argument("--runs", type=int, default=1, help="timed runs of each (median)")
    ap.add_argument("--tmp", type=Path, default=None, help="where the outputs go (default: next to the image)")
    ap.add_argument("--verity", action="store_true", help="also each variant with the dm-verity tree (release create "
                                                         "--verity): time ratio to the variant without")
    args = ap.parse_args()
    image = args.image or default_image()
    variants = args.variant or ["default"]
    size = image.stat().st_size
    print(f"image {image} ({size} bytes, {size / MIB:.0f} MiB), level {args.level}, {os.cpu_count()} CPUs", flush=True)
    warm(image)
    with tempfile.TemporaryDirectory(dir=args.tmp or image.parent, prefix=".bench-compress-") as tmp:
        out = Path(tmp) / "out.zst"
        from builder.compress import DEFAULT_CHUNK, DEFAULT_LDM, DEFAULT_THREADS, DEFAULT_WINDOW

        specs = []
        for v in variants:
            chunk, window, threads, ldm = DEFAULT_CHUNK, DEFAULT_WINDOW, DEFAULT_THREADS, DEFAULT_LDM
            if v != "default":
                parts = v.split(":")
                chunk, window = parse_size(parts[0]), parse_size(parts[1])
                threads = int(parts[2]) if len(parts) > 2 else 0
                ldm = len(parts) > 3 and parts[3] == "ldm"
            specs.append((chunk, window, threads, ldm))
        # interleaved runs (cli, variant 1, variant 2, ... then again), so load changes hit all alike
        cli_t: list[float] = []
        cli_n = 0
        var_t: list[list[float]] = [[] for _ in specs]
        var_n = [0] * len(specs)
        var_used = [0] * len(specs)
        ver_t: list[list[float]] = [[] for _ in specs]
        var_cpu: list[list[float]] = [[] for _ in specs]  # CPU seconds, all threads (a loaded machine stretches wall)
        ver_cpu: list[list[float]] = [[] for _ in specs]
        ver_n = [0] * len(specs)
        for r in range(args.runs):
            t, cli_n = run_cli(image, args.level, out)
            cli_t.append(t)
            print(f"  run {r + 1} cli: {cli_n} bytes, {t:.2f} s", flush=True)
            for i, (chunk, window, threads, ldm) in enumerate(specs):
                t, var_n[i], var_used[i], cpu = run_abflip(image, args.level, chunk, window, threads, ldm, out)
                var_t[i].append(t)
                var_cpu[i].append(cpu)
                print(f"  run {r + 1} abflip {chunk // MIB}:{window // MIB}: {var_n[i]} bytes, {t:.2f} s, CPU {cpu:.2f} s",
                      flush=True)
                if args.verity:
                    t, ver_n[i], _, cpu = run_abflip(image, args.level, chunk, window, threads, ldm, out, verity=True)
                    ver_t[i].append(t)
                    ver_cpu[i].append(cpu)
                    print(f"  run {r + 1} abflip {chunk // MIB}:{window // MIB} --verity: {ver_n[i]} bytes, {t:.2f} s, "
                          f"CPU {cpu:.2f} s", flush=True)
        cli = statistics.median(cli_t)
        rows = [(f"zstd -T0 --long=27 -{args.level}", cli_n, cli)]
        for i, (chunk, window, threads, ldm) in enumerate(specs):
            name = (f"abflip chunk {chunk // MIB} MiB, window {window // MIB} MiB"
                    + (f" (used {var_used[i] // MIB} MiB)" if var_used[i] != window else "")
                    + f", threads {threads or os.cpu_count()}" + (", ldm" if ldm else ""))
            rows.append((name, var_n[i], statistics.median(var_t[i])))
            if args.verity:
                rows.append((name + ", --verity", ver_n[i], statistics.median(ver_t[i])))
    print()
    print("| variant | compressed bytes | size ratio | wall s | time ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, n, t in rows:
        print(f"| {name} | {n:,} | {n / cli_n:.4f}x | {t:.2f} | {t / cli:.2f}x |")
    if args.verity:
        for i, (chunk, window, _, _) in enumerate(specs):
            plain, ver = statistics.median(var_t[i]), statistics.median(ver_t[i])
            plain_cpu, ver_c = statistics.median(var_cpu[i]), statistics.median(ver_cpu[i])
            print(f"verity: chunk {chunk // MIB} MiB: {ver:.2f} s / {plain:.2f} s = {ver / plain:.3f}x the time, "
                  f"CPU {ver_c:.2f} s / {plain_cpu:.2f} s = {ver_c / plain_cpu:.3f}x, {ver_n[i] / var_n[i]:.4f}x the bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
